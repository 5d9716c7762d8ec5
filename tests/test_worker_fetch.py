"""Parallel fetch + decode against a real file:// object store: typed per-frame outcomes, retries."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inference_workers.fetch import (
    CorruptImage,
    FrameFetcher,
    HashMismatch,
    MissingObject,
    OversizedFrame,
    StoreUnavailable,
    UnreadableObject,
)
from infra.objectstore import FileStore, ObjectStoreError


def _jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _ref(uri: str, data: bytes, **kw: Any) -> dict[str, Any]:
    ref = {"frame_id": str(uuid.uuid5(uuid.NAMESPACE_URL, uri)), "uri": uri, "width": 64, "height": 48, "encoding": "jpeg",
           "content_sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    ref.update(kw)
    return ref


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore((tmp_path / "objects").as_uri())


class FlakyStore:
    """A real FileStore whose first ``failures`` reads of each URI fail as a transient error."""

    def __init__(self, inner: FileStore, failures: int) -> None:
        self.inner, self.failures = inner, failures
        self.url = inner.url
        self.calls: dict[str, int] = {}

    def get(self, uri: str) -> bytes:
        n = self.calls[uri] = self.calls.get(uri, 0) + 1
        if n <= self.failures:
            raise ObjectStoreError(f"simulated outage #{n}")
        return self.inner.get(uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_good_frames_decode_in_order(store: FileStore) -> None:
    datas = [_jpeg(i) for i in range(20)]
    refs = [_ref(store.put(f"f/{i}.jpg", d), d) for i, d in enumerate(datas)]
    f = FrameFetcher(store, threads=4)
    try:
        out = f.fetch_all(refs)
    finally:
        f.close()
    assert [r.ok for r in out] == [True] * 20
    for r, d in zip(out, datas, strict=True):
        want = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
        assert r.image is not None and np.array_equal(r.image, want)
        assert r.nbytes == len(d) and r.fetch_ms >= 0 and r.decode_ms >= 0


def test_each_bad_frame_gets_its_own_typed_error(store: FileStore) -> None:
    good = _jpeg(1)
    trunc = good[: len(good) // 2]
    garbage = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"
    big = _jpeg(2, 400, 400)
    refs = [
        _ref(store.put("a.jpg", good), good),
        _ref(store.url + "/nope.jpg", good),  # missing object
        _ref(store.put("t.jpg", trunc), trunc),  # truncated, hash and size of the truncated bytes
        _ref(store.put("g.jpg", garbage), garbage),  # JPEG markers, garbage inside
        _ref(store.put("h.jpg", good), good, content_sha256="0" * 64),  # hash mismatch
        _ref(store.put("s.jpg", good), good, size_bytes=len(good) + 10),  # size differs from the FrameRef
        _ref(store.put("b.jpg", big), big),  # over the byte limit
        _ref(store.put("d.jpg", good), good, size_bytes=10**9),  # declared over the limit: never fetched
        _ref(store.put("z.jpg", good), good),
    ]
    f = FrameFetcher(store, threads=3, max_frame_bytes=len(big) - 1)
    try:
        out = f.fetch_all(refs)
    finally:
        f.close()
    kinds = [type(r.error) if r.error else None for r in out]
    assert kinds == [None, MissingObject, CorruptImage, CorruptImage, HashMismatch, CorruptImage,
                     OversizedFrame, OversizedFrame, None]
    assert [r.error.error_type for r in out if r.error] == [
        "missing_object", "corrupt_image", "corrupt_image", "hash_mismatch", "corrupt_image",
        "oversized_frame", "oversized_frame"]
    assert all(not r.error.transient for r in out if r.error)


def test_pixel_limit(store: FileStore) -> None:
    d = _jpeg(3, 200, 100)
    f = FrameFetcher(store, threads=1, max_pixels=200 * 100 - 1)
    try:
        (r,) = f.fetch_all([_ref(store.put("p.jpg", d), d, width=0, height=0)])  # decoded size is checked too
    finally:
        f.close()
    assert isinstance(r.error, OversizedFrame)


def test_transient_errors_are_retried_with_backoff_and_counted(store: FileStore) -> None:
    d = _jpeg(4)
    flaky = FlakyStore(store, failures=2)
    sleeps: list[float] = []
    f = FrameFetcher(flaky, threads=2, retries=3, backoff_s=0.01, sleep=sleeps.append)  # type: ignore[arg-type]
    try:
        out = f.fetch_all([_ref(store.put(f"r{i}.jpg", d), d) for i in range(3)])
    finally:
        f.close()
    assert all(r.ok for r in out)
    assert [r.retries for r in out] == [2, 2, 2] and f.retry_count == 6
    assert sorted(sleeps) == [0.01] * 3 + [0.02] * 3  # doubling backoff per frame


def test_persistent_outage_is_a_transient_error_not_a_bad_frame(store: FileStore) -> None:
    d = _jpeg(5)
    flaky = FlakyStore(store, failures=100)
    sleeps: list[float] = []
    f = FrameFetcher(flaky, threads=1, retries=4, backoff_s=0.1, max_backoff_s=0.3, sleep=sleeps.append)  # type: ignore[arg-type]
    try:
        (r,) = f.fetch_all([_ref(store.put("x.jpg", d), d)])
    finally:
        f.close()
    assert isinstance(r.error, StoreUnavailable) and r.error.transient
    assert sleeps == [0.1, 0.2, 0.3, 0.3]  # bounded: 4 retries, capped backoff
    assert flaky.calls[next(iter(flaky.calls))] == 5


class RaisingStore:
    """A store whose every read fails with ``make()``, counting the reads."""

    def __init__(self, make: Any) -> None:
        self.make, self.reads, self.url = make, 0, "mem://"

    def get(self, uri: str) -> bytes:
        self.reads += 1
        raise self.make()


def _fetch_one(store: Any, uri: str) -> tuple[Any, list[float]]:
    sleeps: list[float] = []
    f = FrameFetcher(store, threads=1, retries=3, backoff_s=0.01, sleep=sleeps.append)
    try:
        (r,) = f.fetch_all([{"frame_id": str(uuid.uuid4()), "uri": uri, "width": 1, "height": 1, "encoding": "jpeg"}])
    finally:
        f.close()
    return r, sleeps


def test_permanent_file_errors_are_bad_input_not_an_outage(store: FileStore) -> None:
    d = _jpeg(6)
    (store.root / "dir.jpg").mkdir()  # EISDIR
    store.put("plain.jpg", d)
    for uri in (store.url + "/dir.jpg", store.url + "/plain.jpg/x.jpg", store.url + "/" + "n" * 300 + ".jpg"):
        r, sleeps = _fetch_one(store, uri)  # EISDIR, ENOTDIR, ENAMETOOLONG
        assert isinstance(r.error, UnreadableObject) and not r.error.transient, (uri, r.error)
        assert r.error.error_type == "unreadable_object" and sleeps == []  # not retried


def _os_error(code: int) -> ObjectStoreError:
    try:
        raise OSError(code, os.strerror(code))
    except OSError as exc:
        try:
            raise ObjectStoreError(f"cannot read: {exc}") from exc
        except ObjectStoreError as wrapped:
            return wrapped


def _s3_error(status: int, code: str) -> ObjectStoreError:
    from botocore.exceptions import ClientError

    try:
        raise ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                          "GetObject")
    except ClientError as exc:
        try:
            raise ObjectStoreError(f"cannot read: {exc}") from exc
        except ObjectStoreError as wrapped:
            return wrapped


@pytest.mark.parametrize(("make", "permanent"), [
    (lambda: _os_error(errno.EACCES), True),
    (lambda: _os_error(errno.EISDIR), True),
    (lambda: _os_error(errno.EIO), False),
    (lambda: _s3_error(403, "AccessDenied"), True),
    (lambda: _s3_error(400, "InvalidRequest"), True),
    (lambda: _s3_error(408, "RequestTimeout"), False),
    (lambda: _s3_error(429, "SlowDown"), False),
    (lambda: _s3_error(503, "SlowDown"), False),
    (lambda: _s3_error(500, "InternalError"), False),
    (lambda: ObjectStoreError("connection refused"), False),
])
def test_store_errors_are_classified_permanent_or_transient(make: Any, permanent: bool) -> None:
    rs = RaisingStore(make)
    r, sleeps = _fetch_one(rs, "s3://b/k.jpg")
    if permanent:
        assert isinstance(r.error, UnreadableObject) and rs.reads == 1 and sleeps == []
    else:
        assert isinstance(r.error, StoreUnavailable) and r.error.transient and rs.reads == 4


def test_file_store_objects_are_world_readable(store: FileStore) -> None:
    uri = store.put("m/p.jpg", b"x")
    assert stat.S_IMODE(os.stat(store._path(uri)).st_mode) == 0o644


class SlowFailingStore:
    """Every read fails after ``delay_s`` (a store timing out): retries must stop at the batch deadline."""

    def __init__(self, inner: FileStore, delay_s: float) -> None:
        self.inner, self.delay_s, self.url, self.calls = inner, delay_s, inner.url, 0

    def get(self, uri: str) -> bytes:
        import time

        self.calls += 1
        time.sleep(self.delay_s)
        raise ObjectStoreError("read timed out")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_retries_stop_at_the_per_batch_deadline(store: FileStore) -> None:
    """#8 item 6: one retry layer, bounded by a deadline per batch (so a batch cannot outlast
    max.poll.interval.ms however many retries are configured); the frame is retried later, not lost."""
    import time

    d = _jpeg(6)
    slow = SlowFailingStore(store, 0.2)
    f = FrameFetcher(slow, threads=2, retries=1000, backoff_s=0.05, max_backoff_s=0.1,  # type: ignore[arg-type]
                     batch_deadline_s=1.0)
    try:
        t0 = time.monotonic()
        out = f.fetch_all([_ref(store.put(f"s{i}.jpg", d), d) for i in range(2)])
        took = time.monotonic() - t0
    finally:
        f.close()
    assert all(isinstance(r.error, StoreUnavailable) and "deadline" in str(r.error) for r in out)
    assert took < 2.0 and slow.calls < 20  # not 1000 retries
    assert f.m_retries._value.get() == f.retry_count > 0  # counted in this fetcher's own registry


def test_image_stats_are_cheap_grey_statistics(store: FileStore) -> None:
    from inference_workers.fetch import image_stats

    flat = np.full((600, 800, 3), 80, np.uint8)
    b, c, s = image_stats(flat)
    assert b == pytest.approx(80, abs=0.5) and c == pytest.approx(0, abs=0.5) and s == pytest.approx(0, abs=1e-3)
    edges = flat.copy()
    for x in range(0, 800, 32):
        edges[:, x:x + 16] = 200  # stripes: high contrast, sharp edges
    b2, c2, s2 = image_stats(edges)
    assert c2 > 30 and s2 > 100 and 80 < b2 < 200
    blurred = cv2.GaussianBlur(edges, (15, 15), 5)
    assert image_stats(blurred)[2] < s2  # blur lowers the variance of the Laplacian
