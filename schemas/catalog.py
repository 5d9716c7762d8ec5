"""The topic catalog: every topic's name, partitions, key and value schema, declared once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """One Kafka topic of the system."""

    key: str  # logical name used in code, e.g. "frames"
    name: str  # base topic name on the broker (before any prefix)
    partitions: int
    key_field: str  # the record field the message key is taken from
    schema: str  # Avro schema name in schemas/avro (without .avsc)
    doc: str
    retention_ms: int = 7 * 24 * 3600 * 1000
    max_message_bytes: int = 1024 * 1024  # topic max.message.bytes
    cleanup_policy: str = "delete"

    def full_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}"

    def configs(self, replication: int = 1) -> dict[str, str]:
        """The topic-level configs the broker must hold for this topic (set on creation, repaired on drift).

        With replicas (production) an acknowledged write (acks=all) must be on at least two of them:
        ``min.insync.replicas`` is set to ``min(2, replication - 1)``; one replica leaves the broker default.
        """
        out = {"retention.ms": str(self.retention_ms), "max.message.bytes": str(self.max_message_bytes),
               "cleanup.policy": self.cleanup_policy}
        if replication > 1:
            out["min.insync.replicas"] = str(min(2, replication - 1))
        return out


TOPICS: dict[str, Topic] = {
    t.key: t
    for t in (
        Topic("frames", "frames", 12, "camera_id", "frame_ref",
              "FrameRefs from the cameras; a reference to the object store, never pixels"),
        Topic("inspections", "inspections", 12, "camera_id", "inspection",
              "one Inspection per frame: verdict, detections, model version, timings",
              max_message_bytes=4 * 1024 * 1024),
        Topic("inspections_shadow", "inspections.shadow", 12, "camera_id", "inspection",
              "the challenger's Inspection of a sampled share of frames (shadow: never a verdict, never to MES)",
              retention_ms=3 * 24 * 3600 * 1000, max_message_bytes=4 * 1024 * 1024),
        Topic("frames_dlq", "frames.dlq", 3, "original_key", "frame_dlq",
              "frames that could not be inspected, with the original bytes (truncated past 256 KiB) and the reason",
              max_message_bytes=1024 * 1024),
        Topic("defect_rates", "defect-rates", 6, "line_id", "defect_rate",
              "defect numbers per event-time window for a line, camera or class (stream processors)"),
        Topic("alerts", "alerts", 3, "alert_id", "alert",
              "alert states (SPC, threshold, drift): open -> acknowledged -> resolved"),
        Topic("part_verdicts", "part-verdicts", 6, "part_id", "part_verdict",
              "one verdict per part over all its camera views (OK / NG / INCOMPLETE), for MES"),
    )
}


def topic_for_schema(schema: str) -> Topic:
    """The one catalog topic whose values use Avro schema ``schema``."""
    for t in TOPICS.values():
        if t.schema == schema:
            return t
    raise KeyError(f"no topic in the catalog carries schema {schema!r}")


@dataclass(frozen=True)
class TopicCatalog:
    """The catalog bound to a deployment's topic prefix (tests use a unique prefix each)."""

    prefix: str = ""

    def name(self, key: str) -> str:
        return TOPICS[key].full_name(self.prefix)

    def topic(self, key: str) -> Topic:
        return TOPICS[key]

    def all(self) -> list[tuple[str, Topic]]:
        return [(t.full_name(self.prefix), t) for t in TOPICS.values()]

    @property
    def frames(self) -> str:
        return self.name("frames")

    @property
    def inspections(self) -> str:
        return self.name("inspections")

    @property
    def inspections_shadow(self) -> str:
        return self.name("inspections_shadow")

    @property
    def frames_dlq(self) -> str:
        return self.name("frames_dlq")

    @property
    def defect_rates(self) -> str:
        return self.name("defect_rates")

    @property
    def alerts(self) -> str:
        return self.name("alerts")

    @property
    def part_verdicts(self) -> str:
        return self.name("part_verdicts")
