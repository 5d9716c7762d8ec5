"""`sqis reconcile`: frames in the object store with no inspection (and inspections with no frame)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, build_settings, parse_time_us
from sqis.errors import CheckFailed


def reconcile(
    since: Annotated[str, typer.Option("--since", help="from: ISO time, date, or age (2h, 1d)")],
    until: Annotated[str | None, typer.Option("--until", help="to (default: now - --grace-s)")] = None,
    grace_s: Annotated[float, typer.Option("--grace-s", min=0.0, help="ignore frames younger than this (still in flight)")] = 60.0,
    republish_: Annotated[bool, typer.Option("--republish", help="send the lost frames' FrameRefs again (same frame_id)")] = False,
    check_dlq: Annotated[bool, typer.Option("--check-dlq/--no-check-dlq", help="tell dead-lettered frames apart (reads the DLQ)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Find frames lost between the object store and PostgreSQL; exit 3 when some stay lost."""
    from infra.objectstore import open_store
    from sinks.reconcile import find_gaps, republish

    since_us = parse_time_us(since, "--since")
    until_us = parse_time_us(until, "--until") if until else None
    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    store = open_store(s)
    dlq_ids: list[str] = []
    if check_dlq:
        from inference_workers.dlq import read_dead_letters

        dlq_ids = [r["frame_id"] for r in read_dead_letters(s, idle_s=2.0, max_s=300) if r.get("frame_id")]
    report = find_gaps(s, store, since_us=since_us, until_us=until_us, grace_s=grace_s, dead_lettered_ids=dlq_ids)
    sent = republish(s, store, report.missing) if republish_ and report.missing else 0
    if as_json:
        typer.echo(json.dumps({"checked": report.checked, "missing": [o.frame_id for o in report.missing],
                               "dead_lettered": [o.frame_id for o in report.dead_lettered],
                               "orphans": [f for f, _ in report.orphans], "republished": sent}))
    else:
        for o in report.missing:
            when = datetime.fromtimestamp(o.stored_at_us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S")
            typer.echo(f"missing   {o.frame_id} {o.line_id}/{o.camera_id} stored {when} {o.uri}")
        for o in report.dead_lettered:
            typer.echo(f"dlq       {o.frame_id} {o.line_id}/{o.camera_id} (see `sqis dlq show`)")
        for fid, uri in report.orphans:
            typer.echo(f"orphan    {fid} inspection without its object {uri}")
        typer.echo(f"checked {report.checked} frames: {len(report.missing)} missing, "
                   f"{len(report.dead_lettered)} dead-lettered, {len(report.orphans)} orphan inspections"
                   + (f"; republished {sent}" if republish_ else ""))
    if report.missing and not republish_:
        raise CheckFailed(f"{len(report.missing)} stored frame(s) have no inspection; --republish sends them again")
