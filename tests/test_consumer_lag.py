"""Consumer lag on the real broker: exact after the group stopped, 0 once drained, open transactions
not counted (last stable offset), a trailing commit marker not counted; the same numbers on /metrics
(LagExporter) and from `sqis lag --json`."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from infra.kafka import consumer, producer
from infra.metrics import LagExporter, read_lag
from schemas.catalog import TopicCatalog
from sqis.cli import run


def _publish(s: Any, topic: str, per_partition: dict[int, int], **conf: Any) -> Any:
    p = producer(s, client_id="lag-test", **conf)
    if "transactional.id" in conf:
        p.init_transactions(15)
        p.begin_transaction()
    for part, n in per_partition.items():
        for i in range(n):
            p.produce(topic, value=b"x", key=str(i).encode(), partition=part)
    assert p.flush(15) == 0
    return p


def _drain(s: Any, group: str, topic: str, n: int, **conf: Any) -> None:
    """What a worker does: consume, store offset + 1 of each processed record, commit, close."""
    c = consumer(s, group_id=group, client_id=f"{group}-drain", **conf)
    c.subscribe([topic])
    got, deadline = 0, time.monotonic() + 30
    try:
        while got < n and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            c.store_offsets(msg)
            got += 1
        assert got == n
        c.commit(asynchronous=False)
    finally:
        c.close()


def _by_partition(lags: list[Any]) -> dict[int, int]:
    return {p.partition: p.lag for p in lags}


def _gauge_sum(reg: CollectorRegistry, group: str) -> float:
    return sum(s.value for m in reg.collect() if m.name == "sqis_consumer_lag" for s in m.samples
               if s.labels["group"] == group)


def _eventually(fn: Any, want: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while (got := fn()) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_lag_is_exact_while_the_group_is_stopped_and_zero_once_drained(
        settings_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = settings_factory(partitions={"frames": 3})
    frames = TopicCatalog(s.topic_prefix).frames
    group = f"inference-workers-{uuid.uuid4().hex[:6]}"
    _publish(s, frames, {0: 2, 1: 1, 2: 3})
    _drain(s, group, frames, 6)  # the workers ran, committed, and stopped
    assert _by_partition(read_lag(s, {group: [frames]})) == {0: 0, 1: 0, 2: 0}

    _publish(s, frames, {0: 4, 2: 5})  # N = 9 frames while no consumer runs
    lags = read_lag(s, {group: [frames]})
    assert _by_partition(lags) == {0: 4, 1: 0, 2: 5}
    assert {(p.partition, p.committed, p.high) for p in lags} == {(0, 2, 6), (1, 1, 1), (2, 3, 8)}

    reg = CollectorRegistry()
    exporter = LagExporter(s, group, [frames], registry=reg, interval_s=0.2)
    try:
        assert _eventually(lambda: _gauge_sum(reg, group), 9.0) == 9.0
        assert run(["lag", "--json", "--bootstrap", s.bootstrap(), "--topic-prefix", s.topic_prefix,
                    "--group", group]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert Counter({d["partition"]: d["lag"] for d in doc}) == Counter({0: 4, 1: 0, 2: 5})

        _drain(s, group, frames, 9)  # a worker starts again and drains
        assert _by_partition(read_lag(s, {group: [frames]})) == {0: 0, 1: 0, 2: 0}
        assert _eventually(lambda: _gauge_sum(reg, group), 0.0) == 0.0
        assert exporter.last_error is None
    finally:
        exporter.close()
    assert not [m for m in reg.collect() if m.name == "sqis_consumer_lag"]  # unregistered on close


def test_open_transactions_and_commit_markers_are_not_lag(settings_factory: Any) -> None:
    s = settings_factory(partitions={"inspections": 2})
    topic = TopicCatalog(s.topic_prefix).inspections
    group = f"sink-postgres-{uuid.uuid4().hex[:6]}"
    p = _publish(s, topic, {0: 3, 1: 2}, **{"transactional.id": f"lag-test-{group}"})
    # open: nothing can be consumed yet (the end is the last stable offset, 0)
    assert _by_partition(read_lag(s, {group: [topic]})) == {0: 0, 1: 0}
    p.commit_transaction(15)
    # 3 + 2 records and one marker each; a group that never committed starts at the low watermark
    assert _by_partition(read_lag(s, {group: [topic]})) == {0: 4, 1: 3}
    _drain(s, group, topic, 5, **{"isolation.level": "read_committed"})
    lags = read_lag(s, {group: [topic]})
    assert {(x.partition, x.committed, x.high, x.lag) for x in lags} == {(0, 3, 4, 0), (1, 2, 3, 0)}


def test_a_sink_process_exports_the_lag_of_its_own_group(settings_factory: Any, tmp_path: Any) -> None:
    """`sqis sink postgres` with a metrics port: sqis_consumer_lag of its group on each inspections
    partition, following its commits (3 undecodable records: dead-lettered, committed, lag 0)."""
    import os
    import signal
    import subprocess
    import urllib.request

    from infra.stack import free_port
    from sqis.bench.harness import settings_env
    from tests.deploy_helpers import REPO, clean_env, sqis_cmd

    s = settings_factory(partitions={"inspections": 2}, lag_interval_s=0.3)
    topic = TopicCatalog(s.topic_prefix).inspections
    group = f"sink-postgres-{uuid.uuid4().hex[:6]}"
    _publish(s, topic, {0: 3})
    port = free_port()
    env = clean_env() | settings_env(s) | {"PYTHONPATH": str(REPO)}
    log = tmp_path / "sink.log"
    proc = subprocess.Popen([*sqis_cmd(), "sink", "postgres", "--group", group, "--metrics-port", str(port),
                             "--max-wait-ms", "100"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))

    def series() -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return out
        for line in text.splitlines():
            for name in ("sqis_consumer_lag", "sqis_consumer_committed_offset"):
                if line.startswith(name + "{") and f'group="{group}"' in line and f'topic="{topic}"' in line:
                    part = line.split('partition="')[1].split('"')[0]
                    out[(name, part)] = float(line.rsplit(" ", 1)[1])
        return out

    want = {("sqis_consumer_lag", "0"): 0.0, ("sqis_consumer_lag", "1"): 0.0,
            ("sqis_consumer_committed_offset", "0"): 3.0, ("sqis_consumer_committed_offset", "1"): -1.0}
    try:
        got = _eventually(series, want, timeout_s=45)
        assert proc.poll() is None, log.read_text()[-2000:]
        assert got == want, log.read_text()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
