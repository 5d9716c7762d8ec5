"""The package layering (docs/DESIGN.md "Layout"): infra is the ground floor, the app (sqis/) the top.

Read from the source with ast, so a lazy import inside a function counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "infra", "producers", "inference_workers", "sinks", "training", "stream_processors",
            "dashboard", "api", "sqis")
# package -> the project packages it may import
ALLOWED: dict[str, set[str] | None] = {
    "schemas": set(),
    "infra": {"schemas"},
    "producers": {"infra", "schemas"},
    "inference_workers": {"infra", "schemas"},
    "sinks": {"infra", "schemas"},
    "training": {"infra", "schemas", "inference_workers", "producers"},
    "stream_processors": {"infra", "schemas"},
    "dashboard": {"infra", "schemas"},
    "api": {"infra", "schemas", "producers", "inference_workers"},
}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out & set(PACKAGES)


def _module_imports(path: Path) -> set[str]:
    """Project modules (dotted) imported by one file, at run time: imports under ``if TYPE_CHECKING:``
    exist only for annotations (a mixin naming the class it is mixed into) and cannot form a cycle."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in (n for n in ast.walk(tree) if id(n) not in typing_only):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_no_package_imports_above_its_floor(pkg: str) -> None:
    if not (ROOT / pkg).is_dir():
        pytest.skip(f"{pkg}/ not in this checkout")
    allowed = ALLOWED[pkg]
    bad = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        used = _imports(f) - {pkg}
        refused = used - allowed
        if refused:
            bad.append(f"{f.relative_to(ROOT)} imports {sorted(refused)}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules() -> None:
    """No two project modules import each other, directly or through a chain (lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py") if (ROOT / pkg).is_dir() else ():
            mod = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[mod] = _module_imports(f)
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_python_dash_m_sqis_runs_from_any_directory(tmp_path: Path) -> None:
    """`python -m sqis` is the CLI; it works outside the repo (as under systemd) and finds the demo model."""
    import os

    env = os.environ | {"PYTHONPATH": str(ROOT)}
    env.pop("SQIS_MODEL_URI", None)
    out = subprocess.run([sys.executable, "-m", "sqis", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "worker" in out.stdout and "bench" in out.stdout and "demo" in out.stdout
    from inference_workers.cli import default_model_uri
    from infra.settings import Settings

    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        assert Path(default_model_uri(Settings(state_dir=tmp_path))).resolve() == \
            (ROOT / "models" / "demo" / "model.onnx").resolve()
    finally:
        os.chdir(cwd)


def test_nothing_but_the_app_imports_api() -> None:
    """The HTTP door is a leaf: only sqis/ (the CLI, the bench) may import it."""
    bad = []
    for pkg in PACKAGES:
        if pkg in ("api", "sqis") or not (ROOT / pkg).is_dir():
            continue
        bad += [str(f.relative_to(ROOT)) for f in sorted((ROOT / pkg).rglob("*.py")) if "api" in _imports(f)]
    assert not bad, f"import api: {bad}"


def test_console_script_is_the_app_package() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["sqis"] == "sqis.cli:main"
    assert "sqis*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
