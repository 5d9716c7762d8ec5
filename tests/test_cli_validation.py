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


# ---- command lines an independent run found wanting (issue #18) ------------------------------------------
# Each runs the real command (no stubs) without the test session's SQIS_LOCAL: as in production.


@pytest.mark.parametrize(("argv", "env", "rc", "says"), [
    (["produce", "--source", "video", "--path", "/etc/passwd"],
     {"SQIS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "SQIS_OBJECT_STORE_URL": "file:///nonexistent"}, 2, "not a video file"),
    (["sink", "postgres"], {"SQIS_POSTGRES_DSN": "notadsn"}, 2, "postgres_dsn"),
    (["worker"], {"SQIS_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, 2, "no model"),
    (["produce"], {}, 2, "kafka_bootstrap is not set"),
    (["topics", "verify"], {}, 2, "kafka_bootstrap is not set"),
    (["produce", "--bootstrap", "127.0.0.1:1"], {}, 2, "object_store_url is not set"),
    (["--local", "produce"], {}, 2, "sqis stack up"),  # local: the stack may stand in, but there is none
    (["stack", "status", "--state-dir", "/nonexistent"], {}, 1, "not running"),
])
def test_production_command_line_is_refused_at_once(argv: list[str], env: dict[str, str], rc: int, says: str,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for k in [k for k in __import__("os").environ if k.startswith("SQIS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SQIS_STATE_DIR", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run(argv) == rc
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and says in err, err
    assert "notadsn" not in err  # a DSN may hold a password: never echoed
    if argv[0] == "stack":
        assert "object store │ down" in out.out, out.out
    assert "SQIS_LOCAL" not in __import__("os").environ  # `--local` does not leak out of run()


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")} | {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "SQIS_STATE_DIR": str(tmp_path)} | extra


def test_mlflow_is_told_to_keep_its_info_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow sets its loggers' level when it is imported (lazily, after setup_logging): from this variable.
    End to end (`sqis worker --model models:/nope@production`, one line, no INFO) is 30 s of MLflow start-up."""
    import os

    from infra.logs import setup_logging

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    setup_logging("INFO")
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"


def test_unreachable_broker_at_start_is_said_within_seconds(tmp_path: Path) -> None:
    import time

    from infra.stack import free_port

    model = Path(__file__).resolve().parents[1] / "models" / "demo" / "model.onnx"
    env = _clean_env(tmp_path, SQIS_OBJECT_STORE_URL=(tmp_path / "o").as_uri(), SQIS_LOG_LEVEL="WARNING",
                     SQIS_POSTGRES_DSN="postgresql://x:y@127.0.0.1:1/z")
    for argv in (["worker", "--model", str(model)], ["sink", "postgres"], ["stream", "run"]):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "sqis", *argv, "--bootstrap", f"127.0.0.1:{free_port()}"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and "unreachable" in r.stderr and "SQIS_KAFKA_BOOTSTRAP" in r.stderr, r.stderr
        assert took < 15, (argv, took)  # was 28-29 s: a wrong address is not an outage
