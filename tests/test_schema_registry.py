"""#19: the registry contract. Confluent wire format against the stack's Apicurio Registry, the schema
history registered in order with BACKWARD_TRANSITIVE, an incompatible change refused (locally and by
the registry), a rollout topic with both framings, CloudEvents headers, the AsyncAPI document, and a
stock Java consumer (kafka-clients + Apache Avro) reading every topic."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from schemas import serde
from schemas.catalog import TOPICS, TopicCatalog
from schemas.registry import (
    check_backward_transitive,
    incompatibilities,
    subject_for,
    subjects_with_history,
)

ROOT = Path(__file__).resolve().parent.parent
JAVA_DIR = ROOT / "docs" / "examples" / "mes-consumer-java"
JAVA_JAR = JAVA_DIR / "target" / "mes-consumer-1.0.jar"


def sample(schema: Any, names: dict[str, Any] | None = None, seed: str = "x") -> Any:
    """A valid value of an Avro schema: defaults where given, else a value of each field's type."""
    names = {} if names is None else names
    if isinstance(schema, str):
        if schema in names:
            return sample(names[schema], names, seed)
        return {"null": None, "boolean": True, "int": 7, "long": 1_765_000_000_000_000, "float": 0.5,
                "double": 0.25, "string": seed, "bytes": b"\x01\x02"}[schema]
    if isinstance(schema, list):
        return sample(next((b for b in schema if b != "null"), "null"), names, seed)
    t = schema["type"]
    if t == "record":
        names[schema["name"]] = schema
        if "namespace" in schema:
            names[f"{schema['namespace']}.{schema['name']}"] = schema
        return {f["name"]: (f["default"] if "default" in f and f["default"] is not None
                            else sample(f["type"], names, f"{f['name']}-{seed}")) for f in schema["fields"]}
    if t == "enum":
        names[schema["name"]] = schema
        return schema["symbols"][0]
    if t == "array":
        return [sample(schema["items"], names, seed)]
    if t == "map":
        return {"k": sample(schema["values"], names, seed)}
    if t == "fixed":
        return b"\x00" * schema["size"]
    return sample(t, names, seed)


def record_for(schema_name: str, tag: str) -> dict[str, Any]:
    rec = sample(json.loads(serde.history_json(schema_name)[-1]), seed=tag)
    for field in ("frame_id", "alert_id", "part_id"):
        if field in rec:
            rec[field] = f"{field}-{tag}"
    return rec


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


# ---- without a stack -----------------------------------------------------------------------------


def test_every_subject_history_is_backward_transitive_locally() -> None:
    subjects = dict(subjects_with_history())
    assert set(subjects) == {f"{t.name}-value" for t in TOPICS.values()}
    for subject, versions in subjects.items():
        assert check_backward_transitive(versions) == [], subject
    assert subject_for("inspection") == "inspections-value"


def test_local_check_refuses_incompatible_changes() -> None:
    """The check `make test` runs: what BACKWARD_TRANSITIVE refuses is refused here first."""
    versions = list(serde.history_json("inspection"))
    cur = json.loads(versions[-1])

    def changed(edit: Any) -> list[str]:
        new = json.loads(versions[-1])
        edit(new)
        return check_backward_transitive([*versions, json.dumps(new)])

    assert changed(lambda s: s["fields"].append({"name": "shift", "type": "string", "default": "A"})) == []
    no_default = changed(lambda s: s["fields"].append({"name": "shift", "type": "string"}))
    assert no_default and all("shift: new field without a default" in p for p in no_default)
    retyped = changed(lambda s: s["fields"][0].update(type="int"))  # frame_id: string -> int
    assert any("frame_id: type changed from string to int" in p for p in retyped)
    # reading v1 data with the current schema stays possible; the other way round is not checked
    assert incompatibilities(cur, versions[0]) == []


def test_cloudevents_binary_mode_headers() -> None:
    rec = record_for("inspection", "ce")
    rec.update(line_id="line-2", camera_id="cam-7", inspected_at=1_765_000_000_123_000)
    h = dict(serde.Serde("inspection").cloudevent_headers(rec))
    assert h == {"ce_specversion": b"1.0", "ce_id": b"frame_id-ce", "ce_source": b"/lines/line-2/cameras/cam-7",
                 "ce_type": b"sqis.inspection.v2", "ce_time": b"2025-12-06T05:46:40.123Z",
                 "content-type": b"application/avro"}
    alert = dict(serde.Serde("alert").cloudevent_headers(record_for("alert", "a")))
    assert alert["ce_id"] == b"alert_id-a" and alert["ce_type"] == b"sqis.alert.v1"
    part = dict(serde.Serde("part_verdict").cloudevent_headers(record_for("part_verdict", "p")))
    assert part["ce_id"] == b"part_id-p" and part["ce_type"] == b"sqis.part-verdict.v1"


def test_asyncapi_document_is_valid_and_matches_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    import jsonschema
    import yaml

    from schemas import asyncapi

    spec = json.loads((ROOT / "tests" / "data" / "asyncapi-3.0.0.schema.json").read_text())
    on_disk = (ROOT / "docs" / "asyncapi.yaml").read_text()
    assert on_disk == asyncapi.render(), "docs/asyncapi.yaml is stale: run `sqis schemas asyncapi`"
    doc = yaml.safe_load(on_disk)
    errors = [e.message for e in jsonschema.Draft7Validator(spec).iter_errors(doc)]
    assert errors == []
    for t in TOPICS.values():
        ch = doc["channels"][t.key]
        assert ch["address"] == t.name and ch["bindings"]["kafka"]["partitions"] == t.partitions
        assert ch["bindings"]["kafka"]["topicConfiguration"]["retention.ms"] == t.retention_ms
        assert ch["x-sqis"]["key"] == t.key_field and ch["x-sqis"]["dedupe-key"]
        msg = doc["components"]["messages"][t.schema]
        assert msg["payload"]["schema"] == json.loads(serde.history_json(t.schema)[-1])
    assert "exactly-once for read_committed" in doc["channels"]["inspections"]["x-sqis"]["delivery"]
    # a catalog change the document does not carry is caught
    import dataclasses

    monkeypatch.setitem(TOPICS, "inspections", dataclasses.replace(TOPICS["inspections"], partitions=24))
    assert asyncapi.render() != on_disk


# ---- against the session stack's registry --------------------------------------------------------


def test_registry_holds_the_history_in_order_backward_transitive(local_stack: Any) -> None:
    url = local_stack.info["registry"]["url"]
    assert url.endswith("/apis/ccompat/v7")
    for subject, versions in subjects_with_history():
        assert _get(f"{url}/subjects/{subject}/versions") == list(range(1, len(versions) + 1))
        assert _get(f"{url}/config/{subject}")["compatibilityLevel"] == "BACKWARD_TRANSITIVE"
        for n, text in enumerate(versions, 1):
            got = _get(f"{url}/subjects/{subject}/versions/{n}")["schema"]
            assert json.loads(got) == json.loads(text)


def test_registry_refuses_an_incompatible_schema(local_stack: Any) -> None:
    from infra.registry_server import RegistryRefused, _http

    url = local_stack.info["registry"]["url"]
    bad = json.loads(serde.history_json("inspection")[-1])
    bad["fields"].append({"name": "shift", "type": "string"})  # no default: old data unreadable
    with pytest.raises(RegistryRefused) as exc:
        _http("POST", f"{url}/subjects/inspections-value/versions", {"schema": json.dumps(bad), "schemaType": "AVRO"})
    assert exc.value.status == 409
    assert _get(f"{url}/subjects/inspections-value/versions") == [1, 2]  # nothing was added
    assert check_backward_transitive([*serde.history_json("inspection"), json.dumps(bad)])  # and locally


def test_rollout_topic_with_both_framings(settings_factory: Any, local_stack: Any) -> None:
    """Old (sqis-schema header) and new (Confluent) records on one topic: readers decode both,
    `sqis schemas format` reports the mix."""
    from infra.kafka import consumer, producer, topic_wire_formats

    s = settings_factory()
    topic = TopicCatalog(s.topic_prefix).inspections
    url = local_stack.info["registry"]["url"]
    recs = [record_for("inspection", f"r{i}") for i in range(6)]
    p = producer(s, client_id="rollout")
    try:
        for i, rec in enumerate(recs):
            serde.configure(None if i % 2 == 0 else url)  # an old and a new producer, interleaved
            value, headers = serde.serialize("inspection", rec)
            assert serde.wire_format(value, headers) == ("sqis-header" if i % 2 == 0 else "confluent")
            p.produce(topic, key=rec["camera_id"], value=value, headers=headers)
        p.flush(10)
    finally:
        serde.configure(url)
    c = consumer(s, group_id=f"rollout-{uuid.uuid4().hex[:6]}", client_id="rollout")
    c.subscribe([topic])
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    try:
        while len(got) < len(recs) and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(serde.deserialize("inspection", m.value(), m.headers()))
    finally:
        c.close()
    assert sorted(r["frame_id"] for r in got) == sorted(r["frame_id"] for r in recs)
    assert {r["frame_id"]: r for r in got}["frame_id-r1"] == recs[1]
    assert topic_wire_formats(s, topic) == {"confluent": 3, "sqis-header": 3, "unknown": 0}


def _java_jar() -> Path:
    if not (shutil.which("java") and shutil.which("mvn")):
        pytest.skip("no java/mvn: `make sysdeps-test` installs them")
    if not JAVA_JAR.is_file() or not (JAVA_DIR / "target" / "lib").is_dir():
        if not shutil.which("javac"):
            pytest.skip("no javac to build docs/examples/mes-consumer-java: `make sysdeps-test` installs a JDK")
        r = subprocess.run(["mvn", "-q", "-B", "package", "-DskipTests"], cwd=JAVA_DIR, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    return JAVA_JAR


def test_stock_java_consumer_reads_every_topic(settings_factory: Any, local_stack: Any) -> None:
    """kafka-clients + Apache Avro (no project code) read one record of every topic from the stack."""
    from infra.kafka import producer

    jar = _java_jar()
    s = settings_factory()
    cat = TopicCatalog(s.topic_prefix)
    url = local_stack.info["registry"]["url"]
    sent: dict[str, dict[str, Any]] = {}
    p = producer(s, client_id="java-contract")
    for key, t in TOPICS.items():
        rec = record_for(t.schema, key)
        value, headers = serde.serialize(t.schema, rec)
        assert value[0] == 0  # the session stack: Confluent framing
        p.produce(cat.name(key), key=str(rec.get(t.key_field) or key), value=value, headers=headers)
        sent[cat.name(key)] = rec
    assert p.flush(10) == 0
    cp = f"{jar}:{jar.parent / 'lib'}/*"
    r = subprocess.run(["java", "-Xmx128m", "-cp", cp, "io.sqis.mes.MesConsumer", s.bootstrap(), url,
                        f"mes-{uuid.uuid4().hex[:6]}", str(len(sent)), *sent],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln.split("\t", 4) for ln in r.stdout.splitlines() if ln.count("\t") >= 4]
    assert {ln[0] for ln in lines} == set(sent)
    for topic, _key, ce_type, ce_id, value in lines:
        rec = sent[topic]
        assert ce_type.startswith("sqis.") and ce_id
        decoded = json.loads(value)
        for field in ("frame_id", "alert_id", "part_id", "line_id", "source_offset"):
            if field in rec:
                assert decoded[field] == rec[field], (topic, field)


def test_hostile_confluent_framed_bytes_are_schema_errors(local_stack: Any) -> None:
    """Truncated or mutated registry-framed records, and made-up schema ids, give SchemaError (the
    dead-letter path) or a record; an unknown id is asked of the registry once, not per record."""
    import random

    rnd = random.Random(19)
    value, _ = serde.serialize("inspection", record_for("inspection", "hostile"))
    assert value[0] == 0
    for _ in range(300):
        b = bytearray(value)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(5, len(b))] = rnd.randrange(256)
        data = bytes(b[: len(b) - rnd.randint(0, 40)])
        try:
            rec = serde.deserialize("inspection", data, [])
        except serde.SchemaError:
            continue
        assert isinstance(rec, dict) and set(rec) == set(record_for("inspection", "x"))
    made_up = b"\x00" + (987654).to_bytes(4, "big") + value[5:]
    s = serde.serde_for("inspection")
    for _ in range(50):
        with pytest.raises(serde.SchemaError, match="987654"):
            serde.deserialize("inspection", made_up, [])
    assert 987654 in s._unknown_ids


def test_registry_storage_survives_a_restart(local_stack: Any) -> None:
    """Ids and rules live in PostgreSQL: a registry killed and started again serves the same ids."""
    import os
    import signal

    from infra.stack import pid_alive

    info = local_stack.info["registry"]
    url = info["url"]
    before = {s: _get(f"{url}/subjects/{s}/versions/latest")["id"] for s, _ in subjects_with_history()}
    os.kill(int(info["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(int(info["pid"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    local_stack.up()
    after_info = local_stack.info["registry"]
    assert after_info["pid"] != info["pid"] and after_info["url"] == url  # same port: clients keep working
    after = {s: _get(f"{url}/subjects/{s}/versions/latest")["id"] for s, _ in subjects_with_history()}
    assert after == before
    assert _get(f"{url}/config/inspections-value")["compatibilityLevel"] == "BACKWARD_TRANSITIVE"
    value, headers = serde.serialize("inspection", record_for("inspection", "after-restart"))
    assert serde.deserialize("inspection", value, headers)["frame_id"] == "frame_id-after-restart"
