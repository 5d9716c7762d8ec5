"""`sqis worker`: Ctrl-C while the model is still loading exits at once (130, no traceback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


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
