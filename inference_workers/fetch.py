"""Fetch frames from the object store and decode them in parallel, one typed outcome per frame.

Each frame is fetched, checked (size, SHA-256, container structure) and decoded on a thread of
a bounded pool; ``cv2.imdecode`` and the store's I/O release the GIL. A bad frame yields a
:class:`FrameError` in its slot so one bad frame never fails the batch. Transient store errors
are retried with bounded exponential backoff; when they persist the outcome is
:class:`StoreUnavailable`, which is *not* the frame's fault (the worker retries it later instead
of dead-lettering it). Permanent store errors for one object (a directory, no permission, an S3
4xx) are :class:`UnreadableObject`: bad input, not retried.

Image bombs: :func:`decode_image` reads the real format and dimensions from the image header (Pillow,
no pixel data decoded) and refuses an encoding outside the allow-list or an image above the pixel
budget *before* OpenCV allocates anything; the FrameRef's declared width/height are not trusted.
OpenCV's own decoder ceiling (``OPENCV_IO_MAX_IMAGE_PIXELS``) is lowered by the package's
``__init__`` as a second line of defence.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from prometheus_client import CollectorRegistry, Counter

from inference_workers.errors import InferenceError
from infra.objectstore import ObjectNotFound, ObjectStore, ObjectStoreError, OutsideStore

log = logging.getLogger(__name__)

STATS_SIDE = 256  # image statistics are computed on a grey copy at most this many pixels on its long side

DEFAULT_MAX_FRAME_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_ENCODINGS = ("jpeg", "png", "bmp")  # what the producers write; TIFF, WebP, JPEG 2000, EXR... refused

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class FrameError(InferenceError):
    """Why one frame could not be turned into an image; ``error_type`` names it in the DLQ."""

    error_type = "frame_error"
    transient = False


class MissingObject(FrameError):
    error_type = "missing_object"


class RefusedUri(FrameError):
    """The FrameRef's URI points outside the configured store: refused, never read."""

    error_type = "outside_store"


class InvalidFrameRef(FrameError):
    """The FrameRef itself is unusable (e.g. a frame_id that is not a UUID): refused before any I/O, so
    it is dead-lettered once here instead of inspected and then refused by every sink."""

    error_type = "invalid_frame_ref"


def validate_frame_ref(ref: Mapping[str, Any]) -> None:
    """InvalidFrameRef unless the FrameRef can become an Inspection every sink accepts."""
    import uuid

    fid = ref.get("frame_id")
    try:
        uuid.UUID(str(fid))
    except ValueError:
        raise InvalidFrameRef(f"frame_id {str(fid)[:80]!r} is not a UUID") from None
    if not ref.get("uri"):
        raise InvalidFrameRef("FrameRef has no uri")
    w, h = ref.get("width"), ref.get("height")
    if any(v is not None and (not isinstance(v, int) or v < 0) for v in (w, h)):  # 0: not declared
        raise InvalidFrameRef(f"FrameRef declares {str(w)[:20]} x {str(h)[:20]} px: not a frame size")


class CorruptImage(FrameError):
    error_type = "corrupt_image"


class OversizedFrame(FrameError):
    error_type = "oversized_frame"


class ImageTooLarge(OversizedFrame):
    """The image header declares more pixels than the budget: refused before decoding (image bomb)."""

    error_type = "image_too_large"


class UnsupportedEncoding(FrameError):
    """The image is in a format outside the allow-list (the real format, read from its header)."""

    error_type = "unsupported_encoding"


class HashMismatch(FrameError):
    error_type = "hash_mismatch"


class UnreadableObject(FrameError):
    """The store answered with a permanent error for this object (a directory, no permission, bad name)."""

    error_type = "unreadable_object"


class StoreUnavailable(FrameError):
    """The store kept failing after the bounded retries: retry the frame later, do not DLQ it."""

    error_type = "store_unavailable"
    transient = True


@dataclass
class FetchResult:
    """One frame's outcome: ``image`` (HxWx3 BGR uint8) or ``error``, with per-stage times."""

    image: np.ndarray | None
    error: FrameError | None
    fetch_ms: float
    decode_ms: float
    nbytes: int = 0
    retries: int = 0
    stats: tuple[float, float, float] | None = None  # brightness, contrast, sharpness (see image_stats)
    prepared: Any = None  # the model's input for this frame, made by the caller's ``prepare`` (or None)

    @property
    def ok(self) -> bool:
        return self.error is None


class FrameFetcher:
    """Fetches and decodes a batch of frames on ``threads`` threads."""

    def __init__(self, store: ObjectStore, threads: int = 4, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, retries: int = 3, backoff_s: float = 0.05,
                 max_backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep,
                 registry: CollectorRegistry | None = None, batch_deadline_s: float = 20.0,
                 encodings: Sequence[str] = DEFAULT_ENCODINGS) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.store = store
        self.max_frame_bytes = max_frame_bytes
        self.max_pixels = max_pixels
        self.encodings = tuple(e.lower() for e in encodings)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch")
        self._lock = threading.Lock()
        self.retry_count = 0
        # One retry layer, here, bounded by a per-batch deadline: a batch never holds the worker for
        # longer than batch_deadline_s, however the store misbehaves (the frame is then retried later).
        self.batch_deadline_s = batch_deadline_s
        registry = registry if registry is not None else CollectorRegistry()
        self.m_retries = Counter("sqis_worker_fetch_retries_total",
                                 "object-store reads retried after a transient error", registry=registry)
        self.m_errors = Counter("sqis_worker_fetch_errors_total", "frames that could not be fetched or decoded",
                                ["error_type"], registry=registry)

    @classmethod
    def from_settings(cls, store: ObjectStore, settings: Any, threads: int = 4, **kw: Any) -> FrameFetcher:
        """A fetcher with the pixel budget, encoding allow-list, retries and batch deadline of the settings (SQIS_WORKER_*)."""
        kw.setdefault("max_pixels", settings.worker_max_pixels)
        kw.setdefault("encodings", [e.strip() for e in settings.worker_image_encodings.split(",") if e.strip()])
        kw.setdefault("retries", settings.worker_fetch_retries)
        kw.setdefault("batch_deadline_s", settings.worker_fetch_deadline_s)
        return cls(store, threads, **kw)

    def fetch_all(self, refs: Sequence[Mapping[str, Any]]) -> list[FetchResult]:
        """One result per FrameRef, in order; never raises for a bad frame."""
        return [f.result() for f in self.submit(refs)]

    def submit(self, refs: Sequence[Mapping[str, Any]], prepare: Callable[[np.ndarray], Any] | None = None
               ) -> list[Future[FetchResult]]:
        """Start fetching and decoding a batch in the pool; one future per FrameRef, in order.

        ``prepare`` (e.g. the detector's letterbox-to-tensor step) runs on each decoded image in the
        pool too, so it overlaps the inference of the previous batch; its result is ``prepared``."""
        deadline = time.monotonic() + self.batch_deadline_s
        return [self._pool.submit(self.fetch_one, ref, deadline, prepare) for ref in refs]

    def fetch_one(self, ref: Mapping[str, Any], deadline: float | None = None,
                  prepare: Callable[[np.ndarray], Any] | None = None) -> FetchResult:
        t0 = time.perf_counter()
        retries = 0
        try:
            validate_frame_ref(ref)
            data, retries = self._get(ref, deadline)
            t1 = time.perf_counter()
            self._check(ref, data)
        except FrameError as exc:
            self.m_errors.labels(exc.error_type).inc()
            return FetchResult(None, exc, (time.perf_counter() - t0) * 1000, 0.0, retries=retries)
        try:
            image = decode_image(data, max_pixels=self.max_pixels, encodings=self.encodings)
        except FrameError as exc:
            self.m_errors.labels(exc.error_type).inc()
            return FetchResult(None, exc, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000, len(data), retries)
        stats = image_stats(image)
        prepared = None
        if prepare is not None:
            try:
                prepared = prepare(image)
            except Exception:  # noqa: BLE001 - the infer stage prepares it again and reports the error there
                prepared = None
        return FetchResult(image, None, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000, len(data), retries,
                           stats, prepared)

    def _get(self, ref: Mapping[str, Any], deadline: float | None = None) -> tuple[bytes, int]:
        uri = ref["uri"]
        declared = int(ref.get("size_bytes") or 0)
        if declared > self.max_frame_bytes:
            raise OversizedFrame(f"declared size {declared} B exceeds the limit of {self.max_frame_bytes} B")
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return self.store.get(uri), attempt
            except OutsideStore as exc:
                raise RefusedUri(f"refused: outside the store: {exc}") from None
            except ObjectNotFound:
                raise MissingObject(f"no object at {uri}") from None
            except ObjectStoreError as exc:
                if is_permanent(exc):
                    raise UnreadableObject(f"{uri}: {exc}") from None
                if attempt == self.retries:
                    raise StoreUnavailable(f"{uri}: {exc} (after {attempt} retries)") from None
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"{uri}: {exc} (batch deadline of {self.batch_deadline_s:g} s reached "
                                           f"after {attempt} retries)") from None
                self.m_retries.inc()
                with self._lock:
                    self.retry_count += 1
                log.warning("object store read failed, retrying",
                            extra={"uri": uri, "attempt": attempt + 1, "error": str(exc)})
                self._sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    def _check(self, ref: Mapping[str, Any], data: bytes) -> None:
        if len(data) > self.max_frame_bytes:
            raise OversizedFrame(f"{len(data)} B exceeds the limit of {self.max_frame_bytes} B")
        w, h = int(ref.get("width") or 0), int(ref.get("height") or 0)
        if w * h > self.max_pixels:
            raise ImageTooLarge(f"FrameRef declares {w}x{h}, above the budget of {self.max_pixels} pixels")
        declared = int(ref.get("size_bytes") or 0)
        if declared and declared != len(data):
            raise CorruptImage(f"object has {len(data)} B, the FrameRef declares {declared} B (truncated?)")
        want = (ref.get("content_sha256") or "").lower()
        if want:
            got = hashlib.sha256(data).hexdigest()
            if got != want:
                raise HashMismatch(f"sha256 {got[:16]}... != declared {want[:16]}...")
        check_container(data, str(ref.get("encoding") or ""))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# OS errors that retrying cannot fix: the reference is bad, not the store.
_PERMANENT_ERRNOS = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                               errno.ELOOP})


def is_permanent(exc: ObjectStoreError) -> bool:
    """True when a store error is about this object (retrying is useless), False when the store may recover.

    Judged from the cause the backend chained: an OSError errno of the file store, or the HTTP status
    of an S3 ClientError (4xx except 408 Request Timeout and 429 Too Many Requests).
    """
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return cause.errno in _PERMANENT_ERRNOS
    response = getattr(cause, "response", None)
    if isinstance(response, Mapping):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return 400 <= status < 500 and status not in (408, 429)
    return False


def check_container(data: bytes, encoding: str) -> None:
    """Cheap structural checks that catch truncated files, which libjpeg would decode half-grey."""
    enc = encoding.lower()
    if not data:
        raise CorruptImage("empty object")
    if data[:2] == b"\xff\xd8" or enc in ("jpeg", "jpg"):
        if data[:2] != b"\xff\xd8":
            raise CorruptImage("not a JPEG (no SOI marker)")
        if b"\xff\xd9" not in data[-64:]:
            raise CorruptImage("truncated JPEG (no EOI marker at the end)")
    elif data[:8] == _PNG_SIG or enc == "png":
        if data[:8] != _PNG_SIG:
            raise CorruptImage("not a PNG (bad signature)")
        if b"IEND" not in data[-16:]:
            raise CorruptImage("truncated PNG (no IEND chunk at the end)")


def image_stats(image: np.ndarray) -> tuple[float, float, float]:
    """(brightness = mean grey, contrast = std grey, sharpness = variance of the Laplacian) of a BGR frame,
    on a grey copy downscaled to at most STATS_SIDE pixels on its long side (a fraction of a millisecond)."""
    h, w = image.shape[:2]
    scale = min(1.0, STATS_SIDE / max(h, w))
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    mean, std = cv2.meanStdDev(grey)
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    return float(mean[0, 0]), float(std[0, 0]), float(lap.var())


@dataclass(frozen=True)
class ImageHeader:
    """What the image's own header says: the format (Pillow's name, lower case) and its size."""

    encoding: str
    width: int
    height: int


_PIL_FORMATS = {"jpeg": "jpeg", "mpo": "jpeg", "png": "png", "bmp": "bmp", "dib": "bmp", "tiff": "tiff",
                "webp": "webp", "gif": "gif", "jpeg2000": "jpeg2000", "ppm": "pnm"}


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                encodings: Sequence[str] = DEFAULT_ENCODINGS) -> ImageHeader:
    """Read the real format and dimensions from the header only, and refuse what must not be decoded.

    Raises CorruptImage (no recognisable header), UnsupportedEncoding (format outside ``encodings``)
    or ImageTooLarge (width*height above ``max_pixels``). Nothing is decompressed: a 30000x30000
    PNG of 1 MB costs microseconds here, where decoding it would allocate 2.7 GB.
    """
    from PIL import Image

    if not data:
        raise CorruptImage("empty object")
    # Ultralytics, when imported in the same process (eval, training), replaces PIL.Image.open with a
    # version that tries to pip-install a HEIF plugin on unidentified input: use Pillow's own.
    pil_open = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", None) or Image.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pil_open(io.BytesIO(data)) as im:  # lazy: parses the header, decodes no pixels
                fmt, (w, h) = (im.format or "").lower(), im.size
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling (2x its MAX_IMAGE_PIXELS)
        m = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow names the pixel count, not the dimensions
        px = f"{m.group(1)} pixels" if m else "more pixels than Pillow's ceiling"
        raise ImageTooLarge(f"image header declares {px}, above the budget of {max_pixels}") from None
    except Exception as exc:  # hostile bytes: whatever a header parser raises, the frame is corrupt
        raise CorruptImage(f"no readable image header: {' '.join(str(exc).split())[:200]}") from None
    encoding = _PIL_FORMATS.get(fmt, fmt or "unknown")
    if encoding not in encodings:
        raise UnsupportedEncoding(f"{encoding} image refused; allowed: {', '.join(encodings)}")
    if w <= 0 or h <= 0:
        raise CorruptImage(f"image header declares {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image header declares {w}x{h} = {w * h} pixels, above the budget of {max_pixels}")
    return ImageHeader(encoding, w, h)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 encodings: Sequence[str] = DEFAULT_ENCODINGS) -> np.ndarray:
    """Bytes -> HxWx3 BGR uint8 (EXIF orientation applied, 16-bit and grey converted), or a FrameError.

    The header is probed first (:func:`probe_image`), so an image bomb is refused before any pixel
    buffer is allocated, whatever the FrameRef declares.
    """
    probe_image(data, max_pixels=max_pixels, encodings=encodings)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise CorruptImage(f"cannot decode: {' '.join(str(exc).split())[:200]}") from None
    if image is None or image.size == 0:
        raise CorruptImage("cannot decode image (corrupt or unsupported format)")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageTooLarge(f"{image.shape[1]}x{image.shape[0]} exceeds the limit of {max_pixels} pixels")
    return image
