"""`sqis produce`: run camera producers that publish FrameRefs to the frames topic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings

_COUNTS = ("captured", "produced", "skipped_duplicates", "dropped", "spooled", "replayed", "evicted", "failed")


def produce(
    source: Annotated[str, typer.Option("--source", help="synthetic | folder | video | usb")] = "synthetic",
    cameras: Annotated[int, typer.Option("--cameras", min=1, help="synthetic cameras (spread round-robin over --lines)")] = 1,
    lines: Annotated[int, typer.Option("--lines", min=1, help="production lines of the synthetic cameras")] = 1,
    fps: Annotated[float, typer.Option("--fps", min=0.0, help="frames per second per camera; 0 = as fast as possible")] = 0.0,
    frames: Annotated[int, typer.Option("--frames", min=0, help="frames PER CAMERA; 0 = until the source ends or Ctrl-C")] = 100,
    defect_rate: Annotated[float, typer.Option("--defect-rate", min=0.0, max=1.0, help="synthetic: fraction of parts with >= 1 defect")] = 0.3,
    seed: Annotated[int, typer.Option("--seed", help="synthetic: random seed (deterministic images)")] = 0,
    size: Annotated[str | None, typer.Option("--size", help="WxH: synthetic render size (default 320x320); others: resize to it")] = None,
    max_side: Annotated[int | None, typer.Option("--max-side", min=1, help="shrink so the longer side is at most N px")] = None,
    path: Annotated[str | None, typer.Option("--path", help="folder of images, video file, or rtsp:// URL")] = None,
    device: Annotated[int, typer.Option("--device", min=0, help="usb: camera device index")] = 0,
    loop: Annotated[bool, typer.Option("--loop", help="folder/video file: start over at the end")] = False,
    camera_id: Annotated[str | None, typer.Option("--camera-id", help="camera id (one camera; default cam-01)")] = None,
    line_id: Annotated[str | None, typer.Option("--line-id", help="line id (one camera; default line-1)")] = None,
    denoise: Annotated[str, typer.Option("--denoise", help="none | gaussian | bilateral | nlmeans (slow)")] = "none",
    dedup_threshold: Annotated[float, typer.Option("--dedup-threshold", min=0.0, max=255.0, help="skip frames whose 16x16 grey thumbnail differs from the camera's last kept one by less than this mean (0-255); 0 = off")] = 0.0,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="capture queue capacity (frames)")] = 64,
    drop_policy: Annotated[str | None, typer.Option("--drop-policy", help="block | drop-oldest | drop-newest when the queue is full (default: block; drop-oldest for usb/rtsp)")] = None,
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", min=1, max=100, help="JPEG quality 1-100")] = 90,
    spool_max_mb: Annotated[int, typer.Option("--spool-max-mb", min=1, help="on-disk spool bound (oldest evicted first)")] = 1024,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", min=0.0, help="seconds to wait at the end for in-flight and spooled frames")] = 10.0,
    views_per_part: Annotated[int, typer.Option("--views-per-part", min=1, help="synthetic: cameras of a line, in groups of N, see the same parts (part_id)")] = 1,
    defect_rise: Annotated[str | None, typer.Option("--defect-rise", help="synthetic: LINE:AFTER_S:RATE, the line's defect rate after AFTER_S seconds")] = None,
    lighting_drift: Annotated[str | None, typer.Option("--lighting-drift", help="synthetic: CAMERA:AFTER_S:FACTOR[:RAMP_S], scale that camera's brightness")] = None,
    state_dir: StateDir = None,
    bootstrap: Bootstrap = None,
    topic_prefix: TopicPrefix = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535, help="serve /metrics /healthz /readyz [env SQIS_METRICS_PORT]")] = None,
) -> None:
    """Publish camera frames: upload each to the object store and a FrameRef to the frames topic."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from producers.base import InvalidSourceError, SourceUnavailable
    from producers.publisher import DROP_POLICIES
    from producers.run import SOURCES, Scenario, run_producer

    if source not in SOURCES:
        raise UserError(f"unknown --source {source!r}; choose one of {', '.join(SOURCES)}")
    if drop_policy is not None and drop_policy not in DROP_POLICIES:
        raise UserError(f"--drop-policy must be one of {', '.join(DROP_POLICIES)}, got {drop_policy!r}")
    if source == "folder" and path is not None and not Path(path).is_dir():
        raise UserError(f"--path {path}: no such folder")
    try:
        scenario = Scenario.parse(views_per_part, defect_rise, lighting_drift)
    except InvalidSourceError as exc:
        raise UserError(str(exc)) from None
    settings = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix,
                              metrics_port=metrics_port)
    settings.bootstrap(), settings.store_url()  # a missing endpoint is refused before any connection
    console = Console(stderr=True)
    from infra.metrics import ProducerMetrics

    metrics = ProducerMetrics(source, settings.metrics_port)  # no-op without a port

    def line(c: dict[str, int]) -> Text:
        parts = " ".join(f"{k}={c.get(k, 0)}" for k in _COUNTS)
        mode = " [spooling]" if c.get("degraded") else ""
        return Text(f"{source}: {parts} spool={c.get('spool', 0)}{mode}")

    with Live(line({}), console=console, refresh_per_second=4, transient=True) as live:

        def progress(c: dict[str, int]) -> None:
            metrics.update(c)
            live.update(line(c))

        stats = run_producer(
            settings, source, cameras=cameras, lines=lines, fps=fps, frames=frames, defect_rate=defect_rate,
            seed=seed, size=size, path=path, device=device, loop=loop, camera_id=camera_id, line_id=line_id,
            max_side=max_side, denoise=denoise,  # type: ignore[arg-type]
            dedup_threshold=dedup_threshold, jpeg_quality=jpeg_quality, queue_size=queue_size,
            drop_policy=drop_policy,  # type: ignore[arg-type]
            spool_max_bytes=spool_max_mb * 1024 * 1024, drain_timeout_s=drain_timeout,
            progress=progress, scenario=scenario,
        )
    metrics.close()
    snap = stats.snapshot()
    typer.echo(" ".join(f"{k}={v}" for k, v in snap.items()))
    if frames == 100 and snap["captured"] >= frames * cameras:  # the default count was what stopped it
        typer.secho("stopped after 100 frames per camera (the default --frames); --frames 0 runs until Ctrl-C",
                    err=True)
    if snap["recovered"] or snap["lost_after_crash"]:
        typer.secho(f"a previous producer crashed: {snap['recovered']} of its in-flight frames recovered, "
                    f"{snap['lost_after_crash']} lost", err=True, fg="yellow")
    from producers.spool import survey

    legacy = sum(r.frames for r in survey(settings.state_dir / "spool") if r.legacy)
    if legacy:
        typer.secho(f"warning: {legacy} frames wait in the old spool layout (deployment unknown) and were not sent; "
                    "`sqis spool show`, then `sqis spool adopt --deployment PREFIX`", err=True, fg="yellow")
    if snap["spool_pending"]:
        from producers.spool import spool_root

        nothing = "nothing was published:" if snap["produced"] == 0 else ""
        raise SourceUnavailable(f"{nothing} {snap['spool_pending']} frames wait in {spool_root(settings)} (Kafka "
                                "or the object store unreachable); `sqis spool replay` or the next `sqis produce` "
                                "sends them")
    if snap["failed"]:
        raise SourceUnavailable(f"{snap['failed']} frame(s) or camera(s) failed (a camera gave up, or a frame could "
                                "not be read or published): see the log above")
