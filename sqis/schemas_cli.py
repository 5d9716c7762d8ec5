"""`sqis schemas ...`: the published contract (#19): registry subjects, wire formats, AsyncAPI document."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings
from sqis.errors import CheckFailed

schemas_app = typer.Typer(help="Schema registry subjects, wire formats and the AsyncAPI contract.",
                          no_args_is_help=True)

ASYNCAPI_PATH = Path("docs/asyncapi.yaml")


@schemas_app.command("check")
def check() -> None:
    """Local BACKWARD_TRANSITIVE check of every subject's history (schemas/avro/history + current)."""
    from schemas.registry import check_backward_transitive, subjects_with_history

    bad = 0
    for subject, versions in subjects_with_history():
        problems = check_backward_transitive(versions)
        bad += len(problems)
        typer.echo(f"{subject}: {len(versions)} version(s), " + ("compatible" if not problems else "INCOMPATIBLE"))
        for p in problems:
            typer.echo(f"  {p}")
    if bad:
        raise CheckFailed(f"{bad} incompatible schema change(s): a registry with BACKWARD_TRANSITIVE would refuse them")


@schemas_app.command("register")
def register(state_dir: StateDir = None) -> None:
    """Register the schema history in order, BACKWARD_TRANSITIVE on every subject (the registry refuses
    an incompatible version: exit 1 with its answer). `sqis stack up` does it for the local stack."""
    from infra.registry_server import register_history

    s = build_settings(state_dir=state_dir)
    url = s.registry_url()
    if not url:
        raise UserError("no schema registry: set SQIS_SCHEMA_REGISTRY_URL or start the local stack")
    for subject, ids in register_history(url).items():  # RegistryRefused: one line, exit 1 (sqis/cli.py)
        typer.echo(f"{subject}: ids {ids}")


@schemas_app.command("format")
def wire_formats(
    topic: Annotated[str, typer.Argument(help="catalog key or topic name, e.g. inspections")],
    samples: Annotated[int, typer.Option("--samples", min=1, help="records read from the tail of each partition")] = 50,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Which wire format a topic carries: Confluent (registry) records, legacy sqis-schema records, or both."""
    from infra.kafka import topic_wire_formats
    from schemas.catalog import TOPICS, TopicCatalog

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    cat = TopicCatalog(s.topic_prefix)
    key = topic if topic in TOPICS else next((k for k, t in TOPICS.items() if t.name == topic), None)
    if key is None:
        raise UserError(f"unknown topic {topic!r}: one of {', '.join(TOPICS)}")
    counts = topic_wire_formats(s, cat.name(key), samples)
    total = sum(counts.values())
    kinds = [k for k, n in counts.items() if n]
    verdict = "empty" if not total else (kinds[0] if len(kinds) == 1 else "mixed (" + " + ".join(kinds) + ")")
    typer.echo(f"{cat.name(key)}: {verdict}; last {total} record(s): "
               + ", ".join(f"{k} {n}" for k, n in counts.items()))


@schemas_app.command("asyncapi")
def asyncapi(
    out: Annotated[Path, typer.Option("--out", help="where to write the document")] = ASYNCAPI_PATH,
    check_only: Annotated[bool, typer.Option("--check", help="exit 1 if the file differs from the catalog")] = False,
) -> None:
    """Generate the AsyncAPI 3 document (docs/asyncapi.yaml) from schemas/catalog.py and the Avro schemas."""
    from schemas.asyncapi import render

    text = render()
    if check_only:
        current = out.read_text() if out.exists() else ""
        if current != text:
            raise CheckFailed(f"{out} differs from the catalog: run `sqis schemas asyncapi`")
        typer.echo(f"{out} matches the catalog")
        return
    out.write_text(text)
    typer.echo(f"wrote {out}")


@schemas_app.command("bench")
def bench(
    records: Annotated[int, typer.Option("--records", min=100, help="records per run")] = 2000,
    runs: Annotated[int, typer.Option("--runs", min=1, help="runs per framing (median reported)")] = 5,
    state_dir: StateDir = None,
) -> None:
    """Per-record serde cost of the registry's wire format against the legacy framing (µs, median of runs):
    what the pipeline pays per frame (a worker decodes one frame_ref and encodes one inspection; each
    consumer of inspections decodes it once)."""
    import json
    import statistics
    import time

    from schemas import serde
    from sqis.bench.sizing import frame_ref, inspection

    s = build_settings(state_dir=state_dir)
    url = s.registry_url()
    if not url:
        raise UserError("no schema registry to compare with: start the local stack or set SQIS_SCHEMA_REGISTRY_URL")
    recs = {"frame_ref": [frame_ref(i, 1920, 1080, 250_000) for i in range(records)],
            "inspection": [inspection(i, 2 if i % 10 == 0 else 0, 1920, 1080) for i in range(records)]}
    out: dict[str, dict[str, float]] = {}
    for label, mode in (("legacy", None), ("registry", url)):
        serde.configure(mode)
        for name, rs in recs.items():
            enc, dec = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                msgs = [serde.serialize(name, r) for r in rs]
                t1 = time.perf_counter()
                for v, h in msgs:
                    serde.deserialize(name, v, h)
                t2 = time.perf_counter()
                enc.append((t1 - t0) / len(rs) * 1e6)
                dec.append((t2 - t1) / len(rs) * 1e6)
            out[f"{label}.{name}"] = {"serialize_us": round(statistics.median(enc), 1),
                                      "deserialize_us": round(statistics.median(dec), 1),
                                      "value_bytes": len(msgs[0][0]),
                                      "header_bytes": sum(len(k) + len(v) for k, v in msgs[0][1])}
    serde.configure(url)

    def per_frame(label: str) -> float:
        return out[f"{label}.frame_ref"]["deserialize_us"] + out[f"{label}.inspection"]["serialize_us"] \
            + out[f"{label}.inspection"]["deserialize_us"]

    out["per_frame_us"] = {"legacy": round(per_frame("legacy"), 1), "registry": round(per_frame("registry"), 1),
                           "overhead": round(per_frame("registry") - per_frame("legacy"), 1)}
    typer.echo(json.dumps(out, indent=2))


@schemas_app.command("registry-starts")
def registry_starts(
    restarts: Annotated[int, typer.Option("--restarts", min=1, help="how many stop/start cycles")] = 3,
    state_dir: StateDir = None,
) -> None:
    """Measure the local registry: stop it, start it with the stack, time to its first answer and its RSS."""
    import json
    import os
    import signal
    import statistics
    import time

    from infra.stack import LocalStack, pid_alive

    s = build_settings(state_dir=state_dir)
    stack = LocalStack(s.state_dir)
    if "registry" not in stack.info:
        raise UserError(f"no registry in {stack.state_dir}: `sqis stack up` first")
    rows = []
    for _ in range(restarts):
        pid = int(stack.info["registry"]["pid"])
        os.kill(pid, signal.SIGTERM)
        while pid_alive(pid):
            time.sleep(0.05)
        t0 = time.monotonic()
        stack.up()
        up_s = time.monotonic() - t0
        r = stack.info["registry"]
        with open(f"/proc/{r['pid']}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        rows.append({"ready_s": r["start_s"], "stack_up_s": round(up_s, 2), "rss_mib": round(rss, 1)})
    summary = {k: {"median": statistics.median(x[k] for x in rows), "worst": max(x[k] for x in rows)}
               for k in ("ready_s", "stack_up_s", "rss_mib")}
    typer.echo(json.dumps({"runs": rows, "summary": summary}, indent=2))
