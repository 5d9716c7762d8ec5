"""Avro serde with the writer schema's fingerprint in a message header.

Producers write schemaless Avro and put the CRC-64-AVRO fingerprint of the writer schema in the
``sqis-schema`` header. Readers look the writer schema up among every version they know (the
current one plus schemas/avro/history) and resolve it against their own reader schema, so a
reader of an older version reads messages from a newer writer and vice versa.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

SCHEMA_HEADER = "sqis-schema"
SCHEMA_NAME_HEADER = "sqis-schema-name"


class SchemaError(ValueError):
    """A message cannot be decoded: unknown schema, missing header or corrupt Avro."""


def _load(path: Any) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The current version of schema ``name`` (file schemas/avro/<name>.avsc), parsed."""
    base = resources.files("schemas") / "avro"
    return parse_schema(_load(base / f"{name}.avsc"))


@cache
def history(name: str) -> tuple[dict[str, Any], ...]:
    """Every known version of ``name``, oldest first, the current one last."""
    base = resources.files("schemas") / "avro" / "history"
    olds = sorted(
        (p for p in base.iterdir() if p.name.startswith(f"{name}.v") and p.name.endswith(".avsc")),
        key=lambda p: int(p.name.rsplit(".v", 1)[1].split(".")[0]),
    )
    return tuple(parse_schema(_load(p)) for p in olds) + (load_schema(name),)


def schema_fingerprint(schema: Mapping[str, Any]) -> str:
    return fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")


class Serde:
    """Serializer/deserializer for one logical schema (all its versions)."""

    def __init__(self, name: str, reader_schema: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.schema = load_schema(name)
        self.reader_schema = reader_schema if reader_schema is not None else self.schema
        self.fingerprint = schema_fingerprint(self.schema)
        self._writers: dict[str, dict[str, Any]] = {schema_fingerprint(s): s for s in history(name)}
        self._header = (SCHEMA_HEADER, self.fingerprint.encode())

    def add_writer_schema(self, schema: Mapping[str, Any]) -> None:
        """Teach this reader another writer version (e.g. one from a newer deployment)."""
        parsed = parse_schema(dict(schema))
        self._writers[schema_fingerprint(parsed)] = parsed

    def encode(self, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.schema, dict(record))
        return buf.getvalue()

    def headers(self) -> list[tuple[str, bytes]]:
        return [self._header, (SCHEMA_NAME_HEADER, self.name.encode())]

    def decode(self, payload: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, Any]:
        if payload is None:
            raise SchemaError(f"{self.name}: empty message (tombstone)")
        fp = None
        for k, v in headers or ():
            if k == SCHEMA_HEADER and v is not None:
                fp = v.decode("ascii", "replace")
        if fp is None:
            raise SchemaError(f"{self.name}: no {SCHEMA_HEADER} header")
        writer = self._writers.get(fp)
        if writer is None:
            raise SchemaError(f"{self.name}: unknown writer schema fingerprint {fp}")
        try:
            buf = io.BytesIO(payload)
            record = fastavro.schemaless_reader(buf, writer, self.reader_schema)
            if buf.tell() != len(payload):
                raise SchemaError(f"{self.name}: {len(payload) - buf.tell()} trailing bytes after record")
        except SchemaError:
            raise
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise SchemaError(f"{self.name}: corrupt Avro payload ({type(exc).__name__}: {exc})") from exc
        return record  # type: ignore[return-value]


@cache
def serde_for(name: str) -> Serde:
    return Serde(name)


def serialize(name: str, record: Mapping[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    s = serde_for(name)
    return s.encode(record), s.headers()


def deserialize(name: str, payload: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, Any]:
    return serde_for(name).decode(payload, headers)
