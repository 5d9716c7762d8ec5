"""Bad command lines, across the WHOLE `sqis` command tree: one line naming the option, exit 2, no traceback.

The tree is walked from the typer app, so a command or option added later is covered without editing
this file. Each leaf's callback is replaced by one that fails the test: a bad value must be refused
before the command runs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from sqis.cli import app, run

# Numeric options where every integer is a valid value.
UNBOUNDED_OK = {"--seed"}


class _Ran(Exception):
    pass


def _never(*_a: Any, **_k: Any) -> None:
    raise _Ran("the command ran despite a bad command line")


def _leaves(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


def _tree() -> Any:
    root = get_command(app)
    for _, leaf in _leaves(root):
        leaf.callback = _never
    return root


ROOT = _tree()
LEAVES = list(_leaves(ROOT))


def _filler(leaf: Any) -> list[str]:
    """Valid-looking values for the required parameters, so only the bad one is wrong."""
    out: list[str] = []
    for p in leaf.params:
        if not p.required:
            continue
        val = "1" if p.type_descriptor.annotation in (int, float) else "x"
        if p.opts and p.opts[0].startswith("--"):
            out += [p.opts[0], val]
        else:
            out += [val] * (2 if p.nargs == -1 else 1)
    return out


def _numeric(p: Any) -> bool:
    return p.type_descriptor.annotation in (int, float) and bool(p.opts) and p.opts[0].startswith("--")


def _cases() -> Iterator[Any]:
    for path, leaf in LEAVES:
        name = " ".join(path)
        yield pytest.param(path, ["--no-such-flag", "1"], "--no-such-flag", id=f"{name}:unknown")
        for p in leaf.params:
            if not _numeric(p):
                continue
            opt, info = p.opts[0], p.type_descriptor.parameter_info
            yield pytest.param(path, [opt, "abc"], opt, id=f"{name}:{opt}=abc")
            if info.min is not None:
                low = str(info.min - 1) if p.type_descriptor.annotation is int else str(info.min - 0.5)
                yield pytest.param(path, [opt, low], opt, id=f"{name}:{opt}={low}")
            if info.max is not None:
                yield pytest.param(path, [opt, str(info.max + 1)], opt, id=f"{name}:{opt}={info.max + 1}")
        missing = [p for p in leaf.params if p.required]
        if missing:
            first = missing[0]
            hint = first.opts[0] if first.opts and first.opts[0].startswith("--") else (first.metavar or first.name)
            yield pytest.param(path, [], hint, id=f"{name}:missing")


@pytest.mark.parametrize(("path", "bad", "names"), list(_cases()))
def test_bad_value_is_one_line_exit_2(path: tuple[str, ...], bad: list[str], names: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    leaf = dict(LEAVES)[path]
    argv = [*path, *bad, *([] if bad == [] else _filler(leaf))]
    rc = run(argv, command=ROOT)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (argv, rc, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    assert names.lower() in err.lower(), err
    assert "Traceback" not in err


def test_every_numeric_option_is_bounded() -> None:
    """Options the walk finds with no range: each is a deliberate choice listed in UNBOUNDED_OK."""
    loose = sorted(f"{' '.join(path)} {p.opts[0]}" for path, leaf in LEAVES for p in leaf.params
                   if _numeric(p) and not p.type_descriptor.is_ranged and p.opts[0] not in UNBOUNDED_OK)
    assert loose == []


def test_walk_covers_the_tree() -> None:
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"produce", "worker", "sink postgres", "dlq show", "eval", "model list", "data import"} <= names


@pytest.mark.parametrize("argv", [
    ["produce", "--fps", "abc"], ["worker", "--max-batch", "0"], ["eval"],
    ["train", "--bogus", "1"], ["produce", "--source", "nope"], ["produce", "--size", "abc"],
    ["produce", "--denoise", "sharp"],
])
def test_real_console_script_one_line(argv: list[str], tmp_path: Path) -> None:
    """Through the real entry point (typer's bundled click, no stubs), in a subprocess."""
    r = subprocess.run([sys.executable, "-c", "from sqis.cli import main; main()", *argv], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env={**_env(), "SQIS_STATE_DIR": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ")


def _env() -> dict[str, str]:
    import os

    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root}
