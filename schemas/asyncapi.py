"""The published contract: an AsyncAPI 3 document generated from the catalog and the Avro schemas.

``sqis schemas asyncapi`` writes docs/asyncapi.yaml; a test fails when the file and this generator
disagree, so the document cannot drift from schemas/catalog.py.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from schemas.catalog import TOPICS, Topic
from schemas.serde import history, history_json

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING = "0.5.0"
AVRO_FORMAT = "application/vnd.apache.avro+json;version=1.9.0"

# what the catalog does not say: who writes each topic, its guarantee, its order and dedupe key
DELIVERY: dict[str, dict[str, str]] = {
    "frames": {"producer": "cameras (producers/)", "guarantee": "at-least-once (idempotent producer)",
               "dedupe": "frame_id"},
    "inspections": {"producer": "inference workers", "dedupe": "frame_id",
                    "guarantee": "exactly-once for read_committed consumers (worker_delivery=exactly_once: "
                                 "results and input offsets in one Kafka transaction); at-least-once otherwise"},
    "frames_dlq": {"producer": "inference workers and sinks", "guarantee": "at-least-once",
                   "dedupe": "source_topic, source_partition, source_offset"},
    "defect_rates": {"producer": "stream processor `rates`", "guarantee": "at-least-once; a replayed window "
                     "may be re-emitted: keep the largest `frames` per window", "dedupe":
                     "line_id, camera_id, class_name, window_start, window_s"},
    "alerts": {"producer": "stream processors `spc`, `drift`", "guarantee": "at-least-once; every state change "
               "is a new record with the same alert_id", "dedupe": "alert_id, state, updated_at"},
    "inspections_shadow": {"producer": "inference workers: the @challenger model on a sampled share of frames "
                           "(shadow), for the agreement processor; not for MES", "dedupe": "frame_id, model_version",
                           "guarantee": "at-least-once (idempotent producer, outside the batch transaction)"},
    "part_verdicts": {"producer": "stream processor `parts`", "guarantee": "at-least-once; a replay after a "
                      "restart may repeat a verdict: the latest decided_at wins", "dedupe": "part_id"},
}

CE_HEADERS = {
    "type": "object",
    "description": "CloudEvents 1.0 Kafka protocol binding, binary mode (the value is the event data)",
    "properties": {
        "ce_specversion": {"type": "string", "const": "1.0"},
        "ce_id": {"type": "string", "description": "frame_id, alert_id, part_id, or the window's key"},
        "ce_source": {"type": "string", "description": "/lines/<line_id>[/cameras/<camera_id>]"},
        "ce_type": {"type": "string", "description": "sqis.<kind>.v<schema version>, e.g. sqis.inspection.v2"},
        "ce_time": {"type": "string", "format": "date-time"},
        "content-type": {"type": "string", "const": "application/avro"},
        "sqis-review": {"type": "string", "description": "inspections only, optional: why the worker marked "
                        "the frame for review, comma-separated (uncertain, seg_disagree); absent when unmarked"},
        "sqis-review-detail": {"type": "string", "maxLength": 4096, "description": "inspections only, "
                               "optional, with sqis-review: JSON {score, margin, candidates: [{class_id, "
                               "class_name, score, x1, y1, x2, y2}]} (sub-threshold candidate boxes)"},
        "sqis-source": {"type": "string", "description": "optional: `api` on records the HTTP API published"},
    },
    "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time"],
}


def _message(t: Topic) -> dict[str, Any]:
    schema = json.loads(history_json(t.schema)[-1])
    n = len(history(t.schema))
    return {
        "name": schema["name"],
        "title": f"{schema['namespace']}.{schema['name']} v{n}",
        "summary": schema.get("doc", t.doc),
        "contentType": "application/vnd.apache.avro+binary",
        "headers": CE_HEADERS,
        "payload": {"schemaFormat": AVRO_FORMAT, "schema": schema},
        "correlationId": {"location": "$message.header#/ce_id"},
        "bindings": {"kafka": {
            "key": {"type": "string", "description": f"the record's {t.key_field} (UTF-8)"},
            "schemaIdLocation": "payload", "schemaIdPayloadEncoding": "confluent",
            "schemaLookupStrategy": "TopicIdStrategy", "bindingVersion": KAFKA_BINDING}},
    }


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as a dict (channels in catalog order)."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for t in TOPICS.values():
        d = DELIVERY[t.key]
        messages[t.schema] = _message(t)
        channels[t.key] = {
            "address": t.name,
            "title": t.name,
            "description": t.doc,
            "messages": {t.schema: {"$ref": f"#/components/messages/{t.schema}"}},
            "bindings": {"kafka": {
                "topic": t.name, "partitions": t.partitions,
                "topicConfiguration": {"cleanup.policy": [t.cleanup_policy], "retention.ms": t.retention_ms,
                                       "max.message.bytes": t.max_message_bytes},
                "bindingVersion": KAFKA_BINDING}},
            "x-sqis": {"subject": f"{t.name}-value", "compatibility": "BACKWARD_TRANSITIVE",
                       "key": t.key_field, "ordering": f"per key ({t.key_field}): one key, one partition",
                       "delivery": d["guarantee"], "dedupe-key": d["dedupe"], "producer": d["producer"]},
        }
        operations[f"publish_{t.key}"] = {
            "action": "send", "channel": {"$ref": f"#/channels/{t.key}"},
            "summary": f"{d['producer']} write {t.name}",
            "messages": [{"$ref": f"#/channels/{t.key}/messages/{t.schema}"}],
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Smart Quality Inspection System: Kafka topics",
            "version": "2.0.0",
            "description": ("Every topic the system writes. Values: Avro in the Confluent wire format (byte 0, "
                            "a 4-byte schema id, Avro binary); schemas in a Confluent-compatible registry, "
                            "subject <topic>-value, BACKWARD_TRANSITIVE. Headers: CloudEvents binary mode. "
                            "Generated from schemas/catalog.py by `sqis schemas asyncapi`; see docs/mes.md."),
        },
        "defaultContentType": "application/vnd.apache.avro+binary",
        "servers": {"plant": {"host": "{bootstrap}", "protocol": "kafka", "description":
                              "the plant's Kafka (SASL_SSL with SCRAM-SHA-512 in production; the MES "
                              "principal may read inspections and part-verdicts)",
                              "variables": {"bootstrap": {"default": "127.0.0.1:9092"}}}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render() -> str:
    head = "# Generated by `sqis schemas asyncapi` from schemas/catalog.py and schemas/avro: do not edit.\n"
    return head + yaml.safe_dump(document(), sort_keys=False, allow_unicode=True, width=110)
