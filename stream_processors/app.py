"""The stream processors on Kafka: each processor consumes ``inspections`` in its own consumer group
(``stream-rates``, ``stream-spc``, ``stream-parts``, ``stream-drift``) and publishes to its topic.

``sqis stream run`` hosts several of them in one process (a thread each, still one group each):
one process to deploy and watch, while each processor keeps its own offsets and can be scaled or
restarted alone with ``sqis stream rates|spc|parts|drift``. Processors built on the project's
confluent-kafka loop rather than faust: see docs/DESIGN.md ("Stream processors") for why.

State is in memory and bounded (windows and parts expire). Offsets are committed only up to the
first frame still held in open state (``hold_since_us``), so a restart re-reads what the open
windows and parts held and rebuilds them in full; a stop does not emit half windows. Windows that
had closed may be re-emitted with part of their frames: the sinks upsert by natural key and a window
keeps its largest count, so a replay converges on the same rows (at-least-once, idempotent sinks).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from infra.consume_loop import ConsumeLoop
from infra.kafka import Message
from infra.metrics import ALERTS_FIRED
from infra.settings import ConfigError, Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import source_label
from schemas.serde import SchemaError, deserialize, serde_for
from stream_processors.processors import Output
from stream_processors.spc import Baseline

log = logging.getLogger(__name__)

PROCESSORS = ("rates", "spc", "parts", "drift")
SCHEMA_OF = {"defect_rates": "defect_rate", "alerts": "alert", "part_verdicts": "part_verdict"}


class Processor(Protocol):
    name: str

    def handle(self, rec: dict[str, Any], now: float, source: Any = None) -> list[Output]: ...
    def tick(self, now: float) -> list[Output]: ...
    def flush(self) -> list[Output]: ...
    def hold_since_us(self) -> int | None: ...
    def metrics(self) -> dict[str, int]: ...


class ProcessorRunner:
    """One processor on one consumer group: decode -> handle -> publish -> commit."""

    def __init__(self, settings: Settings, processor: Processor, *, group_id: str | None = None,
                 stop_event: threading.Event | None = None, on_output: Callable[[Output], None] | None = None) -> None:
        self.settings = settings
        self.processor = processor
        self.catalog = TopicCatalog(settings.topic_prefix)
        self.group_id = group_id or f"stream-{processor.name}"
        self.on_output = on_output
        self.undecodable = 0
        self.published = 0
        self.loop = ConsumeLoop(settings, topics=[self.catalog.inspections], group_id=self.group_id,
                                client_id=f"{self.group_id}-{uuid.uuid4().hex[:6]}", on_batch=self._batch,
                                on_tick=self._tick, on_stop=self._stop, stop_event=stop_event,
                                commit_filter=self._committable, on_assign=self._assigned, on_revoke=self._revoked,
                                # open windows cannot take a replay of a failed batch: a failed output
                                # delivery ends the runner (LoopError, exit 1); a restart rebuilds the
                                # state from the committed offsets
                                retry_failed=False, name=f"stream {processor.name}")
        # per partition, (offset, captured_at) of the frames since the last committed offset
        self._seen: dict[tuple[str, int], deque[tuple[int, int]]] = {}
        self._last_metrics = time.monotonic()

    def _publish(self, outs: list[Output]) -> None:
        for topic_key, key, rec in outs:
            s = serde_for(SCHEMA_OF[topic_key])
            self.loop.produce(self.catalog.name(topic_key), key, s.encode(rec), s.headers(rec))
            self.published += 1
            if topic_key == "alerts" and rec.get("state") == "open":
                ALERTS_FIRED.labels(rec.get("kind", ""), rec.get("line_id", "")).inc()
            if self.on_output is not None:
                self.on_output((topic_key, key, rec))

    def _batch(self, msgs: list[Message], _loop: Any) -> None:
        now = time.monotonic()
        for m in msgs:
            ts = 0
            try:
                rec = deserialize("inspection", m.value(), m.headers())
                ts = int(rec["captured_at"])
            except SchemaError as exc:
                # the inspections sink dead-letters these; here they are counted and skipped
                self.undecodable += 1
                log.warning("undecodable inspection skipped", extra={
                    "at": source_label(m.topic(), m.partition(), m.offset()), "error": str(exc),
                    "processor": self.processor.name})
                continue
            finally:
                self._seen.setdefault((m.topic(), m.partition()), deque()).append((m.offset(), ts))
            self._publish(self.processor.handle(rec, now, m.partition()))

    def _windows(self) -> Any:
        return getattr(self.processor, "windows", None)

    def _assigned(self, partitions: list[Any]) -> None:
        w = self._windows()
        if w is not None:
            for tp in partitions:
                w.register_source(tp.partition, time.monotonic())

    def _revoked(self, partitions: list[Any]) -> None:
        w = self._windows()
        for tp in partitions:
            self._seen.pop((tp.topic, tp.partition), None)
            if w is not None:
                w.forget_source(tp.partition)

    def _committable(self, consumed: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Per partition, the offset of the first frame that open state still holds (or all consumed)."""
        hold = self.processor.hold_since_us()
        out: dict[tuple[str, int], int] = {}
        for tp, nxt in consumed.items():
            q = self._seen.get(tp)
            while q and (hold is None or q[0][1] < hold):
                q.popleft()
            out[tp] = q[0][0] if q else nxt
        return out

    def _tick(self, _loop: Any) -> None:
        now = time.monotonic()
        self._publish(self.processor.tick(now))
        if now - self._last_metrics >= 60:
            self._last_metrics = now
            log.info("processor metrics", extra={"processor": self.processor.name, "group": self.group_id,
                                                 "published": self.published, "undecodable": self.undecodable,
                                                 **self.processor.metrics()})

    def _stop(self, _loop: Any) -> None:
        pass  # open state is not flushed: its offsets are uncommitted and the next run rebuilds it

    def run(self, max_idle_s: float | None = None) -> None:
        self.loop.run(max_idle_s=max_idle_s)


def load_baselines(settings: Settings) -> dict[tuple[str, str], Baseline]:
    """SPC baselines from PostgreSQL (``sqis spc baseline``); none when no database is configured."""
    try:
        dsn = settings.dsn()
    except ConfigError:
        return {}
    from infra.db import connect

    with connect(dsn) as conn:
        rows = conn.execute("SELECT line_id, class_name, p_bar, frames, fails, sigma_z FROM spc_baselines").fetchall()
    return {(r[0], r[1]): Baseline(float(r[2]), int(r[3]), int(r[4]), float(r[5]), "baseline") for r in rows}


class ProcessorMetrics:
    """A Prometheus collector reading each runner's counters on scrape: ``sqis_stream_<name>{processor}``
    (late_frames, too_old, processed, alerts_opened, open_parts, incomplete, published, undecodable...)."""

    def __init__(self, runners: list[ProcessorRunner]) -> None:
        self.runners = runners

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        families: dict[str, Any] = {}
        for r in self.runners:
            values = {**r.processor.metrics(), "published": r.published, "undecodable": r.undecodable}
            for name, v in values.items():
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = GaugeMetricFamily(f"sqis_stream_{name}", f"stream processor {name}",
                                                             labels=["processor"])
                fam.add_metric([r.processor.name], float(v))
        yield from families.values()


def serve_metrics(settings: Settings, runners: list[ProcessorRunner]) -> Any:
    """Register the collector and serve /metrics, /healthz (every processor's loop turned within a
    minute) and /readyz (every consumer is up) on ``settings.metrics_port`` (None: nothing)."""
    import time

    from prometheus_client import REGISTRY

    from infra.metrics import serve

    collector = ProcessorMetrics(runners)
    REGISTRY.register(collector)
    server = serve(settings.metrics_port,
                   live=lambda: all(time.monotonic() - r.loop.last_poll < 60 for r in runners),
                   ready=lambda: all(getattr(r.loop, "consumer", None) is not None for r in runners))
    return collector, server


def run_processors(settings: Settings, processors: list[Processor], stop_event: threading.Event,
                   max_idle_s: float | None = None) -> list[ProcessorRunner]:
    """Run each processor in its own thread (own consumer group) until ``stop_event``; re-raises the
    first failure after stopping the others. Their counters are Prometheus metrics while they run."""
    from prometheus_client import REGISTRY

    runners = [ProcessorRunner(settings, p, stop_event=stop_event) for p in processors]
    collector, server = serve_metrics(settings, runners)
    errors: list[BaseException] = []

    def target(r: ProcessorRunner) -> None:
        try:
            r.run(max_idle_s=max_idle_s)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            log.error("processor failed", extra={"processor": r.processor.name, "error": str(exc)})
            errors.append(exc)
            stop_event.set()

    threads = [threading.Thread(target=target, args=(r,), name=f"stream-{r.processor.name}", daemon=True)
               for r in runners]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    finally:
        REGISTRY.unregister(collector)
        if server is not None:
            server.close()
    if errors:
        raise errors[0]
    return runners
