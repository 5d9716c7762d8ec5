"""A private mosquitto per test (its own port, password and persistence directory), which the test may
stop, start again on the same port with its data, or restart; and small MQTT helpers."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra import mqtt_server
from infra.stack import free_port


class Mosquitto:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.info: dict[str, Any] | None = None
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.info = mqtt_server.up(self.root / "mqtt", self.port, None, self.root / "logs")

    def stop(self) -> None:
        mqtt_server.down(self.info)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        assert self.info is not None
        return str(self.info["url"])


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if not mqtt_server.installed():
        pytest.fail("mosquitto is not installed: `make sysdeps` (apt-get install mosquitto)")
    m = Mosquitto(tmp_path / "mosq")
    m.start()
    try:
        yield m
    finally:
        m.stop()
        shutil.rmtree(m.root, ignore_errors=True)


class Subscriber:
    """A persistent-session QoS 1 subscriber that records (topic, payload, retain) of what arrives."""

    def __init__(self, url: str, topic: str, client_id: str, *, clean_session: bool = False) -> None:
        from infra.mqtt import make_client

        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.subscribed = threading.Event()

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self.subscribed.set()

        def on_message(_c: Any, _u: Any, m: Any) -> None:
            with self._cond:
                self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
                self._cond.notify_all()

        self.client = make_client(url, client_id, clean_session=clean_session, on_connect=on_connect,
                                  on_message=on_message, on_subscribe=on_subscribe)
        assert self.subscribed.wait(10), "subscription not acknowledged"

    def wait(self, pred: Any, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not pred(self.messages):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def close(self) -> None:
        from infra.mqtt import close

        close(self.client)
