"""Producers without servers: preprocessing, the spool, the bounded queue, CLI input errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from producers.base import Frame, InvalidSourceError
from producers.preprocess import Preprocessor, parse_size
from producers.publisher import CLOSED, FrameQueue, frame_meta, object_key
from producers.spool import Spool, SpoolEntryGone, SpoolLocked

ROOT = Path(__file__).resolve().parents[1]


def _frame(value: int = 100, cam: str = "cam-01", seq: int = 0, size: tuple[int, int] = (64, 48),
           truth: list | None = None) -> Frame:
    w, h = size
    img = np.full((h, w, 3), value, np.uint8)
    return Frame(cam, "line-1", seq, 1_700_000_000_000_000 + seq, img, truth)


# ---- preprocess ---------------------------------------------------------------------------------


def test_resize_exact_and_max_side_scale_truth() -> None:
    f = _frame(size=(200, 100), truth=[("dent", 20.0, 10.0, 60.0, 50.0)])
    enc = Preprocessor(size=(100, 100)).process(f, "id-1")
    assert enc is not None and (enc.width, enc.height) == (100, 100)
    assert enc.truth == [("dent", 10.0, 10.0, 30.0, 50.0)]
    img = cv2.imdecode(np.frombuffer(enc.data, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (100, 100, 3)
    assert enc.sha256 == hashlib.sha256(enc.data).hexdigest()

    enc2 = Preprocessor(max_side=50).process(_frame(size=(200, 100)), "id-2")
    assert enc2 is not None and (enc2.width, enc2.height) == (50, 25)
    enc3 = Preprocessor(max_side=500).process(_frame(size=(200, 100)), "id-3")
    assert enc3 is not None and (enc3.width, enc3.height) == (200, 100)


def test_near_duplicates_are_skipped_per_camera_and_counted() -> None:
    pre = Preprocessor(dedup_threshold=2.0)
    assert pre.process(_frame(100), "a") is not None
    assert pre.process(_frame(101), "b") is None  # 1 grey level apart: a duplicate
    assert pre.process(_frame(101, cam="cam-02"), "c") is not None  # another camera's first frame
    assert pre.process(_frame(130), "d") is not None  # the scene changed
    assert pre.process(_frame(131), "e") is None  # compared with the last *kept* frame (130)
    assert pre.skipped == 2
    off = Preprocessor(dedup_threshold=0.0)
    assert off.process(_frame(100), "f") is not None and off.process(_frame(100), "g") is not None


@pytest.mark.parametrize("mode", ["gaussian", "bilateral", "nlmeans"])
def test_denoise_smooths_noise(mode: str) -> None:
    rng = np.random.default_rng(0)
    img = np.clip(128 + rng.normal(0, 8, (48, 64, 3)), 0, 255).astype(np.uint8)
    out = Preprocessor(denoise=mode).apply_denoise(img)  # type: ignore[arg-type]
    assert out.shape == img.shape and out.std() < img.std()


def test_bad_preprocess_options_are_user_errors() -> None:
    with pytest.raises(InvalidSourceError):
        Preprocessor(denoise="median")  # type: ignore[arg-type]
    with pytest.raises(InvalidSourceError):
        Preprocessor(jpeg_quality=0)
    assert parse_size("640x480") == (640, 480) and parse_size("256") == (256, 256)
    for bad in ("640x", "axb", "0x10", "1x2x3"):
        with pytest.raises(InvalidSourceError, match="--size"):
            parse_size(bad)


def test_object_key_and_meta() -> None:
    enc = Preprocessor().process(_frame(truth=[("spot", 1.0, 2.0, 3.0, 4.0)]), "fid")
    assert enc is not None
    key = object_key("line-1", "cam-01", 1_700_000_000_000_000, "fid")
    assert key == "frames/line-1/cam-01/2023/11/14/fid.jpg"
    meta = frame_meta(enc)
    assert meta["truth"] == [{"class_name": "spot", "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}]
    assert meta["size_bytes"] == len(enc.data) and meta["encoding"] == "jpeg"


# ---- spool ------------------------------------------------------------------------------------------


def _meta(cam: str, t: int, seq: int) -> dict:
    return {"camera_id": cam, "captured_at": t, "seq": seq, "frame_id": f"{cam}-{seq}"}


def test_spool_replays_in_capture_order_and_survives_a_restart(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    sp.put(_meta("cam-02", 300, 0), b"c")
    sp.put(_meta("cam-01", 100, 0), b"a")
    sp.put(_meta("cam-01", 200, 1), b"b")
    assert [sp.read(e)[1] for e in sp.oldest(10)] == [b"a", b"b", b"c"]
    assert not list((tmp_path / "spool").rglob(".tmp-*"))
    meta, data = sp.read(sp.oldest(1)[0])
    assert meta == _meta("cam-01", 100, 0) and data == b"a"
    sp.close()

    again = Spool(tmp_path / "spool")
    assert len(again) == 3
    first = again.oldest(1)[0]
    again.remove(first)
    assert [again.read(e)[1] for e in again.oldest(10)] == [b"b", b"c"]
    assert len(Spool(tmp_path / "spool")) == 2


def test_spool_evicts_oldest_when_full(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", fsync=False)
    entry, evicted = sp.put(_meta("cam-01", 10, 0), b"x" * 1000)
    assert entry is not None and evicted == 0
    size = entry.size
    small = Spool(tmp_path / "small", max_bytes=3 * size, fsync=False)
    # each put reports the frames it evicted itself (callers on several threads count exactly)
    assert [small.put(_meta("cam-01", 10 + i, i), bytes([i]) * 1000)[1] for i in range(5)] == [0, 0, 0, 1, 1]
    assert small.evicted == 2 and len(small) == 3 and small.total_bytes <= 3 * size
    assert [small.read(e)[0]["seq"] for e in small.oldest(10)] == [2, 3, 4]
    assert len(list((tmp_path / "small").rglob("*.spool"))) == 3
    assert small.put(_meta("cam-01", 99, 99), b"y" * (4 * size)) == (None, 1)  # larger than the spool
    assert small.evicted == 3 and len(small) == 3
    # an entry evicted between oldest() and read() is gone, not corrupt
    stale = small.oldest(1)[0]
    small.put(_meta("cam-01", 200, 200), b"z" * 1000)
    with pytest.raises(SpoolEntryGone):
        small.read(stale)


def test_replay_skips_a_frame_evicted_meanwhile_without_counting_it_failed(tmp_path: Path) -> None:
    from infra.settings import Settings
    from infra.stack import free_port
    from producers.publisher import ProducerStats, Publisher

    s = Settings(state_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}",  # no broker there
                 object_store_url=(tmp_path / "objects").as_uri())
    from producers.spool import spool_root

    sp = Spool(spool_root(s), cameras=["cam-01"], fsync=False)
    gone, _ = sp.put(_meta("cam-01", 1, 0) | {"line_id": "line-1"}, b"a")
    sp.close()
    assert gone is not None
    stats = ProducerStats()
    pub = Publisher(s, stats, cameras=["cam-01"])
    assert pub.degraded  # the spool holds frames: the broker is down, so the replay thread only waits
    gone.path(pub.spool.root).unlink()  # evicted by the publish thread after oldest()
    assert pub._replay_some()
    assert stats.failed == 0 and len(pub.spool) == 0

    pub.spool.put(_meta("cam-01", 2, 1) | {"line_id": "line-1"}, b"b")
    abort = threading.Event()
    abort.set()
    pub.close(drain_timeout_s=300.0, abort=abort)  # aborting: no waiting for the broker
    assert stats.spool_pending == 1 and stats.failed == 0


def test_spool_camera_is_owned_by_one_process(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", cameras=["cam-01"])
    sp.put(_meta("cam-01", 1, 0), b"a")
    sp.put(_meta("cam-02", 2, 0), b"b")  # another camera's leftovers are not this spool's to replay
    with pytest.raises(SpoolLocked, match="cam-01"):
        Spool(tmp_path / "spool", cameras=["cam-01"])
    other = Spool(tmp_path / "spool", cameras=["cam-02"])
    assert [other.read(e)[1] for e in other.oldest(5)] == [b"b"]
    sp.close()
    assert len(Spool(tmp_path / "spool", cameras=["cam-01"])) == 1


# ---- bounded queue -----------------------------------------------------------------------------------


def test_queue_drop_policies() -> None:
    dropped: list[int] = []
    q: FrameQueue[int] = FrameQueue(2, "drop-oldest", on_drop=dropped.append)
    for i in range(5):
        q.put(i)
    assert [q.get(0), q.get(0)] == [3, 4] and dropped == [0, 1, 2] and q.dropped == 3

    q2: FrameQueue[int] = FrameQueue(2, "drop-newest")
    assert [q2.put(i) for i in range(4)] == [True, True, False, False]
    assert [q2.get(0), q2.get(0)] == [0, 1] and q2.dropped == 2
    q2.close()
    assert q2.get(0.01) is CLOSED


def test_queue_block_waits_for_space_and_gives_up_on_abort() -> None:
    q: FrameQueue[int] = FrameQueue(1, "block")
    q.put(1)
    t = threading.Thread(target=q.put, args=(2,))
    t.start()
    assert q.get(1.0) == 1
    t.join(5)
    assert not t.is_alive() and q.get(1.0) == 2
    q.put(3)
    abort = threading.Event()
    abort.set()
    assert q.put(4, abort) is False and q.dropped == 1
    with pytest.raises(InvalidSourceError):
        FrameQueue(1, "drop-random")  # type: ignore[arg-type]


# ---- CLI input errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--source", "webcam"], "unknown --source"),
    (["--source", "folder", "--path", "/nonexistent/dir"], "no such folder"),
    (["--size", "12by12"], "--size"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    env = os.environ | {"SQIS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "SQIS_STATE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "from sqis.cli import main; main()", "produce", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
