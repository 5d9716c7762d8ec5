"""Hostile images through the worker's fetch/decode path (#8 item 1): every case is refused with its reason
or decoded to HxWx3 uint8, the worker's memory stays bounded, and image bombs are judged by their real
header, not by the FrameRef's declared dimensions.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from inference_workers.fetch import (
    CorruptImage,
    FrameError,
    FrameFetcher,
    ImageTooLarge,
    UnsupportedEncoding,
    decode_image,
    probe_image,
)
from infra.objectstore import FileStore


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(w: int, h: int) -> bytes:
    """A real, complete greyscale PNG of w x h zero pixels, compressed as a stream (never held raw)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (w + 1)  # filter byte + w grey pixels
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h, with a token IDAT: the header decides, not the payload."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _encode(img: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


def _pil(fmt: str, **kw: Any) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(out, fmt, **kw)
    return out.getvalue()


def _ref(uri: str, data: bytes, w: int = 320, h: int = 320, enc: str = "png") -> dict[str, Any]:
    return {"frame_id": "00000000-0000-4000-8000-000000000001", "uri": uri, "width": w, "height": h,
            "encoding": enc, "content_sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore((tmp_path / "objects").as_uri())


# ---- formats and pixel layouts ------------------------------------------------------------------

def test_16bit_png_decodes_to_8bit_bgr() -> None:
    img16 = (np.arange(60 * 40, dtype=np.uint16).reshape(40, 60) * 20)
    out = decode_image(_encode(img16, ".png"))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8


def test_grey_jpeg_decodes_to_three_channels() -> None:
    grey = np.full((30, 50), 128, np.uint8)
    out = decode_image(_encode(grey, ".jpg"))
    assert out.shape == (30, 50, 3)


def test_exif_orientation_is_applied() -> None:
    import io

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (200, 100), (0, 0, 255)).save(buf, "JPEG", exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    assert out.shape[:2] == (200, 100)  # displayed upright: 100 wide, 200 high


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP"])
def test_encodings_outside_the_allow_list_are_refused(fmt: str) -> None:
    with pytest.raises(UnsupportedEncoding) as ei:
        decode_image(_pil(fmt))
    assert ei.value.error_type == "unsupported_encoding"


def test_allow_list_is_configurable() -> None:
    assert decode_image(_pil("TIFF"), encodings=("tiff",)).shape == (30, 40, 3)
    with pytest.raises(UnsupportedEncoding):
        decode_image(_encode(np.zeros((8, 8, 3), np.uint8), ".png"), encodings=("jpeg",))


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"])
def test_garbage_is_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptImage):
        decode_image(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
       fmt=st.sampled_from([".jpg", ".png", ".bmp"]))
def test_mutated_and_truncated_images_never_escape(cut: int, flips: list[tuple[int, int]], fmt: str) -> None:
    """Any truncation or byte flip of a valid image: a FrameError or a proper image, nothing else."""
    base = bytearray(_encode(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8), fmt))
    for pos, val in flips:
        base[pos % len(base)] = val
    data = bytes(base[: max(0, len(base) - cut)])
    try:
        out = decode_image(data, max_pixels=1_000_000)
    except FrameError as exc:
        assert exc.error_type in ("corrupt_image", "unsupported_encoding", "image_too_large", "oversized_frame")
    else:
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
        assert out.shape[0] * out.shape[1] <= 1_000_000


# ---- image bombs --------------------------------------------------------------------------------

def test_header_probe_reads_real_dimensions_without_decoding() -> None:
    h = probe_image(png_header_only(12000, 13000), max_pixels=10**10)
    assert (h.encoding, h.width, h.height) == ("png", 12000, 13000)
    with pytest.raises(ImageTooLarge) as ei:
        probe_image(png_header_only(30000, 30000), max_pixels=50_000_000)
    assert ei.value.error_type == "image_too_large" and "900000000 pixels" in str(ei.value)


def test_bomb_beyond_pillows_own_ceiling_is_image_too_large() -> None:
    with pytest.raises(ImageTooLarge) as ei:
        probe_image(png_header_only(60000, 60000), max_pixels=10**12)
    # one phrasing for every bomb, in the budget's terms (not Pillow's own limit)
    assert str(ei.value) == f"image header declares 3600000000 pixels, above the budget of {10**12}"


def test_lying_bombs_refused_by_header_and_memory_stays_bounded(store: FileStore) -> None:
    """Four real 12000x12000 PNGs (~140 KB each) whose FrameRefs claim 320x320, in one batch of 4 threads:
    each decoded would take 432 MB (BGR). Refused from the header; the worker's RSS barely moves."""
    bomb = png_bomb(12000, 12000)
    assert len(bomb) < 400_000
    good = _encode(np.full((320, 320, 3), 90, np.uint8), ".png")
    refs = [_ref(store.put(f"b/{i}.png", bomb), bomb) for i in range(4)]
    refs.append(_ref(store.put("g/ok.png", good), good))
    proc = psutil.Process()
    f = FrameFetcher(store, threads=4)
    try:
        before = proc.memory_info().rss
        out = f.fetch_all(refs)
        grew = proc.memory_info().rss - before
    finally:
        f.close()
    assert [r.error.error_type if r.error else "ok" for r in out] == ["image_too_large"] * 4 + ["ok"]
    assert out[4].image is not None and out[4].image.shape == (320, 320, 3)
    assert grew < 100 * 1024 * 1024, f"RSS grew by {grew / 2**20:.0f} MiB"


def test_bench_image_bomb_prints_json() -> None:
    from sqis.bench.bomb import measure

    out = measure(side=4000, frames=2, threads=2)
    assert out["outcomes"] == ["decoded", "decoded"] or out["side_px"] ** 2 > 50_000_000
    out = measure(side=9000, frames=2, threads=2)
    assert out["outcomes"] == ["image_too_large"] * 2 and out["peak_rss_growth_mb"] < 100


def test_honest_bomb_refused_from_the_frameref_too(store: FileStore) -> None:
    bomb = png_header_only(30000, 30000)
    ref = _ref(store.put("b/honest.png", bomb), bomb, w=30000, h=30000)
    f = FrameFetcher(store, threads=1)
    try:
        [r] = f.fetch_all([ref])
    finally:
        f.close()
    assert r.error is not None and r.error.error_type == "image_too_large"


def test_fetcher_from_settings_uses_the_pixel_budget(store: FileStore) -> None:
    from infra.settings import Settings

    s = Settings(worker_max_pixels=100 * 100, worker_image_encodings="png")
    img = _encode(np.zeros((101, 100, 3), np.uint8), ".png")
    jpg = _encode(np.zeros((10, 10, 3), np.uint8), ".jpg")
    refs = [_ref(store.put("x/a.png", img), img, 100, 101), _ref(store.put("x/b.jpg", jpg), jpg, 10, 10, "jpeg")]
    f = FrameFetcher.from_settings(store, s, 2)
    try:
        out = f.fetch_all(refs)
    finally:
        f.close()
    assert [r.error.error_type for r in out if r.error] == ["image_too_large", "unsupported_encoding"]


def test_opencv_decoder_ceiling_is_lowered() -> None:
    import subprocess
    import sys

    code = ("import inference_workers, os; import cv2, numpy as np; "
            "print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert int(out.stdout.strip()) <= 64 * 1024 * 1024 < 2**30, out.stderr


@pytest.mark.parametrize("fid", ["not-a-uuid", "", "../../etc", "x" * 500])
def test_non_uuid_frame_id_is_refused_before_any_io(store: FileStore, fid: str) -> None:
    data = _encode(np.zeros((8, 8, 3), np.uint8), ".png")
    ref = _ref(store.put("ok.png", data), data, 8, 8) | {"frame_id": fid}
    f = FrameFetcher(store, threads=1)
    try:
        [r] = f.fetch_all([ref])
    finally:
        f.close()
    assert r.error is not None and r.error.error_type == "invalid_frame_ref" and r.nbytes == 0
