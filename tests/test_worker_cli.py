"""`sqis worker`: Ctrl-C while the model is still loading exits at once (130, no traceback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def test_ctrl_c_during_model_load_exits_130(tmp_path: Path) -> None:
    # A "registry" that accepts the connection and never answers: the worker hangs in its model load.
    registry = socket.socket()
    registry.bind(("127.0.0.1", 0))
    registry.listen()
    registry.settimeout(120)
    port = registry.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")} | {
        "SQIS_STATE_DIR": str(tmp_path / "state"), "SQIS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "sqis", "worker", "--model", "models:/m@production"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = registry.accept()  # the worker is inside the model load now
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        registry.close()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted while starting" in stderr


def _worker_tuning(argv: list[str], env: dict[str, str], tmp_path: Path,
                   monkeypatch: Any) -> dict[str, Any]:
    """Run `sqis worker ARGV` under ENV with a stand-in InferenceWorker; the tuning it was built with."""
    import inference_workers.worker
    from inference_workers.detector import DetectorError
    from sqis.cli import run

    seen: dict[str, Any] = {}

    def fake(settings: Any, uri: str, thresholds: Any, **kw: Any) -> None:
        # What the worker would use: an option passed as None falls back to settings inside it.
        seen.update(max_batch=kw.get("max_batch") or settings.worker_max_batch,
                    max_wait_ms=kw.get("max_wait_ms") if kw.get("max_wait_ms") is not None
                    else settings.worker_max_wait_ms,
                    fetch_threads=kw.get("fetch_threads") or settings.worker_fetch_threads,
                    pipeline_depth=kw.get("pipeline_depth") or settings.worker_pipeline_depth)
        raise DetectorError("stand-in")

    monkeypatch.setattr(inference_workers.worker, "InferenceWorker", fake)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SQIS_STATE_DIR", str(tmp_path))
    sigint = signal.getsignal(signal.SIGINT)
    try:
        assert run(["worker", "--model", str(tmp_path / "m.onnx"), *argv]) == 2  # the stand-in's load error
    finally:
        signal.signal(signal.SIGINT, sigint)
    return seen


ENV_TUNING = {"SQIS_WORKER_MAX_BATCH": "16", "SQIS_WORKER_MAX_WAIT_MS": "25",
              "SQIS_WORKER_FETCH_THREADS": "6", "SQIS_WORKER_PIPELINE_DEPTH": "3"}


def test_worker_tuning_env_reaches_the_worker_when_no_option_is_given(tmp_path: Path, monkeypatch: Any) -> None:
    assert _worker_tuning([], ENV_TUNING, tmp_path, monkeypatch) == {
        "max_batch": 16, "max_wait_ms": 25.0, "fetch_threads": 6, "pipeline_depth": 3}


def test_worker_tuning_option_beats_env(tmp_path: Path, monkeypatch: Any) -> None:
    argv = ["--max-batch", "2", "--max-wait-ms", "0", "--fetch-threads", "1", "--pipeline-depth", "1"]
    assert _worker_tuning(argv, ENV_TUNING, tmp_path, monkeypatch) == {
        "max_batch": 2, "max_wait_ms": 0.0, "fetch_threads": 1, "pipeline_depth": 1}


def test_worker_help_shows_the_settings_default() -> None:
    from typer.main import get_command

    from sqis.cli import app

    opts = {p.opts[0]: p for p in get_command(app).commands["worker"].params}  # type: ignore[attr-defined]
    assert opts["--max-batch"].default is None and opts["--max-batch"].show_default == "settings, 8"
    assert opts["--pipeline-depth"].show_default == "settings, 2"
