"""ConsumeLoop against the real broker: a failed batch is rewound, paused and retried (one outage,
nothing committed meanwhile), offsets are committed on an interval and on close; the transactional
strategy commits outputs and offsets together and an aborted batch leaves no visible output."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from infra.consume_loop import ConsumeLoop, RetryLater, TransactionalCommit
from infra.kafka import Consumer, TopicPartition, producer
from schemas.catalog import TopicCatalog
from tests.test_sink_faults import _wait


def _feed(s: Any, topic: str, n: int) -> None:
    p = producer(s, client_id="test")
    for i in range(n):
        p.produce(topic, value=f"m{i}".encode(), key=b"k", partition=0)
    assert p.flush(30) == 0


def _committed(s: Any, group: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": s.bootstrap(), "group.id": group, "log_level": 0})
    try:
        return int(c.committed([TopicPartition(topic, 0)], timeout=10)[0].offset)
    finally:
        c.close()


def test_failed_batch_is_rewound_paused_and_retried(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory()
    topic = TopicCatalog(s.topic_prefix).inspections
    group = f"g-{unique_id}"
    _feed(s, topic, 5)
    seen: list[bytes] = []
    down = {"left": 2}  # the output refuses the first two tries

    def on_batch(msgs: list[Any], _loop: Any) -> None:
        if down["left"]:
            down["left"] -= 1
            raise RetryLater("test output down")
        seen.extend(m.value() for m in msgs)

    loop = ConsumeLoop(s, topics=[topic], group_id=group, client_id=group, on_batch=on_batch, batch_size=5,
                       max_wait_s=0.3, with_producer=False, max_backoff_s=0.5, name="test loop")
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        assert _wait(lambda: loop.stats.outages == 1 and loop.stats.failed_batches >= 1, 30), loop.stats
        assert _committed(s, group, topic) < 0  # nothing committed while the output is down
        assert _wait(lambda: len(seen) == 5, 30), (seen, loop.stats)
    finally:
        loop.stop()
        t.join(30)
    assert not t.is_alive()
    assert seen == [f"m{i}".encode() for i in range(5)]  # rewound to the batch's start, each once through
    st = loop.stats
    assert st.outages == 1 and st.failed_batches == 2 and st.batches == 1 and st.paused_s > 0, st
    assert _committed(s, group, topic) == 5


def test_transactional_commit_aborts_a_failed_batch(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory()
    cat = TopicCatalog(s.topic_prefix)
    group = f"g-{unique_id}"
    _feed(s, cat.inspections, 3)
    tries = {"n": 0}

    def on_batch(msgs: list[Any], loop: ConsumeLoop) -> None:
        tries["n"] += 1
        for m in msgs:
            loop.produce(cat.alerts, "k", b"try%d-" % tries["n"] + m.value(), None)
        if tries["n"] == 1:
            raise RetryLater("test: fail after producing")

    loop = ConsumeLoop(s, topics=[cat.inspections], group_id=group, client_id=group, on_batch=on_batch,
                       batch_size=3, max_wait_s=0.3, max_backoff_s=0.5,
                       strategy=TransactionalCommit(f"tx-{unique_id}"))
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        assert _wait(lambda: loop.stats.batches == 1, 60), loop.stats
    finally:
        loop.stop()
        t.join(30)
    assert loop.stats.outages == 1 and loop.stats.commits == 1
    assert _committed(s, group, cat.inspections) == 3  # committed inside the transaction
    c = Consumer({"bootstrap.servers": s.bootstrap(), "group.id": f"r-{unique_id}", "log_level": 0,
                  "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    try:
        c.subscribe([cat.alerts])
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            got += [m.value() for m in c.consume(10, 0.5) if m.error() is None]
    finally:
        c.close()
    assert got == [b"try2-m0", b"try2-m1", b"try2-m2"]  # the aborted try's outputs are invisible


def test_loop_error_is_one_line_and_exit_1(capsys: Any) -> None:
    """A loop that cannot go on (e.g. a processor's output undeliverable) ends the CLI with one line."""
    import typer
    from typer.main import get_command

    from infra.consume_loop import LoopError
    from sqis.cli import run

    app = typer.Typer()

    @app.command()
    def fail() -> None:
        raise LoopError("stream rates: output delivery failed for 1 record(s): x -> t.alerts: refused")

    @app.command()
    def other() -> None:  # two commands, so typer keeps the command name
        pass

    assert run(["fail"], command=get_command(app)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: LoopError: stream rates: output delivery failed"), err


class _MemberlessConsumer:
    """A consumer stand-in: never delivers; ``member`` None is a librdkafka client out of its group."""

    def __init__(self, member: str | None) -> None:
        self.member, self.closed, self.topics = member, False, None

    def subscribe(self, topics: list[str], **_callbacks: Any) -> None:
        self.topics = topics

    def memberid(self) -> str | None:
        return self.member

    def consume(self, _n: int, timeout: float) -> list[Any]:
        time.sleep(min(timeout, 0.01))
        return []

    def assignment(self) -> list[Any]:
        return []

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("broker_answers", [True, False])
def test_a_consumer_that_never_rejoins_is_made_anew(broker_answers: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client left out of its group (librdkafka with no usable broker after a one-node broker restart)
    while the broker answers fresh clients is closed and subscribed anew; during an outage it is left to
    rejoin by itself."""
    import infra.consume_loop as cl
    from infra.settings import Settings

    made: list[_MemberlessConsumer] = []

    def make(_settings: Any, **_kw: Any) -> _MemberlessConsumer:
        made.append(_MemberlessConsumer(None if not made else "member-2"))  # the first one is wedged
        return made[-1]

    monkeypatch.setattr(cl, "make_consumer", make)
    monkeypatch.setattr(cl, "_broker_answers", lambda _s: broker_answers)
    for name, value in (("CHECK_EVERY_S", 0.02), ("PROBE_EVERY_S", 0.02), ("REJOIN_GRACE_S", 0.1)):
        monkeypatch.setattr(cl, name, value)
    s = Settings(kafka_bootstrap="127.0.0.1:1", kafka_rejoin_timeout_s=0.2)
    loop = ConsumeLoop(s, topics=["t"], group_id="g", client_id="c", on_batch=lambda *_: None, with_producer=False)
    loop.run(max_idle_s=1.0)
    if broker_answers:
        assert loop.recreated == 1 and len(made) == 2
        assert made[0].closed and made[1].topics == ["t"] and made[1].closed
    else:
        assert loop.recreated == 0 and len(made) == 1
