"""`sqis demo` as a user runs it: a subprocess with its own stack, real frames, a real ONNX model."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infra.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The caller's environment without SQIS_* (nothing may redirect the demo's own stack)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")}


def _demo_cmd(state: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sqis", "demo", "--state-dir", str(state), *args]


def _leftovers(state: Path) -> list[str]:
    """Live processes that belong to this state dir (cmdline or cwd under it, or its PostgreSQL data)."""
    import psutil

    marks = {str(state), str(state.resolve())}
    pg = state / "postgres"
    if pg.exists():
        marks.add(str(pg.resolve()))
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        cwd = p.info["cwd"] or ""
        if any(m in cmd or cwd.startswith(m) for m in marks):
            out.append(f"{p.pid}: {cmd} (cwd {cwd})")
    return out


def _summary_int(out: str, label: str) -> int:
    m = re.search(rf"^\s*{label}\s+(\d+)", out, re.M)
    assert m, f"no {label!r} in the summary:\n{out}"
    return int(m.group(1))


@pytest.fixture
def demo_state(tmp_path: Path):
    """A state dir of its own; whatever the test leaves running there is stopped afterwards."""
    state = tmp_path / "demo"
    yield state
    with contextlib.suppress(Exception):
        LocalStack(state).down(purge=True)


def test_demo_runs_the_line_and_leaves_nothing_running(onnx_model_path: Path, demo_state: Path) -> None:
    r = subprocess.run(
        _demo_cmd(demo_state, "--duration", "25", "--fps", "4", "--cameras", "2", "--lines", "1",
                  "--workers", "1", "--model", str(onnx_model_path)),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=540)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Traceback" not in out
    produced = _summary_int(r.stdout, "frames produced")
    inspected = _summary_int(r.stdout, "inspected")
    assert produced > 0
    assert inspected == produced, out
    assert _summary_int(r.stdout, "DLQ") == 0
    assert "died" not in out.lower()
    for name in ("demo-worker-1", "sink-postgres", "demo"):
        assert (demo_state / "logs" / f"{name}.log").stat().st_size > 0

    assert _leftovers(demo_state) == []
    assert not (demo_state / "stack.json").exists()  # the demo stopped the stack it started

    # the rows are really in the state dir's PostgreSQL (start it again to look)
    from infra.db import connect

    stack = LocalStack(demo_state)
    info = stack.up(kafka=False)
    with connect(info["postgres"]["dsn"], autocommit=True) as conn:
        n, cams, lines, workers = conn.execute(
            "SELECT count(*), array_agg(DISTINCT camera_id ORDER BY camera_id), "
            "array_agg(DISTINCT line_id), array_agg(DISTINCT worker_id) FROM inspections").fetchone()
    assert n == inspected
    assert cams == ["cam-01", "cam-02"]
    assert lines == ["line-1"]
    assert workers == ["demo-worker-1"]


def test_demo_stops_cleanly_on_sigint(onnx_model_path: Path, demo_state: Path) -> None:
    proc = subprocess.Popen(
        _demo_cmd(demo_state, "--fps", "2", "--cameras", "1", "--lines", "1", "--workers", "1",
                  "--model", str(onnx_model_path)),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    inspecting = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"inspected (\d+)", line)
            if m and int(m.group(1)) > 0:
                inspecting.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert inspecting.wait(400), "".join(lines)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    out = "".join(lines)
    assert rc == 0, out
    assert "Traceback" not in out
    assert "interrupted: stopping the cameras" in out
    assert _summary_int(out, "inspected") == _summary_int(out, "frames produced") > 0
    assert _leftovers(demo_state) == []


def test_demo_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    state = tmp_path / "never"
    r = subprocess.run(_demo_cmd(state, "--model", str(tmp_path / "nope.onnx")),
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no model file at"), r.stderr
    assert "sqis data synth" in err[0] and "sqis train" in err[0]
    assert not state.exists()  # nothing was started
