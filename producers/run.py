"""The Python entry point of the producers: build sources from options and run the pipeline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.settings import Settings
from producers.base import FrameSource, InvalidSourceError
from producers.folder import FolderSource
from producers.preprocess import Denoise, Preprocessor, parse_size
from producers.publisher import DropPolicy, ProducerStats, run_pipeline
from producers.synthetic import SyntheticSource
from producers.usb import UsbSource
from producers.video import VideoSource, is_stream

SOURCES: tuple[str, ...] = ("synthetic", "folder", "video", "usb")


@dataclass(frozen=True)
class Scenario:
    """Synthetic line scenario for the stream processors' demo: parts seen by several cameras, one
    line's defect rate rising, one camera's lighting drifting."""

    views_per_part: int = 1  # cameras of a line, in groups of N, see the same parts
    rise_line: str | None = None
    rise_after_s: float = 0.0
    rise_rate: float = 0.0
    light_camera: str | None = None
    light_after_s: float = 0.0
    light_factor: float = 1.0
    light_ramp_s: float = 0.0

    @classmethod
    def parse(cls, views_per_part: int = 1, defect_rise: str | None = None, lighting: str | None = None) -> Scenario:
        """From CLI strings ``LINE:AFTER_S:RATE`` and ``CAMERA:AFTER_S:FACTOR[:RAMP_S]``."""
        kw: dict[str, object] = {"views_per_part": views_per_part}
        if views_per_part < 1:
            raise InvalidSourceError("--views-per-part must be >= 1")
        try:
            if defect_rise:
                line, after, rate = defect_rise.split(":")
                kw.update(rise_line=line, rise_after_s=float(after), rise_rate=float(rate))
            if lighting:
                parts = lighting.split(":")
                if len(parts) not in (3, 4):
                    raise ValueError
                kw.update(light_camera=parts[0], light_after_s=float(parts[1]), light_factor=float(parts[2]),
                          light_ramp_s=float(parts[3]) if len(parts) == 4 else 0.0)
        except ValueError:
            raise InvalidSourceError("--defect-rise is LINE:AFTER_S:RATE (e.g. line-1:120:0.6) and --lighting-drift "
                                     "is CAMERA:AFTER_S:FACTOR[:RAMP_S] (e.g. cam-02:90:0.6:30)") from None
        return cls(**kw)  # type: ignore[arg-type]


def _size(size: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None or isinstance(size, tuple):
        return size
    return parse_size(size)


def build_sources(source: str, *, cameras: int = 1, lines: int = 1, frames: int = 0, defect_rate: float = 0.3,
                  seed: int = 0, size: tuple[int, int] | None = None, path: str | Path | None = None,
                  device: int = 0, loop: bool = False, camera_id: str | None = None,
                  line_id: str | None = None, scenario: Scenario | None = None) -> list[FrameSource]:
    """Cameras for ``source``. Synthetic: ``cameras`` spread round-robin over ``lines``
    (cam-01 on line-1, cam-02 on line-2, ...); other kinds are one camera. ``frames`` is per camera."""
    if source not in SOURCES:
        raise InvalidSourceError(f"unknown --source {source!r}; choose one of {', '.join(SOURCES)}")
    if cameras < 1 or lines < 1:
        raise InvalidSourceError("--cameras and --lines must be >= 1")
    if frames < 0:
        raise InvalidSourceError("--frames must be >= 0 (0: unlimited)")
    if source != "synthetic" and cameras != 1:
        raise InvalidSourceError(f"--cameras > 1 needs --source synthetic; run one `sqis produce` per {source} camera")
    cam, line = camera_id or "cam-01", line_id or "line-1"
    if source == "synthetic":
        w, h = size or (320, 320)
        if cameras > 1 and (camera_id or line_id):
            raise InvalidSourceError("--camera-id/--line-id name one camera; drop them with --cameras > 1")
        ids = [(cam, line)] if cameras == 1 else [(f"cam-{i + 1:02d}", f"line-{i % lines + 1}") for i in range(cameras)]
        sc = scenario or Scenario()
        if sc.rise_line and sc.rise_line not in {ln for _, ln in ids}:
            raise InvalidSourceError(f"--defect-rise: no synthetic line {sc.rise_line!r}")
        if sc.light_camera and sc.light_camera not in {c for c, _ in ids}:
            raise InvalidSourceError(f"--lighting-drift: no synthetic camera {sc.light_camera!r}")
        out: list[FrameSource] = []
        on_line: dict[str, int] = {}
        for i, (c, ln) in enumerate(ids):
            k = on_line[ln] = on_line.get(ln, -1) + 1  # index of the camera on its line
            rise = sc.rise_line == ln
            light = sc.light_camera == c
            out.append(SyntheticSource(
                c, ln, camera_index=i, seed=seed, size=(w, h), defect_rate=defect_rate, count=frames,
                part_group=f"{ln}-g{k // sc.views_per_part}" if sc.views_per_part > 1 else None,
                rate_after_s=sc.rise_after_s if rise else None, rate_after=sc.rise_rate if rise else None,
                lighting_after_s=sc.light_after_s if light else None,
                lighting_factor=sc.light_factor if light else 1.0, lighting_ramp_s=sc.light_ramp_s))
        return out
    if source == "folder":
        if path is None:
            raise InvalidSourceError("--source folder needs --path DIR")
        return [FolderSource(path, cam, line, loop=loop, count=frames)]
    if source == "video":
        if path is None:
            raise InvalidSourceError("--source video needs --path FILE or an rtsp:// URL")
        target = str(path)
        if not is_stream(target) and not Path(target).is_file():
            raise InvalidSourceError(f"--path {target} is not a video file (or an rtsp:// URL)")
        return [VideoSource(target, cam, line, loop=loop, count=frames)]
    return [UsbSource(device, cam, line, count=frames)]


def run_producer(settings: Settings, source: str | Sequence[FrameSource] = "synthetic", *,
                 cameras: int = 1, lines: int = 1, fps: float = 0.0, frames: int = 0,
                 defect_rate: float = 0.3, seed: int = 0, size: str | tuple[int, int] | None = None,
                 path: str | Path | None = None, device: int = 0, loop: bool = False,
                 camera_id: str | None = None, line_id: str | None = None,
                 max_side: int | None = None, denoise: Denoise = "none", dedup_threshold: float = 0.0,
                 jpeg_quality: int = 90, queue_size: int = 64, drop_policy: DropPolicy | None = None,
                 spool_max_bytes: int = 1 << 30, drain_timeout_s: float = 10.0,
                 stop_event: threading.Event | None = None,
                 progress: Callable[[dict[str, int]], None] | None = None,
                 install_signal_handlers: bool = True, scenario: Scenario | None = None) -> ProducerStats:
    """Publish frames of ``source`` (a kind name or ready sources) as FrameRefs; returns the run's stats.

    ``frames`` is per camera (0: until the source ends or ``stop_event`` is set). ``size`` is the
    rendered size for synthetic cameras and an exact resize (WxH) for the others. ``drop_policy``
    defaults to block for synthetic/folder/video files and drop-oldest for USB/RTSP cameras.
    """
    if fps < 0:
        raise InvalidSourceError("--fps must be >= 0 (0: as fast as possible)")
    wh = _size(size)
    if isinstance(source, str):
        sources = build_sources(source, cameras=cameras, lines=lines, frames=frames, defect_rate=defect_rate,
                                seed=seed, size=wh, path=path, device=device, loop=loop,
                                camera_id=camera_id, line_id=line_id, scenario=scenario)
    else:
        sources = list(source)
        if not sources:
            raise InvalidSourceError("no sources given")
    live = any(getattr(s, "live", False) for s in sources)
    policy: DropPolicy = drop_policy or ("drop-oldest" if live else "block")
    resize = None if source == "synthetic" else wh
    pre = Preprocessor(size=resize, max_side=max_side, denoise=denoise, dedup_threshold=dedup_threshold,
                       jpeg_quality=jpeg_quality)
    return run_pipeline(settings, sources, pre, fps=fps, queue_size=queue_size, drop_policy=policy,
                        spool_max_bytes=spool_max_bytes, drain_timeout_s=drain_timeout_s,
                        stop_event=stop_event, progress=progress,
                        install_signal_handlers=install_signal_handlers)
