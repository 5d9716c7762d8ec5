"""ConsumeLoop against the real broker: a failed batch is rewound, paused and retried (one outage,
nothing committed meanwhile), offsets are committed on an interval and on close; the transactional
strategy commits outputs and offsets together and an aborted batch leaves no visible output."""

from __future__ import annotations

import threading
import time
from typing import Any

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
