"""`sqis spool show|replay`: frames waiting in the producers' on-disk spool, per deployment and camera."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, build_settings

spool_app = typer.Typer(help="The producers' on-disk spool: frames not yet published.", no_args_is_help=True)


def _ts(us: int | None) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S") if us else "-"


@spool_app.command("show")
def spool_show(state_dir: StateDir = None) -> None:
    """Every deployment's spooled frames, per camera (locked: a running producer owns it)."""
    from producers.journal import SUFFIX
    from producers.spool import survey

    s = build_settings(state_dir=state_dir)
    root = s.state_dir / "spool"
    rows = survey(root)
    if not rows:
        typer.echo(f"no spooled frames under {root}")
        return
    typer.echo(f"{'deployment':<20} {'camera':<16} {'frames':>7} {'MiB':>8}  {'oldest (UTC)':<19}  {'newest (UTC)':<19}  owner")
    for r in rows:
        typer.echo(f"{r.deployment:<20} {r.camera:<16} {r.frames:>7} {r.bytes / 2**20:>8.1f}  {_ts(r.oldest_us):<19}  "
                   f"{_ts(r.newest_us):<19}  {'running producer' if r.locked else 'none: `sqis spool replay`'}")
    journals = sorted(root.glob(f"*/.journal/*{SUFFIX}"))
    if journals:
        typer.echo(f"{len(journals)} in-flight journal(s): recovered into the spool by the next producer or replay")


@spool_app.command("replay")
def spool_replay(
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", min=1.0, help="give up after this many seconds")] = 60.0,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Publish this deployment's spooled frames of every camera no running producer owns (e.g. a camera
    that never came back); exit 1 when some are still waiting at the end."""
    from producers.publisher import ProducerStats, Publisher
    from producers.spool import spool_root, unlocked_cameras

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    root = spool_root(s)
    cams = unlocked_cameras(root)
    stats = ProducerStats()
    pub = Publisher(s, stats, cameras=cams, client_id="sqis-spool-replay")
    waiting = len(pub.spool)
    pub.close(drain_timeout)
    typer.echo(f"{root}: cameras={len(cams)} waiting={waiting} replayed={stats.replayed} recovered={stats.recovered} "
               f"lost_after_crash={stats.lost_after_crash} left={stats.spool_pending}")
    if stats.spool_pending:
        typer.secho(f"error: {stats.spool_pending} frames still wait in {root} (broker or store unreachable?)",
                    err=True, fg="red")
        raise typer.Exit(1)
