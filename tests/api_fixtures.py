"""The API against the real stack, once per session: uvicorn (in a thread) on a free loopback port, an
InferenceWorker and the PostgreSQL sink in threads, collectors on `frames` and `inspections`, and
keys minted per scope. Import ``api_stack`` from here in a test module to use it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the api extra: pip install 'sqis[api]'")


class _Collect(logging.Handler):
    """Every log line of the session, formatted with its extras, to check that no secret is ever logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.__dict__}")


@dataclass
class ApiStack:
    base_url: str
    settings: Any
    dsn: str
    keys: dict[str, str]  # role -> full key
    frames: Any  # TopicCollector on frames
    inspections: Any  # TopicCollector on inspections
    logs: _Collect
    app: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def auth(self, role: str = "all") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture(scope="session")
def api_stack(local_stack: Any, onnx_model_path: Path) -> Iterator[ApiStack]:
    import uvicorn

    from api.app import create_app
    from api.config import ApiSettings
    from api.keys import create_key, revoke_key
    from inference_workers.worker import InferenceWorker
    from infra.db import connect
    from infra.kafka import create_topics, delete_topics
    from infra.stack import free_port
    from schemas.catalog import TopicCatalog
    from sinks.postgres import PostgresSink
    from sqis.bench.harness import TopicCollector
    from tests.model_fixtures import RunningWorker

    prefix = f"api{uuid.uuid4().hex[:6]}."
    s = local_stack.settings(topic_prefix=prefix, object_store_url=(local_stack.objects_dir / prefix.rstrip(".")).as_uri(),
                             kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500, log_format="console",
                             model_uri=str(onnx_model_path))
    create_topics(s, TopicCatalog(prefix), partitions={"frames": 2, "inspections": 2})
    dsn = s.dsn()
    logs = _Collect()
    watched = ("api", "uvicorn", "infra", "inference_workers", "sinks")  # on these loggers: a CLI's
    for name in watched:  # setup_logging() replaces the root's handlers
        logging.getLogger(name).addHandler(logs)
    logging.getLogger("api").setLevel(logging.DEBUG)
    keys: dict[str, str] = {}
    with connect(dsn, autocommit=True) as conn:
        keys["all"] = create_key(conn, "test-all", ["ingest", "inspect", "read"], rate_per_s=10_000, burst=10_000)[1]
        keys["ingest"] = create_key(conn, "test-ingest", ["ingest"])[1]
        keys["slow"] = create_key(conn, "test-slow", ["read"], rate_per_s=0.2, burst=2)[1]
        revoked, keys["revoked"] = create_key(conn, "test-revoked", ["read"])
        revoke_key(conn, revoked.key_id)
    api = ApiSettings(key_cache_s=0, max_wait_s=20, max_request_bytes=4 * 1024 * 1024,
                      max_image_bytes=3 * 1024 * 1024, inspect_timeout_s=20)
    app = create_app(s, api)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    worker = RunningWorker(InferenceWorker(s, str(onnx_model_path), group_id=f"iw-{prefix}", worker_id="api-test-w",
                                           fetch_threads=2, max_batch=8))
    sink = PostgresSink(s, group_id=f"sink-{prefix}", max_wait_ms=100)
    sink_thread = threading.Thread(target=sink.run, name="pg-sink", daemon=True)
    sink_thread.start()
    frames, inspections = TopicCollector(s, "frames"), TopicCollector(s, "inspections")
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    st = ApiStack(f"http://127.0.0.1:{port}", s, dsn, keys, frames, inspections, logs, app)
    try:
        yield st
    finally:
        server.should_exit = True
        thread.join(20)
        worker.stop_event.set()
        sink.stop()
        worker.thread.join(30)
        sink_thread.join(30)
        frames.close()
        inspections.close()
        for name in watched:
            logging.getLogger(name).removeHandler(logs)
        with contextlib.suppress(Exception):
            delete_topics(s, [n for n, _ in TopicCatalog(prefix).all()])
