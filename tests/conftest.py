"""Shared fixtures: one real local stack (Apache Kafka + PostgreSQL) per session, a moto S3 endpoint,
and per-test settings with their own topic prefix.

Fixture API:
- ``local_stack`` (session): a running ``infra.stack.LocalStack``; ``.info`` is its stack.json dict,
  ``.state_dir`` its directory. Torn down (processes stopped, data purged) at session end.
- ``settings_factory`` (function): ``settings_factory(*, partitions=None, create_topics=True,
  **overrides) -> Settings`` pointing at the session stack, with a fresh ``topic_prefix``
  (``t<8 hex>.``) whose catalog topics exist, a fresh object-store directory, and short group
  timeouts (session 2000 ms / heartbeat 500 ms). Its topics are deleted after the test.
- ``pg_dsn`` (session) / ``pg_conn`` (function, autocommit psycopg connection) to the stack's DB.
- ``s3_endpoint`` (session): URL of a moto S3 server on 127.0.0.1; AWS_* env set to 'testing'.
- ``unique_id`` (function): a short uuid hex for group ids, buckets, etc.
- ``legacy_framing`` (module): the serde writes the pre-#19 ``sqis-schema`` header framing for the
  test (unit tests of that framing), whatever the session stack configured.
- ``private_kafka`` (function): an Apache Kafka of the test's own (``PrivateKafka``) that it may
  SIGKILL and start again (same ports, data kept), for chaos tests that must not touch the session's.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.kafka_broker import machine_cache
from infra.settings import Settings
from infra.stack import LocalStack, free_port

pytest_plugins = ["tests.model_fixtures", "tests.mqtt_fixtures"]

# The suite runs against its own local stacks: let stack.json and file:// stand in for missing endpoints
# (`sqis --local`). Tests of the strict production settings remove it.
os.environ["SQIS_LOCAL"] = "1"
machine_cache()  # the per-machine jar cache, fixed before any test (offline training moves XDG_CACHE_HOME)

SettingsFactory = Callable[..., Settings]


_RUNNING: list[LocalStack] = []  # stacks this session started: stopped on SIGTERM too (no orphan JVMs)


def _stop_all_on_sigterm(signum: int, _frame: Any) -> None:
    for st in list(_RUNNING):
        with contextlib.suppress(Exception):
            st.down(purge=True)
    os._exit(128 + signum)


def _track(stack: LocalStack) -> None:
    import signal
    import threading

    if not _RUNNING and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_all_on_sigterm)
    _RUNNING.append(stack)


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The session's Apache Kafka + PostgreSQL, started once, stopped at the end even on failure."""
    stack = LocalStack(tmp_path_factory.mktemp("stack"))

    def _down() -> None:
        with contextlib.suppress(Exception):
            stack.down(purge=True)

    atexit.register(_down)  # safety net if the session dies before the finalizer runs
    _track(stack)
    from schemas import serde

    try:
        stack.up()
        serde.configure(stack.info["registry"]["url"])  # in-process producers write the registry's format
        yield stack
    finally:
        serde.configure(None)
        _down()
        atexit.unregister(_down)


@pytest.fixture(scope="module")
def legacy_framing() -> Iterator[None]:
    from schemas import serde

    before = serde.registry_url()
    serde.configure(None)
    try:
        yield
    finally:
        serde.configure(before)


class PrivateKafka:
    """A one-node Apache Kafka of a test's own: ``kill()`` is SIGKILL (a crash: nothing flushed),
    ``start()`` brings it back on the same ports with its data, ``stop()`` is a graceful shutdown."""

    def __init__(self, state_dir: Path, topic_prefix: str = "") -> None:
        self.stack = LocalStack(state_dir, topic_prefix=topic_prefix)
        self.bootstrap = ""
        self.port = 0

    def start(self) -> None:
        info = self.stack.up(postgres=False, mqtt=False)["kafka"]
        self.bootstrap, self.port = info["bootstrap"], int(info["port"])

    @property
    def pid(self) -> int:
        return int(self.stack.info["kafka"]["pid"])

    def kill(self) -> None:
        import signal
        import time

        from infra.stack import pid_alive

        pid = self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.stack.down()

    def settings(self, **overrides: Any) -> Settings:
        return self.stack.settings(**overrides)


@pytest.fixture
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    k = PrivateKafka(tmp_path_factory.mktemp("kafka"))
    _track(k.stack)
    k.start()
    try:
        yield k
    finally:
        with contextlib.suppress(Exception):
            k.stack.down(purge=True)
        _RUNNING.remove(k.stack)


@pytest.fixture
def unique_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def settings_factory(local_stack: LocalStack) -> Iterator[SettingsFactory]:
    """Build Settings bound to the session stack, each call with its own topic prefix."""
    from infra.kafka import create_topics as _create_topics
    from infra.kafka import delete_topics
    from schemas.catalog import TopicCatalog

    made: list[Settings] = []

    def factory(*, partitions: dict[str, int] | None = None, create_topics: bool = True,
                **overrides: Any) -> Settings:
        prefix = overrides.pop("topic_prefix", None) or f"t{uuid.uuid4().hex[:8]}."
        kw: dict[str, Any] = {
            "topic_prefix": prefix,
            "object_store_url": (local_stack.objects_dir / prefix.rstrip(".")).as_uri(),
            "kafka_session_timeout_ms": 2000,
            "kafka_heartbeat_interval_ms": 500,
            "log_format": "console",
        }
        kw.update(overrides)
        s = local_stack.settings(**kw)
        if create_topics:
            _create_topics(s, TopicCatalog(s.topic_prefix), partitions=partitions)
            made.append(s)
        return s

    yield factory
    for s in made:
        with contextlib.suppress(Exception):
            delete_topics(s, [name for name, _ in TopicCatalog(s.topic_prefix).all()])


@pytest.fixture(scope="session")
def pg_dsn(local_stack: LocalStack) -> str:
    return str(local_stack.info["postgres"]["dsn"])


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[Any]:
    """An autocommit psycopg connection to the stack's ``sqis`` database."""
    from infra.db import connect

    conn = connect(pg_dsn, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server over real HTTP on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

