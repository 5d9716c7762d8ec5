"""Hostile FrameRefs through a real worker and broker (#8 hostile input): a garbage message just under
the topic's max.message.bytes (the broker refuses anything larger), URIs outside the store, a frame_id that is
not a UUID, a lying image bomb and a wrong image format each end in the DLQ with their reason; the
good frames around them are inspected and the partition moves on."""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import uuid
import zlib
from typing import Any

from schemas.serde import serialize
from sqis.bench.harness import FramePublisher, TopicCollector
from tests.test_dlq import _send


def _png_header_bomb(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_hostile_frames_are_dead_lettered_with_their_reason(settings_factory: Any, worker_factory: Any,
                                                            request: Any) -> None:
    s = settings_factory(partitions={"frames": 1})
    pub = FramePublisher(s, cameras=1, size=96)
    request.addfinalizer(pub.close)
    refs = pub.prepare(3)
    store = pub.store
    bomb = _png_header_bomb(30000, 30000)
    gif = b"GIF89a" + b"\x01\x00\x01\x00\x80\x00\x00" + b"\x00" * 6 + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"

    def stored(ref: dict[str, Any], name: str, data: bytes, enc: str) -> dict[str, Any]:
        return dict(ref, uri=store.put(f"frames/{name}", data), size_bytes=len(data), encoding=enc,
                    content_sha256=hashlib.sha256(data).hexdigest())

    plan: list[tuple[str, dict[str, Any] | None]] = [
        ("ok", refs[0]),
        ("undecodable_message", None),  # 900 KiB of garbage: dead-lettered truncated to 256 KiB
        ("outside_store", dict(refs[1], uri="file:///etc/passwd", size_bytes=0, content_sha256="")),
        ("outside_store", dict(refs[1], uri=store.url.rstrip("/") + "/../../escape.jpg", size_bytes=0,
                               content_sha256="")),
        ("invalid_frame_ref", dict(refs[1], frame_id="not-a-uuid")),
        ("image_too_large", stored(refs[1], "bomb.png", bomb, "png")),  # the FrameRef still says 96x96
        ("unsupported_encoding", stored(refs[1], "x.gif", gif, "gif")),
        ("ok", refs[2]),
    ]
    garbage = os.urandom(900 * 1024)
    offsets: list[int] = []
    for _kind, ref in plan:
        if ref is None:
            _send(pub, b"cam-01", garbage, [("sqis-schema", b"0123456789abcdef")], offsets)
        else:
            value, headers = serialize("frame_ref", dict(ref, captured_at=1_700_000_000_000_000))
            _send(pub, ref["camera_id"].encode(), value, headers, offsets)

    dlq = TopicCollector(s, "frames_dlq")
    insp = TopicCollector(s, "inspections")
    w = worker_factory(s, max_batch=4, max_wait_ms=20)
    try:
        assert dlq.wait_for(lambda r: len(r) >= 6, 90), [d["error_type"] for d in dlq.snapshot()]
        assert insp.wait_for(lambda r: len(r) >= 2, 60)
        w.stop()
        dead, inspected = dlq.snapshot(), insp.snapshot()
    finally:
        dlq.close()
        insp.close()
    want = {off: kind for (kind, _), off in zip(plan, offsets, strict=True) if kind != "ok"}
    assert {d["source_offset"]: d["error_type"] for d in dead} == want
    big = next(d for d in dead if d["error_type"] == "undecodable_message")
    assert big["original_size"] == len(garbage) and len(big["original_value"]) == 256 * 1024
    assert big["original_sha256"] == hashlib.sha256(garbage).hexdigest()
    for d in dead:
        if d["error_type"] == "outside_store":
            assert d["error_message"].startswith("refused: outside the store")
    assert sorted(i["frame_id"] for i in inspected) == sorted([refs[0]["frame_id"], refs[2]["frame_id"]])


RSS_GROWTH_BOUND_MB = 400  # one 30000x30000 bomb fully decoded to BGR is 2,575 MiB; its grey pass alone 858 MiB


def test_image_bombs_in_one_batch_keep_the_worker_process_rss_bounded(
        settings_factory: Any, onnx_model_path: Any, tmp_path: Any, request: Any) -> None:
    """A real `sqis worker` process (4 fetch threads, like production) gets ONE batch of four lying bombs
    (30000x30000 and 7072x7072 PNGs whose FrameRefs say 96x96), two honest ones just over the 50 Mpx
    budget, a 16-bit PNG, a grey JPEG, an EXIF-rotated JPEG, a truncated JPEG and an empty object among
    good frames. Every bomb and broken frame is dead-lettered with its reason, the unusual-but-valid ones
    and the good frames are inspected, and the worker's RSS (psutil, sampled every 10 ms) stays within
    RSS_GROWTH_BOUND_MB of its warmed-up peak."""
    import io
    import threading
    import time

    import cv2
    import numpy as np
    import psutil
    from PIL import Image

    from sqis.bench.bomb import png_bomb
    from sqis.bench.harness import WorkerPool

    s = settings_factory(partitions={"frames": 1})
    pub = FramePublisher(s, cameras=1, size=96)
    request.addfinalizer(pub.close)
    warm, good = pub.prepare(16), pub.prepare(9)
    store = pub.store
    big, over = png_bomb(30000, 30000), png_bomb(7072, 7072)  # 7072^2 = 50,013,184 px > 50,000,000

    def enc(img: Any, ext: str) -> bytes:
        ok, buf = cv2.imencode(ext, img)
        assert ok
        return buf.tobytes()

    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (40, 90, 200)).save(out, "JPEG", exif=exif.tobytes())
    jpeg = enc(np.full((96, 96, 3), 120, np.uint8), ".jpg")
    n = iter(range(100))

    def stored(name: str, data: bytes, encoding: str, w: int = 96, h: int = 96) -> dict[str, Any]:
        ref = dict(good[0], frame_id=str(uuid.uuid4()), seq=1000 + next(n), width=w, height=h)
        return dict(ref, uri=store.put(f"frames/hostile/{name}", data), size_bytes=len(data), encoding=encoding,
                    content_sha256=hashlib.sha256(data).hexdigest() if data else "")

    plan: list[tuple[str, dict[str, Any], str]] = [  # (outcome, FrameRef, what its dead letter must say)
        ("ok", good[0], ""),
        ("image_too_large", stored("lie1.png", big, "png"), "image header declares 900000000 pixels, above the budget of 50000000"),
        ("ok", stored("16bit.png", enc((np.arange(96 * 96, dtype=np.uint16).reshape(96, 96) * 7), ".png"), "png"), ""),
        ("image_too_large", stored("lie2.png", over, "png"), "image header declares 7072x7072"),
        ("ok", stored("grey.jpg", enc(np.full((96, 96), 99, np.uint8), ".jpg"), "jpeg"), ""),
        ("image_too_large", stored("honest1.png", over, "png", 7072, 7072), "FrameRef declares 7072x7072"),
        ("image_too_large", stored("lie3.png", big, "png"), "image header declares 900000000 pixels, above the budget of 50000000"),
        ("corrupt_image", stored("cut.jpg", jpeg[:-200], "jpeg"), "truncated JPEG"),
        ("corrupt_image", stored("empty.jpg", b"", "jpeg"), "empty object"),
        ("ok", stored("exif.jpg", out.getvalue(), "jpeg", 96, 64), ""),
        ("image_too_large", stored("lie4.png", over, "png"), "image header declares 7072x7072"),
        ("image_too_large", stored("honest2.png", over, "png", 7072, 7072), "FrameRef declares 7072x7072"),
        *[("ok", r, "") for r in good[1:5]],  # 16 frames: the worker's --max-batch, so ONE batch
        *[("ok", r, "") for r in good[5:]],  # the next batch
    ]
    pool = WorkerPool(s, str(onnx_model_path), 1, tmp_path / "logs", max_batch=16, max_wait_ms=1500, fetch_threads=4)
    request.addfinalizer(pool.stop)
    dlq, insp = TopicCollector(s, "frames_dlq"), TopicCollector(s, "inspections")
    request.addfinalizer(dlq.close)
    request.addfinalizer(insp.close)
    pool.wait_ready(settle_s=1.0)
    proc = psutil.Process(pool.procs[0].pid)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            with contextlib.suppress(psutil.Error):
                samples.append((time.monotonic(), proc.memory_info().rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    request.addfinalizer(stop.set)

    pub.publish(warm)  # warm-up: a full 16-frame batch through fetch, model and producer
    assert insp.wait_for(lambda r: len(r) >= 16, 90)
    time.sleep(1.0)
    hostile_at = time.monotonic()
    baseline = max(rss for _, rss in samples)
    offsets: list[int] = []
    for _kind, ref, _why in plan:
        value, headers = serialize("frame_ref", dict(ref, captured_at=1_700_000_000_000_000))
        pub.send_raw(ref["camera_id"].encode(), value, headers, lambda err, msg: offsets.append(msg.offset()))
    pub.flush()
    n_dead = sum(kind != "ok" for kind, _, _ in plan)
    assert dlq.wait_for(lambda r: len(r) >= n_dead, 90), [d["error_type"] for d in dlq.snapshot()]
    assert insp.wait_for(lambda r: len(r) >= 16 + len(plan) - n_dead, 90)
    time.sleep(0.5)
    stop.set()
    sampler.join()
    assert pool.procs[0].poll() is None, "the worker died"
    assert pool.stop() == [0]

    peak = max(rss for t, rss in samples if t >= hostile_at)
    growth_mb = (peak - baseline) / 2**20
    print(f"worker rss: baseline {baseline / 2**20:.0f} MiB, peak after the bombs {peak / 2**20:.0f} MiB, "
          f"growth {growth_mb:.1f} MiB ({len(samples)} samples)")
    assert growth_mb < RSS_GROWTH_BOUND_MB, f"worker RSS grew {growth_mb:.0f} MiB over its warmed-up peak"

    assert offsets == sorted(offsets) and len(offsets) == len(plan)
    dead = {d["source_offset"]: d for d in dlq.snapshot()}
    want = {off: (kind, why) for (kind, _, why), off in zip(plan, offsets, strict=True) if kind != "ok"}
    assert {o: d["error_type"] for o, d in dead.items()} == {o: k for o, (k, _) in want.items()}
    for off, (_kind, why) in want.items():
        assert why in dead[off]["error_message"], (why, dead[off]["error_message"])
    inspected = {i["frame_id"]: i for i in insp.snapshot()}
    ok_ids = [ref["frame_id"] for kind, ref, _ in plan if kind == "ok"]
    assert set(ok_ids) | {r["frame_id"] for r in warm} == set(inspected)
    # the first 16 FrameRefs were one batch: its 8 valid frames were inferred together
    first = [ref["frame_id"] for kind, ref, _ in plan[:16] if kind == "ok"]
    assert {inspected[f]["batch_size"] for f in first} == {len(first)}, [inspected[f]["batch_size"] for f in first]
