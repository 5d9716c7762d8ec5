"""A pytest plugin: a session-scoped ONNX detector, and InferenceWorkers run in threads.

With the ``train`` extra an untrained YOLOv8n (3 classes, imgsz 128) with a perturbed class head is
exported to ONNX once per session; without it the committed demo model (models/demo/model.onnx, the
same 3 classes) is used, so the broker-backed worker tests never skip for want of ultralytics.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

MODEL_IMGSZ = 128
COMMITTED_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo" / "model.onnx"


@pytest.fixture(scope="session")
def onnx_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a YOLOv8n ONNX detector (classes scratch, dent, spot; imgsz 128; dynamic batch)."""
    import importlib.util

    if importlib.util.find_spec("ultralytics") is None:  # not importorskip: ultralytics must be imported offline
        if not COMMITTED_MODEL.is_file():
            pytest.fail(f"no train extra and no committed model at {COMMITTED_MODEL}")
        return COMMITTED_MODEL
    from sqis.bench.harness import export_untrained_detector

    return export_untrained_detector(tmp_path_factory.mktemp("onnx_model"), imgsz=MODEL_IMGSZ)


class RunningWorker:
    """An InferenceWorker running in a thread of the test process."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"worker-{worker.worker_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop_event)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 60.0) -> Any:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error
        return self.worker.stats


@pytest.fixture
def worker_factory(onnx_model_path: Path) -> Iterator[Callable[..., RunningWorker]]:
    """Start InferenceWorkers in threads: ``worker_factory(settings, **InferenceWorker kwargs)``."""
    from inference_workers.worker import InferenceWorker

    started: list[RunningWorker] = []

    def factory(settings: Any, **kw: Any) -> RunningWorker:
        kw.setdefault("group_id", f"iw-{uuid.uuid4().hex[:8]}")
        kw.setdefault("worker_id", f"tw-{uuid.uuid4().hex[:4]}")
        kw.setdefault("fetch_threads", 2)
        model = kw.pop("model_uri", str(onnx_model_path))
        rw = RunningWorker(InferenceWorker(settings, model, **kw))
        started.append(rw)
        return rw

    yield factory
    for rw in started:
        rw.stop_event.set()
    for rw in started:
        rw.thread.join(60)


def model_identity(path: str | Path) -> tuple[str, str]:
    """(model name, version) the worker reports for ``path`` (from its ONNX metadata)."""
    import onnxruntime as ort

    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    return meta.get("sqis_model_name", Path(path).stem), meta.get("sqis_model_version", "0")
