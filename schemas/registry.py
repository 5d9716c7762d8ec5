"""The schema registry contract: subjects, the history to register, and a local compatibility check.

Subjects follow the TopicNameStrategy over the catalog's topic names (``inspections-value``): the
deployment/test topic prefix isolates topics, not contracts, so every prefix shares one subject.
``check_backward_transitive`` is the registry's BACKWARD_TRANSITIVE rule done locally (the newest
schema must read data written with every older one), so ``make test`` refuses an incompatible
change before it reaches a registry or a broker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from schemas.catalog import TOPICS, Topic, topic_for_schema
from schemas.serde import SchemaError, history_json

COMPATIBILITY = "BACKWARD_TRANSITIVE"


def topic_of_schema(name: str) -> Topic:
    """The one catalog topic whose values use schema ``name``."""
    try:
        return topic_for_schema(name)
    except KeyError as exc:
        raise SchemaError(str(exc)) from None


def subject_for(name: str) -> str:
    """TopicNameStrategy: ``<topic>-value`` for the catalog topic that carries schema ``name``."""
    return f"{topic_of_schema(name).name}-value"


def subjects_with_history() -> list[tuple[str, list[str]]]:
    """Every subject with its schema versions as JSON strings, oldest first (the registration order)."""
    return [(f"{t.name}-value", list(history_json(t.schema))) for t in TOPICS.values()]


# ---- local compatibility (Avro schema resolution, reader = new, writer = old) --------------------

_PROMOTIONS = {"int": {"long", "float", "double"}, "long": {"float", "double"}, "float": {"double"},
               "string": {"bytes"}, "bytes": {"string"}}


def _named(schema: Any, names: dict[str, Any], ns: str | None = None) -> Any:
    """Resolve named-type references and remember named types (full names)."""
    if isinstance(schema, str):
        if schema in names:
            return names[schema]
        full = f"{ns}.{schema}" if ns and "." not in schema else schema
        return names.get(full, schema)
    if isinstance(schema, dict) and schema.get("type") in ("record", "enum", "fixed"):
        name = schema["name"]
        nsp = schema.get("namespace", ns)
        full = name if "." in name or not nsp else f"{nsp}.{name}"
        names.setdefault(full, schema)
        names.setdefault(name, schema)
    return schema


def _type(s: Any) -> str:
    if isinstance(s, list):
        return "union"
    if isinstance(s, dict):
        return str(s["type"]) if not isinstance(s["type"], (dict, list)) else _type(s["type"])
    return str(s)


def _problems(reader: Any, writer: Any, rn: dict[str, Any], wn: dict[str, Any], path: str) -> list[str]:
    reader, writer = _named(reader, rn), _named(writer, wn)
    if isinstance(reader, dict) and isinstance(reader.get("type"), (dict, list)):
        reader = reader["type"]
    if isinstance(writer, dict) and isinstance(writer.get("type"), (dict, list)):
        writer = writer["type"]
    rt, wt = _type(reader), _type(writer)
    if wt == "union":  # every writer branch must be readable
        return [p for i, b in enumerate(writer) for p in _problems(reader, b, rn, wn, f"{path}[{i}]")][:5]
    if rt == "union":
        if any(not _problems(b, writer, dict(rn), dict(wn), path) for b in reader):
            return []
        return [f"{path}: writer type {wt} matches no branch of the reader's union"]
    if rt != wt:
        if wt in _PROMOTIONS and rt in _PROMOTIONS[wt]:
            return []
        return [f"{path}: type changed from {wt} to {rt}"]
    if rt == "record":
        out: list[str] = []
        wfields = {f["name"]: f for f in writer["fields"]}
        for f in reader["fields"]:
            wf = wfields.get(f["name"])
            if wf is None:
                for alias in f.get("aliases", []):
                    wf = wfields.get(alias) or wf
            if wf is None:
                if "default" not in f:
                    out.append(f"{path}.{f['name']}: new field without a default")
                continue
            out += _problems(f["type"], wf["type"], rn, wn, f"{path}.{f['name']}")
        return out
    if rt == "enum":
        missing = set(writer["symbols"]) - set(reader["symbols"])
        if missing and "default" not in reader:
            return [f"{path}: enum symbols removed without a default: {sorted(missing)}"]
        return []
    if rt == "array":
        return _problems(reader["items"], writer["items"], rn, wn, f"{path}[]")
    if rt == "map":
        return _problems(reader["values"], writer["values"], rn, wn, f"{path}{{}}")
    if rt == "fixed" and reader["size"] != writer["size"]:
        return [f"{path}: fixed size changed from {writer['size']} to {reader['size']}"]
    return []


def incompatibilities(reader: Mapping[str, Any] | str, writer: Mapping[str, Any] | str) -> list[str]:
    """Why data written with ``writer`` cannot be read with ``reader`` (empty when it can)."""
    r = json.loads(reader) if isinstance(reader, str) else dict(reader)
    w = json.loads(writer) if isinstance(writer, str) else dict(writer)
    return _problems(r, w, {}, {}, r.get("name", "record"))


def check_backward_transitive(versions: list[str] | list[Mapping[str, Any]]) -> list[str]:
    """BACKWARD_TRANSITIVE over a history (oldest first): each version reads every older one."""
    out: list[str] = []
    for i in range(1, len(versions)):
        for j in range(i):
            out += [f"v{i + 1} cannot read v{j + 1}: {p}" for p in incompatibilities(versions[i], versions[j])]
    return out
