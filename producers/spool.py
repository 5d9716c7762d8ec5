"""A local on-disk spool for frames that could not be uploaded or published.

One file per frame under ``<state_dir>/spool/<deployment>/<camera>/`` (the deployment is the topic
prefix, so frames spooled for one deployment are never replayed into another's topics): a magic line, the FrameRef metadata as
JSON and the encoded image bytes. Files are written atomically (temp file, fsync, rename) and
named by capture time and sequence, so replay in name order is replay in capture order. The
spool is bounded by bytes; when full, the oldest frames are evicted (counted and logged).

Before the spool was kept per deployment it was ``<state_dir>/spool/<camera>/`` (same file format).
Frames left in that *legacy* layout carry no deployment, so no producer replays them by itself (that
would send them into whichever deployment starts first); `sqis spool show` lists them and
`sqis spool adopt --deployment PREFIX` moves them into a named deployment's spool (``adopt_legacy``).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from producers.base import ProducerError

log = logging.getLogger(__name__)

MAGIC = b"SQSPOOL1"
SUFFIX = ".spool"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class SpoolCorrupt(ProducerError):
    """A spool file cannot be parsed (truncated or foreign)."""


class SpoolEntryGone(ProducerError):
    """A spool file vanished before it was read (evicted by a full spool meanwhile): not corrupt."""


@dataclass(frozen=True, order=True)
class SpoolEntry:
    """One spooled frame; entries sort in capture order (by file name), across cameras."""

    name: str
    camera_dir: str
    size: int

    def path(self, root: Path) -> Path:
        return root / self.camera_dir / self.name


class SpoolLocked(ProducerError):
    """Another process owns this camera's spool (it is producing that camera)."""


def camera_dir_name(camera_id: str) -> str:
    return _SAFE.sub("_", camera_id) or "_"


def deployment_dir_name(topic_prefix: str) -> str:
    """The spool directory of a deployment: its topic prefix (``_default`` for none)."""
    return _SAFE.sub("_", topic_prefix) or "_default"


def spool_root(settings: Any) -> Path:
    """``<state_dir>/spool/<deployment>``: where this deployment's producers spool."""
    return Path(settings.state_dir) / "spool" / deployment_dir_name(settings.topic_prefix)


@dataclass(frozen=True)
class CameraSpool:
    """What waits in one camera's spool directory (for `sqis spool show`)."""

    deployment: str
    camera: str
    frames: int
    bytes: int
    oldest_us: int | None
    newest_us: int | None
    locked: bool  # a running producer owns it
    legacy: bool = False  # the pre-deployment layout: deployment unknown, waits for `sqis spool adopt`


LEGACY_DEPLOYMENT = "legacy (deployment unknown)"


def _is_locked(d: Path) -> bool:
    lock = d / ".lock"
    if not lock.exists():
        return False
    with open(lock, "ab") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _spool_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.suffix == SUFFIX and f.is_file())


def _camera_spool(deployment: str, cam: Path, *, legacy: bool = False) -> CameraSpool:
    files = _spool_files(cam)
    times = [int(f.name.split("-", 1)[0]) for f in files if f.name.split("-", 1)[0].isdigit()]
    return CameraSpool(deployment, cam.name, len(files), sum(f.stat().st_size for f in files),
                       min(times) if times else None, max(times) if times else None, _is_locked(cam), legacy)


def legacy_camera_dirs(spool_dir: Path) -> list[Path]:
    """Camera directories of the pre-deployment layout: ``<state_dir>/spool/<camera>/`` holding spool
    files directly (a deployment directory holds camera directories, never spool files)."""
    if not spool_dir.is_dir():
        return []
    return [d for d in sorted(spool_dir.iterdir())
            if d.is_dir() and not d.name.startswith(".") and _spool_files(d)]


def survey(spool_dir: Path) -> list[CameraSpool]:
    """Every camera directory of every deployment under ``<state_dir>/spool``, with what it holds;
    legacy-layout cameras come first, as deployment ``LEGACY_DEPLOYMENT``."""
    out = [_camera_spool(LEGACY_DEPLOYMENT, d, legacy=True) for d in legacy_camera_dirs(spool_dir)]
    if not spool_dir.is_dir():
        return out
    for dep in sorted(p for p in spool_dir.iterdir() if p.is_dir()):
        for cam in sorted(p for p in dep.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out.append(_camera_spool(dep.name, cam))
    return out


def warn_legacy(spool_dir: Path) -> list[CameraSpool]:
    """Log once, clearly, that legacy-layout frames wait and how to send them; returns them."""
    legacy = [_camera_spool(LEGACY_DEPLOYMENT, d, legacy=True) for d in legacy_camera_dirs(spool_dir)]
    if legacy:
        log.warning("%d frames of %d camera(s) wait under %s in the old spool layout (before the spool was kept "
                    "per deployment); their deployment is unknown, so no producer sends them. Check which "
                    "deployment they belong to, then `sqis spool adopt --deployment PREFIX` and "
                    "`sqis spool replay --topic-prefix PREFIX`", sum(r.frames for r in legacy), len(legacy),
                    spool_dir, extra={"spool": str(spool_dir), "cameras": ",".join(r.camera for r in legacy)})
    return legacy


@dataclass(frozen=True)
class Adoption:
    """What `adopt_legacy` did with one legacy camera directory."""

    camera: str
    moved: int
    skipped: str | None = None  # why nothing was moved (a running producer owns it)


def _try_lock(d: Path) -> IO[bytes] | None:
    f = open(d / ".lock", "ab")  # noqa: SIM115 - returned to the caller, who unlocks and closes it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt_legacy(spool_dir: Path, deployment_root: Path, cameras: Sequence[str] | None = None) -> list[Adoption]:
    """Move legacy-layout frames (``<spool_dir>/<camera>/*.spool``) into ``deployment_root/<camera>/``.

    A rename per file (same file system, name kept, so capture order is kept); both directories are
    locked meanwhile, and a camera whose legacy or target directory a running producer owns is skipped.
    An emptied legacy directory is removed.
    """
    out: list[Adoption] = []
    for d in legacy_camera_dirs(spool_dir):
        if cameras is not None and d.name not in {camera_dir_name(c) for c in cameras}:
            continue
        src_lock = _try_lock(d)
        if src_lock is None:
            out.append(Adoption(d.name, 0, f"a running producer of an older version owns {d}"))
            continue
        target = deployment_root / d.name
        try:
            target.mkdir(parents=True, exist_ok=True)
            dst_lock = _try_lock(target)
            if dst_lock is None:
                out.append(Adoption(d.name, 0, f"a running producer owns {target}; stop it, or adopt later"))
                continue
            try:
                moved = 0
                for f in sorted(d.iterdir()):
                    if f.name.startswith(".tmp-"):
                        f.unlink(missing_ok=True)  # half-written by a crashed run: never acknowledged
                    elif f.suffix == SUFFIX and f.is_file():
                        os.replace(f, target / f.name)
                        moved += 1
                _fsync_dir(target)
                _fsync_dir(d)
            finally:
                fcntl.flock(dst_lock, fcntl.LOCK_UN)
                dst_lock.close()
            out.append(Adoption(d.name, moved))
            log.info("legacy spool adopted", extra={"camera": d.name, "frames": moved, "into": str(target)})
            if {p.name for p in d.iterdir()} <= {".lock"}:
                (d / ".lock").unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    d.rmdir()
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(src_lock, fcntl.LOCK_UN)
            src_lock.close()
    return out


def unlocked_cameras(root: Path) -> list[str]:
    """Camera directories of one deployment's spool that hold frames and no running producer owns."""
    if not root.is_dir():
        return []
    return [d.name for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and any(f.suffix == SUFFIX for f in d.iterdir())
            and not _is_locked(d)]


class Spool:
    """Thread-safe, bounded, ordered frame spool (see the module doc).

    With ``cameras`` the spool owns just those cameras' directories (an exclusive flock each, so
    two processes never replay the same frames) and indexes only them; without, the whole root.
    """

    def __init__(self, root: str | Path, max_bytes: int = 1 << 30, *, cameras: Sequence[str] | None = None,
                 fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.evicted = 0
        self._lock = threading.Lock()
        self._index: list[SpoolEntry] = []
        self._bytes = 0
        self._held: list[IO[bytes]] = []
        dirs = None
        if cameras is not None:
            dirs = sorted({camera_dir_name(c) for c in cameras})
            try:
                for d in dirs:
                    self._claim(d)
            except BaseException:
                self.close()
                raise
        self._scan(dirs)

    def _claim(self, camera_dir: str) -> None:
        d = self.root / camera_dir
        d.mkdir(parents=True, exist_ok=True)
        f = open(d / ".lock", "ab")  # noqa: SIM115 - held for the spool's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise SpoolLocked(f"camera {camera_dir} is being produced by another process "
                              f"(its spool {d} is locked)") from None
        self._held.append(f)

    def close(self) -> None:
        """Release the camera locks."""
        for f in self._held:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        self._held.clear()

    def _scan(self, dirs: Sequence[str] | None) -> None:
        """Index what earlier runs left behind; remove half-written temp files."""
        cams = [self.root / d for d in dirs] if dirs is not None else sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for cam in cams:
            for f in cam.iterdir():
                if f.name.startswith(".tmp-"):
                    f.unlink(missing_ok=True)
                elif f.suffix == SUFFIX:
                    self._index.append(SpoolEntry(f.name, cam.name, f.stat().st_size))
        self._index.sort()
        self._bytes = sum(e.size for e in self._index)
        if self._index:
            log.info("spool holds frames from an earlier run",
                     extra={"spool": str(self.root), "frames": len(self._index), "bytes": self._bytes})

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def put(self, meta: dict[str, Any], data: bytes) -> tuple[SpoolEntry | None, int]:
        """Spool one frame; ``meta`` needs camera_id, captured_at, seq, frame_id.

        Returns (the entry, or None if it could not fit or was itself evicted; frames this call evicted,
        the dropped frame included), so concurrent callers each count their own evictions.
        """
        header = json.dumps(meta, separators=(",", ":")).encode()
        blob = MAGIC + struct.pack(">I", len(header)) + header + data
        camera_dir = camera_dir_name(str(meta["camera_id"]))
        name = f"{int(meta['captured_at']):017d}-{int(meta['seq']):012d}-{meta['frame_id']}{SUFFIX}"
        entry = SpoolEntry(name, camera_dir, len(blob))
        if entry.size > self.max_bytes:
            with self._lock:
                self.evicted += 1
            log.error("frame larger than the whole spool, dropped",
                      extra={"frame_id": meta["frame_id"], "camera_id": meta["camera_id"], "bytes": entry.size})
            return None, 1
        d = self.root / camera_dir
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, d / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            bisect.insort(self._index, entry)
            self._bytes += entry.size
            victims = []
            while self._bytes > self.max_bytes and self._index:
                v = self._index.pop(0)
                self._bytes -= v.size
                victims.append(v)
            self.evicted += len(victims)
        for v in victims:
            v.path(self.root).unlink(missing_ok=True)
            log.warning("spool full, oldest frame evicted", extra={"file": v.name, "camera": v.camera_dir})
        return (None if entry in victims else entry), len(victims)

    def oldest(self, n: int) -> list[SpoolEntry]:
        with self._lock:
            return self._index[:n]

    def read(self, entry: SpoolEntry) -> tuple[dict[str, Any], bytes]:
        """The frame's metadata and image bytes; SpoolEntryGone if the file was evicted meanwhile,
        SpoolCorrupt if it is unreadable."""
        try:
            raw = entry.path(self.root).read_bytes()
        except FileNotFoundError as exc:
            raise SpoolEntryGone(f"{entry.name}: evicted before replay") from exc
        except OSError as exc:
            raise SpoolCorrupt(f"{entry.name}: {exc}") from exc
        if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
            raise SpoolCorrupt(f"{entry.name}: not a spool file")
        (n,) = struct.unpack(">I", raw[len(MAGIC):len(MAGIC) + 4])
        start = len(MAGIC) + 4
        try:
            meta = json.loads(raw[start:start + n])
        except ValueError as exc:
            raise SpoolCorrupt(f"{entry.name}: bad metadata ({exc})") from exc
        return meta, raw[start + n:]

    def remove(self, entry: SpoolEntry) -> None:
        with self._lock:
            i = bisect.bisect_left(self._index, entry)
            if i < len(self._index) and self._index[i] == entry:
                self._index.pop(i)
                self._bytes -= entry.size
        entry.path(self.root).unlink(missing_ok=True)
