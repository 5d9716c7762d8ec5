"""Topic configs from schemas/catalog.py on the real broker: set on creation, drift reported by
`verify_topics` / `sqis topics verify`, repaired by `create_topics`."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from infra.kafka import admin_client, create_topics, verify_topics
from schemas.catalog import TOPICS, TopicCatalog
from sqis.cli import run


def _set(s: Any, topic: str, key: str, value: str) -> None:
    res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)])
    admin = admin_client(s)  # held: the futures fail once the client is destroyed
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(timeout=10)


def _settled(s: Any, n: int) -> list[Any]:
    """verify_topics once it reports ``n`` differences (or after 15 s): the broker applies config
    changes to its metadata asynchronously, so a describe right after an alter can read the old value."""
    deadline = time.monotonic() + 15
    while True:
        drift = verify_topics(s)
        if len(drift) == n or time.monotonic() > deadline:
            return drift
        time.sleep(0.1)


def _verify_cli(s: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, Any]]]:
    rc = run(["topics", "verify", "--json", "--bootstrap", s.bootstrap(), "--topic-prefix", s.topic_prefix])
    return rc, json.loads(capsys.readouterr().out)


def test_catalog_configs_for_production_replication() -> None:
    t = TOPICS["frames"]
    assert "min.insync.replicas" not in t.configs(1)
    assert t.configs(3) == {"retention.ms": str(t.retention_ms), "max.message.bytes": str(t.max_message_bytes),
                            "cleanup.policy": "delete", "min.insync.replicas": "2"}


def test_drift_is_reported_then_repaired(settings_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = settings_factory()
    cat = TopicCatalog(s.topic_prefix)
    assert verify_topics(s) == []
    assert _verify_cli(s, capsys) == (0, [])

    _set(s, cat.frames, "retention.ms", "60000")
    _set(s, cat.inspections, "cleanup.policy", "compact")
    got = {(d.topic, d.item, d.expected, d.actual) for d in _settled(s, 2)}
    assert got == {(cat.frames, "retention.ms", str(TOPICS["frames"].retention_ms), "60000"),
                   (cat.inspections, "cleanup.policy", "delete", "compact")}
    rc, doc = _verify_cli(s, capsys)
    assert rc == 3 and {(d["topic"], d["item"], d["actual"]) for d in doc} == {
        (cat.frames, "retention.ms", "60000"), (cat.inspections, "cleanup.policy", "compact")}

    assert create_topics(s) == []  # nothing new: the drifted configs are set back
    assert _settled(s, 0) == []


def test_missing_topics_and_partition_counts_are_reported(settings_factory: Any) -> None:
    s = settings_factory(partitions={"frames": 2})
    assert [(d.item, d.expected, d.actual) for d in verify_topics(s)] == [
        ("partitions", str(TOPICS["frames"].partitions), "2")]
    assert verify_topics(s, partitions={"frames": 2}) == []
    bare = settings_factory(create_topics=False)
    missing = verify_topics(bare)
    assert {d.topic for d in missing} == {n for n, _ in TopicCatalog(bare.topic_prefix).all()}
    assert {d.item for d in missing} == {"exists"}
