"""Producers without servers: synthetic rendering, folder/video/usb sources, reconnect backoff."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from producers.base import CLASS_NAMES, Backoff, InvalidSourceError, SourceUnavailable
from producers.folder import FolderSource
from producers.run import build_sources
from producers.synthetic import SyntheticSource, generate_dataset, render_part
from producers.usb import UsbSource
from producers.video import VideoSource

FAST = Backoff(0.001, 2.0, 0.004, None)


def _take(source, n: int | None = None) -> list:
    stop = threading.Event()
    out = []
    for f in source.frames(stop):
        out.append(f)
        if n is not None and len(out) >= n:
            stop.set()
            break
    return out


# ---- synthetic -------------------------------------------------------------------------------


def test_synthetic_is_deterministic_for_a_seed_and_differs_per_camera() -> None:
    a = _take(SyntheticSource("cam-01", "line-1", camera_index=0, seed=7, defect_rate=0.5, count=6))
    b = _take(SyntheticSource("cam-01", "line-1", camera_index=0, seed=7, defect_rate=0.5, count=6))
    c = _take(SyntheticSource("cam-02", "line-1", camera_index=1, seed=7, defect_rate=0.5, count=6))
    assert len(a) == 6 and [f.seq for f in a] == list(range(6))
    for fa, fb in zip(a, b, strict=True):
        assert np.array_equal(fa.image, fb.image)
        assert fa.truth == fb.truth
        assert fa.part_id == fb.part_id
    assert not np.array_equal(a[0].image, c[0].image)
    other_seed = _take(SyntheticSource("cam-01", "line-1", camera_index=0, seed=8, count=1))
    assert not np.array_equal(a[0].image, other_seed[0].image)


@pytest.mark.parametrize("size", [(320, 320), (256, 192)])
def test_synthetic_truth_boxes_lie_inside_the_image(size: tuple[int, int]) -> None:
    frames = _take(SyntheticSource("cam-01", "line-1", seed=1, size=size, defect_rate=1.0, count=25))
    w, h = size
    seen = set()
    for f in frames:
        assert f.image.shape == (h, w, 3) and f.image.dtype == np.uint8
        assert f.truth, "defect_rate=1 must give every part at least one defect"
        for cls, x1, y1, x2, y2 in f.truth:
            seen.add(cls)
            assert cls in CLASS_NAMES
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert x2 - x1 >= 4 and y2 - y1 >= 4
    assert seen == set(CLASS_NAMES)


def test_synthetic_defect_rate_controls_defective_fraction() -> None:
    clean = _take(SyntheticSource("cam-01", "line-1", seed=2, defect_rate=0.0, count=10))
    assert all(f.truth == [] for f in clean)
    mixed = _take(SyntheticSource("cam-01", "line-1", seed=2, defect_rate=0.5, count=60))
    defective = sum(1 for f in mixed if f.truth)
    assert 15 <= defective <= 45


def test_defects_change_the_pixels_inside_their_box() -> None:
    """A defect is visible: the defective render differs from the same part without it, inside the box."""
    rng = np.random.default_rng(5)
    for _ in range(10):
        img, truth = render_part(rng, 320, 320, defective=True)
        for _cls, x1, y1, x2, y2 in truth:
            patch = img[int(y1):int(y2) + 1, int(x1):int(x2) + 1].astype(np.float32)
            assert patch.std() > 4.0  # a flat patch would be invisible to a detector


def test_generate_dataset_writes_yolo_layout(tmp_path: Path) -> None:
    data_yaml = generate_dataset(tmp_path / "ds", 20, seed=3, size=128)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["names"] == {0: "scratch", 1: "dent", 2: "spot"} and data["nc"] == 3
    root = Path(data["path"])
    n = 0
    labelled = 0
    for split in ("train", "val", "test"):
        imgs = sorted((root / data[split]).glob("*.jpg"))
        assert imgs, split
        for img in imgs:
            n += 1
            assert cv2.imread(str(img)).shape == (128, 128, 3)
            lines = (root / "labels" / split / f"{img.stem}.txt").read_text().split()
            assert len(lines) % 5 == 0
            labelled += bool(lines)
            vals = [float(v) for v in lines]
            for i in range(0, len(vals), 5):
                cls, cx, cy, bw, bh = vals[i:i + 5]
                assert cls in (0, 1, 2)
                assert 0 < cx < 1 and 0 < cy < 1 and 0 < bw <= 1 and 0 < bh <= 1
    assert n == 20 and labelled >= 10
    again = generate_dataset(tmp_path / "ds2", 20, seed=3, size=128)
    first = sorted((root / "labels").rglob("*.txt"))
    second = sorted((again.parent / "labels").rglob("*.txt"))
    assert [p.read_text() for p in first] == [p.read_text() for p in second]


# ---- folder ------------------------------------------------------------------------------------------


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, name in enumerate(["b.png", "a.jpg", "c.BMP"]):
        cv2.imwrite(str(d / name), np.full((24, 32, 3), 40 * (i + 1), np.uint8))
    (d / "notes.txt").write_text("not an image")
    return d


def test_folder_source_replays_sorted_and_loops(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    once = _take(FolderSource(d))
    assert [f.part_id for f in once] == ["a", "b", "c"]
    looped = _take(FolderSource(d, loop=True, count=7))
    assert [f.part_id for f in looped] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [f.seq for f in looped] == list(range(7))
    assert looped[0].image.shape == (24, 32, 3)


def test_folder_source_skips_and_counts_unreadable_files(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    src = FolderSource(d)
    assert [f.part_id for f in _take(src)] == ["a", "b", "c"]
    assert src.failed_reads == 1


def test_folder_source_rejects_missing_or_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="not a directory"):
        FolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidSourceError, match="no .jpg"):
        FolderSource(tmp_path / "empty")


# ---- video / usb ---------------------------------------------------------------------------------------


def _video(path: Path, n: int) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((48, 64, 3), 20 * i, np.uint8))
    w.release()
    return path


def test_video_file_ends_at_eof_or_loops(tmp_path: Path) -> None:
    p = _video(tmp_path / "clip.avi", 5)
    frames = _take(VideoSource(str(p)))
    assert len(frames) == 5
    assert frames[0].image.shape == (48, 64, 3)
    means = [float(f.image.mean()) for f in frames]
    assert means == sorted(means) and means[-1] > means[0] + 40
    looped = _take(VideoSource(str(p), loop=True, count=12))
    assert len(looped) == 12 and [f.seq for f in looped] == list(range(12))


class FakeCapture:
    """A capture that yields ``n`` frames, then fails reads (a dropped stream)."""

    def __init__(self, n: int, value: int = 0) -> None:
        self.n, self.value, self.released = n, value, False

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.n <= 0:
            return False, None
        self.n -= 1
        return True, np.full((8, 8, 3), self.value, np.uint8)

    def release(self) -> None:
        self.released = True


class ClosedCapture(FakeCapture):
    def isOpened(self) -> bool:  # noqa: N802
        return False


def test_stream_reconnects_with_backoff_when_the_source_appears_later() -> None:
    """The first opens fail (the camera is not up yet); later the stream drops once and comes back."""
    plan: list[FakeCapture] = [ClosedCapture(0), ClosedCapture(0), FakeCapture(3, 1), FakeCapture(2, 2)]
    opened: list[FakeCapture] = []

    def factory(target: object) -> FakeCapture:
        cap = plan.pop(0) if plan else ClosedCapture(0)
        opened.append(cap)
        return cap

    src = VideoSource("rtsp://camera.invalid/stream", capture_factory=factory,
                      backoff=Backoff(0.001, 2.0, 0.004, 8))
    frames = _take(src, 5)
    assert [int(f.image[0, 0, 0]) for f in frames] == [1, 1, 1, 2, 2]
    assert src.reconnects == 3  # two failed opens + one drop
    assert all(c.released for c in opened[:3])


def test_stream_gives_up_when_the_reconnect_budget_is_spent() -> None:
    src = VideoSource("rtsp://camera.invalid/stream", capture_factory=lambda t: ClosedCapture(0),
                      backoff=Backoff(0.001, 2.0, 0.002, 3))
    with pytest.raises(SourceUnavailable, match="3 attempts"):
        _take(src)
    assert src.reconnects == 3


def test_usb_source_uses_the_device_index_and_reconnects() -> None:
    targets: list[object] = []
    caps = [FakeCapture(2, 9), ClosedCapture(0), FakeCapture(1, 8)]

    def factory(t: object) -> FakeCapture:
        targets.append(t)
        return caps.pop(0)

    src = UsbSource(2, capture_factory=factory, backoff=FAST)
    frames = _take(src, 3)
    assert [int(f.image[0, 0, 0]) for f in frames] == [9, 9, 8]
    assert set(targets) == {2} and src.reconnects == 2


def test_backoff_is_bounded_and_jittered() -> None:
    b = Backoff(1.0, 2.0, 8.0, 6)
    delays = [b.next_delay() for _ in range(7)]
    assert delays[-1] is None
    caps = [1, 2, 4, 8, 8, 8]
    for d, cap in zip(delays[:-1], caps, strict=True):
        assert d is not None and cap / 2 <= d <= cap
    b.reset()
    assert b.next_delay() is not None and b.attempts == 1


def test_build_sources_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="unknown --source"):
        build_sources("webcam")
    with pytest.raises(InvalidSourceError, match="needs --path"):
        build_sources("folder")
    with pytest.raises(InvalidSourceError, match="not a video file"):
        build_sources("video", path=tmp_path / "missing.avi")
    with pytest.raises(InvalidSourceError, match="--cameras > 1"):
        build_sources("folder", path=tmp_path, cameras=2)
    cams = build_sources("synthetic", cameras=4, lines=2, frames=3)
    assert [(c.camera_id, c.line_id) for c in cams] == [
        ("cam-01", "line-1"), ("cam-02", "line-2"), ("cam-03", "line-1"), ("cam-04", "line-2")]


# ---- stream-processor demo scenario (#9) --------------------------------------------------------------

def test_synthetic_scenario_parts_rise_and_lighting() -> None:
    import threading as _threading

    import numpy as _np

    from producers.run import Scenario, build_sources

    sc = Scenario.parse(2, "line-1:0:1.0", "cam-03:0:0.5")
    srcs = build_sources("synthetic", cameras=4, lines=1, frames=3, seed=1, size=(64, 64), defect_rate=0.0,
                         scenario=sc)
    stop = _threading.Event()
    frames = {s.camera_id: list(s.frames(stop)) for s in srcs}
    # cam-01/cam-02 see the same parts, cam-03/cam-04 another group
    assert [f.part_id for f in frames["cam-01"]] == [f.part_id for f in frames["cam-02"]]
    assert frames["cam-01"][0].part_id != frames["cam-03"][0].part_id
    # the line's defect rate switched to 1.0 at once: every frame has defects although defect_rate=0
    assert all(f.truth for fs in frames.values() for f in fs)
    dark = _np.mean([f.image.mean() for f in frames["cam-03"]])
    normal = _np.mean([f.image.mean() for f in frames["cam-04"]])
    assert dark < 0.7 * normal
    with pytest.raises(InvalidSourceError, match="no synthetic camera"):
        build_sources("synthetic", cameras=2, scenario=Scenario.parse(1, None, "cam-09:0:0.5"))
