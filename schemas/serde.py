"""Avro serde: the Confluent wire format against a schema registry, and the legacy header framing.

Registry mode (``configure(url)``; every ``sqis`` process does it from its settings): values are in
the Confluent wire format (byte 0, a 4-byte schema id, Avro binary), serialised and deserialised by
``confluent_kafka.schema_registry``'s AvroSerializer/AvroDeserializer. The subject is
``<catalog topic>-value`` (TopicNameStrategy, see schemas/registry.py); the producer only looks the
id up (``auto.register.schemas`` off: the history is registered, in order, by ``sqis stack up`` or
``sqis schemas register``), once per process, then it is cached: no HTTP call per record.

Legacy mode (no registry configured: unit tests without a stack, or ``SQIS_SCHEMA_REGISTRY_URL=none``):
schemaless Avro with the CRC-64-AVRO fingerprint of the writer schema in the ``sqis-schema`` header,
as before #19. Which mode a process writes is explicit (``configure``) and logged once.

Readers take both, whatever their mode, so a topic can carry old and new records during a rollout:
a ``sqis-schema`` header means the legacy framing, otherwise the Confluent framing. Both resolve the
writer schema against the reader's own, so old readers read new writers and vice versa.

Every record also carries CloudEvents binary-mode headers (``ce_specversion``, ``ce_id``,
``ce_source``, ``ce_type``, ``ce_time``, ``content-type``), so routers and tracers understand it.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

log = logging.getLogger(__name__)

SCHEMA_HEADER = "sqis-schema"
SCHEMA_NAME_HEADER = "sqis-schema-name"
MAGIC = 0
WIRE_REGISTRY = "confluent"  # magic byte 0 + 4-byte schema id + Avro binary
WIRE_LEGACY = "sqis-header"  # schemaless Avro + CRC-64 fingerprint in the sqis-schema header
CE_SPECVERSION = b"1.0"
AVRO_CONTENT_TYPE = b"application/avro"

# CloudEvents attributes per schema: (ce_type stem, id field, time field (us since the epoch))
_CE: dict[str, tuple[str, str, str]] = {
    "frame_ref": ("sqis.frame", "frame_id", "captured_at"),
    "inspection": ("sqis.inspection", "frame_id", "inspected_at"),
    "frame_dlq": ("sqis.frame.deadletter", "frame_id", "failed_at"),
    "defect_rate": ("sqis.defect-rate", "", "window_start"),
    "alert": ("sqis.alert", "alert_id", "updated_at"),
    "part_verdict": ("sqis.part-verdict", "part_id", "decided_at"),
}


class SchemaError(ValueError):
    """A message cannot be decoded: unknown schema, missing header or corrupt Avro."""


class RegistryUnavailable(RuntimeError):
    """The schema registry did not answer (network, 5xx): the record is fine, retry later.

    Deliberately not a SchemaError: a consumer must not dead-letter good records during an outage."""


def _unavailable(exc: BaseException) -> bool:
    """A transport failure or a 5xx from the registry (as opposed to 'this schema/id is wrong')."""
    if any(c.__name__ in ("TransportError", "TimeoutException") for c in type(exc).__mro__):
        return True
    code = getattr(exc, "http_status_code", None)
    return isinstance(code, int) and (code >= 500 or code < 0)


def _load(path: Any) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _history_paths(name: str) -> list[Any]:
    base = resources.files("schemas") / "avro" / "history"
    return sorted(
        (p for p in base.iterdir() if p.name.startswith(f"{name}.v") and p.name.endswith(".avsc")),
        key=lambda p: int(p.name.rsplit(".v", 1)[1].split(".")[0]),
    )


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The current version of schema ``name`` (file schemas/avro/<name>.avsc), parsed."""
    base = resources.files("schemas") / "avro"
    return parse_schema(_load(base / f"{name}.avsc"))


@cache
def history(name: str) -> tuple[dict[str, Any], ...]:
    """Every known version of ``name``, oldest first, the current one last."""
    return tuple(parse_schema(_load(p)) for p in _history_paths(name)) + (load_schema(name),)


@cache
def history_json(name: str) -> tuple[str, ...]:
    """Every version of ``name`` as the JSON text registered in the registry, oldest first."""
    base = resources.files("schemas") / "avro"
    # Apicurio 3.0.9 cannot tell the type of a schema holding the JSON string "{}" (HTTP 422, "Failed
    # to discover artifact type from content"): the same string, escaped, is the same schema
    return tuple(json.dumps(_load(p), separators=(",", ":")).replace('"{}"', '"\\u007b}"')
                 for p in [*_history_paths(name), base / f"{name}.avsc"])


def schema_fingerprint(schema: Mapping[str, Any]) -> str:
    return fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")


# ---- registry configuration (process-wide, set by the entry point) -------------------------------

_registry_lock = threading.Lock()
_registry_url: str | None = None
_reader_url: str | None = None  # the last registry configured: readers keep decoding its ids after configure(None)
_configured = False
_legacy_said = False  # the first legacy write is logged: the fallback is never silent (but a process that
# fails on its settings before writing anything says only its error)
_client: Any = None


def configure(registry_url: str | None) -> None:
    """Write the Confluent wire format against ``registry_url`` (the ccompat base URL), or, with
    None, the legacy header framing. Readers accept both either way. Idempotent."""
    global _registry_url, _reader_url, _client, _configured
    with _registry_lock:
        if _configured and registry_url == _registry_url:
            return
        if registry_url and registry_url != _reader_url:
            _reader_url, _client = registry_url, None
        _registry_url, _configured = registry_url, True
        serde_for.cache_clear()
    if registry_url:
        log.info("serde: Confluent wire format", extra={"schema_registry": registry_url})


def _say_legacy() -> None:
    global _legacy_said
    if not _legacy_said:
        _legacy_said = True
        log.warning("serde: no schema registry configured: writing the legacy sqis-schema header framing")


def registry_url() -> str | None:
    return _registry_url


def _registry_client() -> Any:
    global _client
    with _registry_lock:
        if _client is None:
            if not _reader_url:
                raise SchemaError("a Confluent-framed record, but no schema registry is configured "
                                  "(SQIS_SCHEMA_REGISTRY_URL, or the local stack's)")
            from confluent_kafka.schema_registry import SchemaRegistryClient

            _client = SchemaRegistryClient({"url": _reader_url, "timeout": 10})
        return _client


def wire_format(payload: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> str:
    """Which framing a record uses: ``confluent``, ``sqis-header``, or ``unknown``."""
    if any(k == SCHEMA_HEADER for k, _ in headers or ()):
        return WIRE_LEGACY
    if payload is not None and len(payload) > 5 and payload[0] == MAGIC:
        return WIRE_REGISTRY
    return "unknown"


def _ce_time(us: Any) -> bytes:
    try:
        return datetime.fromtimestamp(int(us) / 1e6, UTC).isoformat(timespec="milliseconds") \
            .replace("+00:00", "Z").encode()
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()


class Serde:
    """Serializer/deserializer for one logical schema (all its versions)."""

    def __init__(self, name: str, reader_schema: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.schema = load_schema(name)
        self.reader_schema = reader_schema if reader_schema is not None else self.schema
        self.fingerprint = schema_fingerprint(self.schema)
        self._writers: dict[str, dict[str, Any]] = {schema_fingerprint(s): s for s in history(name)}
        self._header = (SCHEMA_HEADER, self.fingerprint.encode())
        self.registry = _registry_url
        self.ce_type = f"{_CE.get(name, ('sqis.' + name, '', ''))[0]}.v{len(history(name))}".encode()
        self._ser: Any = None
        self._de: dict[int, Any] = {}  # schema id -> AvroDeserializer
        self._unknown_ids: set[int] = set()
        self._ctx: Any = None

    def add_writer_schema(self, schema: Mapping[str, Any]) -> None:
        """Teach this reader another writer version (legacy framing; the registry knows its own)."""
        parsed = parse_schema(dict(schema))
        self._writers[schema_fingerprint(parsed)] = parsed

    # -- writing --------------------------------------------------------------------------------

    def _serializer(self) -> Any:
        if self._ser is None:
            from confluent_kafka.schema_registry.avro import AvroSerializer
            from confluent_kafka.serialization import MessageField, SerializationContext

            from schemas.catalog import topic_for_schema

            self._ser = AvroSerializer(_registry_client(), history_json(self.name)[-1],
                                       conf={"auto.register.schemas": False})
            # TopicNameStrategy over the catalog's topic name: subject <topic>-value
            self._ctx = SerializationContext(topic_for_schema(self.name).name, MessageField.VALUE)
        return self._ser

    def encode(self, record: Mapping[str, Any]) -> bytes:
        if self.registry:
            try:
                return bytes(self._serializer()(dict(record), self._ctx))
            except SchemaError:
                raise
            except Exception as exc:  # SerializationError, SchemaRegistryError, fastavro's ValueError
                if _unavailable(exc) or _unavailable(exc.__cause__ or exc):
                    raise RegistryUnavailable(f"{self.name}: schema registry unavailable ({exc})") from exc
                raise SchemaError(f"{self.name}: cannot serialise for the registry "
                                  f"({type(exc).__name__}: {exc})") from exc
        _say_legacy()
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.schema, dict(record))
        return buf.getvalue()

    def headers(self, record: Mapping[str, Any] | None = None) -> list[tuple[str, bytes]]:
        """The record's headers: CloudEvents attributes (when ``record`` is given) and, in legacy
        mode, the writer schema's fingerprint."""
        out: list[tuple[str, bytes]] = [] if self.registry else [self._header, (SCHEMA_NAME_HEADER, self.name.encode())]
        if record is not None:
            out += self.cloudevent_headers(record)
        return out

    def cloudevent_headers(self, record: Mapping[str, Any]) -> list[tuple[str, bytes]]:
        """CloudEvents Kafka binding, binary mode: attributes in ``ce_*`` headers."""
        _, id_field, time_field = _CE.get(self.name, ("", "", ""))
        line, camera = record.get("line_id") or "-", record.get("camera_id")
        ce_id = str(record.get(id_field) or "") if id_field else ""
        if not ce_id and "source_topic" in record:  # a dead letter without a frame_id: where it came from
            ce_id = f"{record['source_topic']}[{record.get('source_partition')}]@{record.get('source_offset')}"
        elif not ce_id:  # a window: line/camera/class/start identifies it
            ce_id = f"{line}/{camera or '*'}/{record.get('class_name') or '*'}/{record.get('window_start')}"
        source = f"/lines/{line}" + (f"/cameras/{camera}" if camera else "")
        return [("ce_specversion", CE_SPECVERSION), ("ce_id", ce_id.encode()), ("ce_source", source.encode()),
                ("ce_type", self.ce_type), ("ce_time", _ce_time(record.get(time_field))),
                ("content-type", AVRO_CONTENT_TYPE)]

    # -- reading --------------------------------------------------------------------------------

    def decode(self, payload: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, Any]:
        if payload is None:
            raise SchemaError(f"{self.name}: empty message (tombstone)")
        fp = None
        for k, v in headers or ():
            if k == SCHEMA_HEADER and v is not None:
                fp = v.decode("ascii", "replace")
            elif k == SCHEMA_HEADER:
                fp = ""
        if fp is None:
            if len(payload) > 5 and payload[0] == MAGIC:
                return self._decode_registry(payload)
            raise SchemaError(f"{self.name}: no {SCHEMA_HEADER} header, and not the Confluent wire "
                              "format (magic byte 0, a schema id, then Avro)")
        writer = self._writers.get(fp)
        if writer is None:
            raise SchemaError(f"{self.name}: unknown writer schema fingerprint {fp}")
        return self._read(payload, 0, writer)

    def _read(self, payload: bytes, start: int, writer: dict[str, Any]) -> dict[str, Any]:
        try:
            buf = io.BytesIO(payload)
            buf.seek(start)
            record = fastavro.schemaless_reader(buf, writer, self.reader_schema)
            if buf.tell() != len(payload):
                raise SchemaError(f"{self.name}: {len(payload) - buf.tell()} trailing bytes after record")
        except SchemaError:
            raise
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise SchemaError(f"{self.name}: corrupt Avro payload ({type(exc).__name__}: {exc})") from exc
        return record  # type: ignore[return-value]

    def _decode_registry(self, payload: bytes) -> dict[str, Any]:
        """Confluent framing through the stock AvroDeserializer: the writer schema by id (fetched once
        per id; the registry client caches it), resolved against this reader's schema. A writer that
        is the reader's own schema gets a deserializer without one: no resolution cost per record."""
        schema_id = int.from_bytes(payload[1:5], "big")
        if schema_id in self._unknown_ids:  # no HTTP call per hostile record with a made-up id
            raise SchemaError(f"{self.name}: schema id {schema_id} is unknown to the registry")
        try:
            de = self._de.get(schema_id)
            if de is None:
                from confluent_kafka.schema_registry.avro import AvroDeserializer

                client = _registry_client()
                writer = parse_schema(json.loads(client.get_schema(schema_id).schema_str))
                same = schema_fingerprint(writer) == schema_fingerprint(self.reader_schema)
                de = AvroDeserializer(client) if same else AvroDeserializer(client, json.dumps(self.reader_schema))
                self._de[schema_id] = de
            record = de(payload, None)
        except SchemaError:
            raise
        except Exception as exc:  # SerializationError, SchemaRegistryError (an unknown id), fastavro errors
            if _unavailable(exc):
                raise RegistryUnavailable(f"{self.name}: schema registry unavailable for id {schema_id} "
                                          f"({exc})") from exc
            if getattr(exc, "http_status_code", None) == 404 and len(self._unknown_ids) < 4096:
                self._unknown_ids.add(schema_id)
            raise SchemaError(f"{self.name}: cannot decode a Confluent-framed record "
                              f"(schema id {schema_id}; {type(exc).__name__}: {exc})") from exc
        if not isinstance(record, dict):
            raise SchemaError(f"{self.name}: the registry's writer schema is not a record")
        return record


@cache
def serde_for(name: str) -> Serde:
    return Serde(name)


def serialize(name: str, record: Mapping[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    s = serde_for(name)
    return s.encode(record), s.headers(record)


def deserialize(name: str, payload: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, Any]:
    return serde_for(name).decode(payload, headers)
