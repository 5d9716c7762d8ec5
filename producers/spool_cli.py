"""`sqis spool show|replay|adopt`: frames waiting in the producers' on-disk spool, per deployment and camera;
`adopt` moves frames of the old per-camera layout (deployment unknown) into a named deployment."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings
from producers.base import ProducerError, SourceUnavailable

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
        todo = "none: `sqis spool adopt --deployment PREFIX`" if r.legacy else "none: `sqis spool replay`"
        typer.echo(f"{r.deployment:<20} {r.camera:<16} {r.frames:>7} {r.bytes / 2**20:>8.1f}  {_ts(r.oldest_us):<19}  "
                   f"{_ts(r.newest_us):<19}  {'running producer' if r.locked else todo}")
    if any(r.legacy for r in rows):
        typer.echo("legacy: frames spooled before the spool was kept per deployment; no producer sends them until "
                   "`sqis spool adopt --deployment PREFIX` moves them into the deployment (topic prefix) they belong to")
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
        raise SourceUnavailable(f"{stats.spool_pending} frames still wait in {root} (broker or store unreachable?)")


@spool_app.command("adopt")
def spool_adopt(
    deployment: Annotated[str, typer.Option(
        "--deployment", help="topic prefix of the deployment the legacy frames belong to ('' for none); required, "
                             "never guessed")],
    camera: Annotated[list[str] | None, typer.Option("--camera", help="adopt only this camera (repeatable)")] = None,
    state_dir: StateDir = None,
) -> None:
    """Move frames of the old per-camera spool layout (deployment unknown) into a deployment's spool;
    `sqis spool replay --topic-prefix PREFIX` then sends them. Exit 1 when a camera was skipped."""
    from producers.spool import adopt_legacy, legacy_camera_dirs, spool_root

    s = build_settings(state_dir=state_dir, topic_prefix=deployment)
    legacy_root = s.state_dir / "spool"
    names = [d.name for d in legacy_camera_dirs(legacy_root)]
    if camera:
        from producers.spool import camera_dir_name

        unknown = [c for c in camera if camera_dir_name(c) not in names]
        if unknown:
            raise UserError(f"--camera {unknown[0]!r}: no legacy spool for it under {legacy_root} "
                            f"(legacy cameras: {', '.join(names) or 'none'})")
    if not names:
        typer.echo(f"no legacy spooled frames under {legacy_root}")
        return
    root = spool_root(s)
    done = adopt_legacy(legacy_root, root, camera)
    for a in done:
        typer.echo(f"{a.camera}: moved {a.moved} frames into {root / a.camera}" if a.skipped is None
                   else f"{a.camera}: skipped ({a.skipped})")
    moved = sum(a.moved for a in done)
    if moved:
        typer.echo(f"send them: sqis spool replay --topic-prefix {shlex.quote(s.topic_prefix)}")
    skipped = [a for a in done if a.skipped]
    if skipped:
        raise ProducerError(f"{len(skipped)} legacy camera spool(s) not adopted")
