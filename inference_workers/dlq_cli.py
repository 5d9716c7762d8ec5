"""`sqis dlq replay`: re-publish dead-lettered frames to their topic, chosen by reason, time or offsets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from inference_workers.cli import dlq_app
from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings, parse_time_us


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[list[str] | None, typer.Option("--reason", help="only this error type (repeatable), e.g. store_unavailable")] = None,
    since: Annotated[str | None, typer.Option("--since", help="dead-lettered at or after: ISO time, date, or age (2h)")] = None,
    until: Annotated[str | None, typer.Option("--until", help="dead-lettered before: ISO time, date, or age")] = None,
    partition: Annotated[int | None, typer.Option("--partition", min=0, help="only this source partition")] = None,
    from_offset: Annotated[int | None, typer.Option("--from-offset", min=0, help="source offsets from (needs --partition)")] = None,
    to_offset: Annotated[int | None, typer.Option("--to-offset", min=0, help="source offsets up to, inclusive (needs --partition)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be replayed; send nothing")] = False,
    idle_s: Annotated[float, typer.Option("--idle-s", min=0.1, help="give up reading the DLQ (with a warning) when the broker delivers nothing for this long before its end offsets")] = 3.0,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Re-publish dead letters with their original key, value and headers: same frame_id, so the sinks
    stay effectively-once. Truncated or foreign records are listed as skipped."""
    from inference_workers.dlq import ReplayFilter, plan_replay, read_dead_letters, replay

    if (from_offset is not None or to_offset is not None) and partition is None:
        raise UserError("--from-offset/--to-offset need --partition")
    if from_offset is not None and to_offset is not None and to_offset < from_offset:
        raise UserError(f"--to-offset {to_offset} is before --from-offset {from_offset}")
    flt = ReplayFilter(reasons=tuple(reason or ()), since_us=parse_time_us(since, "--since") if since else None,
                       until_us=parse_time_us(until, "--until") if until else None, partition=partition,
                       from_offset=from_offset, to_offset=to_offset)
    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    plan = plan_replay(s, read_dead_letters(s, idle_s=idle_s, max_s=600), flt)
    for rec, topic in plan.send:
        when = datetime.fromtimestamp(rec["failed_at"] / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{'would replay' if dry_run else 'replay'} {rec['source_topic']}[{rec['source_partition']}]"
                   f"@{rec['source_offset']} -> {topic} frame_id={rec.get('frame_id') or '-'} "
                   f"reason={rec['error_type']} failed_at={when}")
    for rec, why in plan.skip:
        typer.echo(f"skip {rec['source_topic']}[{rec['source_partition']}]@{rec['source_offset']}: {why}", err=True)
    sent = 0 if dry_run else replay(s, plan)
    verb = "would replay" if dry_run else "replayed"
    typer.echo(f"{verb} {len(plan.send) if dry_run else sent}, skipped {len(plan.skip)}")
