"""The one internal dataset format (YOLO layout + data.yaml + dataset card) and the code that writes it.

Importers (training/importers/<format>.py) scan a source into a `SourceDataset`; `write_dataset` turns it
into OUT/images|labels|masks|labels-seg/{train,val,test}, OUT/data.yaml, OUT/card.json and OUT/CARD.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from training.errors import TrainingError

log = logging.getLogger(__name__)

IMPORTER_VERSION = "1.0"
CARD_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Boxes may overshoot the image by this many pixels (annotation rounding); they are clipped.
BOX_TOLERANCE_PX = 2.0
# Entries of OUT that the writer owns; --force removes only these.
_OUT_ENTRIES = ("images", "labels", "masks", "labels-seg", "data.yaml", "card.json", "CARD.md")

T = TypeVar("T")


class DatasetError(TrainingError):
    """A source dataset that cannot be imported; the message names the offending file."""


class Problems:
    """The problems of one source, found in one pass: a strict import refuses them all at once, and
    ``--skip-invalid`` drops what they concern and lists it in the card."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []  # {"file": ..., "reason": ...}

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, file: Path | str, reason: str) -> None:
        item = {"file": str(file), "reason": reason}
        if item not in self.items:  # a bad shared file (a Labels.txt) is met once per image it labels
            self.items.append(item)

    def add_error(self, exc: DatasetError) -> None:
        """Record a DatasetError ("<file>: <reason>", the form every importer raises)."""
        file, sep, reason = str(exc).partition(": ")
        self.add(file if sep else "", reason if sep else file)

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run a block that validates one sample; its DatasetError becomes a recorded problem."""
        try:
            yield
        except DatasetError as exc:
            self.add_error(exc)

    def report(self, src: Path) -> str:
        n = len(self.items)
        head = (f"{src}: {n} problem{'s' if n != 1 else ''}, nothing imported "
                "(--skip-invalid imports the rest and lists what it dropped in the card):")
        lines = [f"{p['file']}: {p['reason']}" if p["file"] else p["reason"] for p in self.items]
        return head + "\n  " + ";\n  ".join(lines)  # the CLI shows it as one line, problems split by ';'


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in continuous pixel coordinates (0..width, 0..height) of the original image."""

    cls: int
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class Sample:
    """One image of a source dataset with its annotations (pixel coordinates)."""

    key: str  # id used in split files, source-relative without extension (e.g. "kos01/Part0")
    name: str  # flat, unique output stem (e.g. "kos01_Part0")
    image: Path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    polygons: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (class, Nx2 float pixels)
    mask: Path | None = None  # source mask (defect where > 0)
    group: str | None = None  # samples of one group never straddle splits
    source_split: str | None = None  # split fixed by the source layout (e.g. a published test set)


@dataclass
class SourceDataset:
    """What an importer found: classes, samples and notes about the source."""

    format: str
    source: Path
    classes: list[str]
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)
    default_splits: Path | None = None  # split dir/file shipped with the source (used unless overridden)
    has_masks: bool = False
    skipped: list[dict[str, str]] = field(default_factory=list)  # --skip-invalid: {"file", "reason"} dropped


@dataclass
class SplitStats:
    """Per-split counts recorded in the card."""

    images: int = 0
    defect_free_images: int = 0
    boxes: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    images_per_class: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetCard:
    """The dataset card (OUT/card.json): where the data came from and what is in each split."""

    format: str
    source: str
    classes: list[str]
    splits: dict[str, SplitStats]
    split_origin: dict[str, Any]
    created_at: str
    importer_version: str = IMPORTER_VERSION
    card_version: int = CARD_VERSION
    has_masks: bool = False
    has_segments: bool = False
    total_images: int = 0
    total_boxes: int = 0
    duplicate_image_groups: int = 0
    notes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # files dropped by --skip-invalid, with why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DatasetCard:
        d = dict(d)
        d["splits"] = {k: SplitStats(**v) for k, v in d["splits"].items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def read_card(out: Path) -> DatasetCard:
    """Load OUT/card.json of an imported dataset (DatasetError when absent or unreadable)."""
    p = Path(out) / "card.json"
    try:
        return DatasetCard.from_json(json.loads(p.read_text()))
    except FileNotFoundError:
        raise DatasetError(
            f"{p}: not an imported dataset (no card.json); run `sqis data import` first"
        ) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(f"{p}: unreadable dataset card: {exc}") from None


# ----------------------------------------------------------------------------------------------- helpers


def progress(items: Sequence[T], description: str) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (transient; plain iteration when rich fails)."""
    try:
        from rich.console import Console
        from rich.progress import track
    except ImportError:  # pragma: no cover - rich is a base dependency
        yield from items
        return
    console = Console(stderr=True)
    if not console.is_terminal:  # no live bar (and no stray blank lines) when stderr is a log or pipe
        yield from items
        return
    yield from track(items, description=description, console=console, transient=True)


def find_image(directory: Path, stem: str) -> Path | None:
    """The image file `directory/stem.<ext>` for any known image extension (case-insensitive)."""
    for ext in IMAGE_EXTS:
        for e in (ext, ext.upper()):
            p = directory / f"{stem}{e}"
            if p.is_file():
                return p
    return None


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file; DatasetError naming the file when it cannot be decoded."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise DatasetError(f"{path}: image file is missing")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise DatasetError(f"{path}: unreadable image (cannot be decoded)")
    h, w = img.shape[:2]
    return int(w), int(h)


def read_mask(path: Path, expect_wh: tuple[int, int] | None = None) -> np.ndarray:
    """A mask as a bool array (defect where > 0); DatasetError when unreadable or of the wrong size."""
    import cv2

    if not path.is_file():
        raise DatasetError(f"{path}: mask file is missing")
    m = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise DatasetError(f"{path}: unreadable mask (cannot be decoded)")
    if m.ndim == 3:
        m = m.max(axis=2)
    if expect_wh is not None and (m.shape[1], m.shape[0]) != expect_wh:
        raise DatasetError(
            f"{path}: mask size {m.shape[1]}x{m.shape[0]} does not match its image ({expect_wh[0]}x{expect_wh[1]})"
        )
    return m > 0


def make_box(
    cls: int, x1: float, y1: float, x2: float, y2: float, w: int, h: int, where: Path | str
) -> Box | None:
    """Validate a pixel box against the image: clip an overshoot of <= 2 px, raise on more; None if empty."""
    if x2 < x1 or y2 < y1:
        raise DatasetError(f"{where}: inverted box ({x1}, {y1}, {x2}, {y2})")
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
        raise DatasetError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {w}x{h} image")
    x1, y1 = max(0.0, float(x1)), max(0.0, float(y1))
    x2, y2 = min(float(w), float(x2)), min(float(h), float(y2))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        log.warning("dropping an empty box", extra={"file": str(where)})
        return None
    return Box(cls, x1, y1, x2, y2)


def mask_to_instances(
    mask: np.ndarray, cls: int, min_area: int
) -> tuple[list[Box], list[tuple[int, np.ndarray]]]:
    """Boxes (connected components, 8-connected, >= min_area px) and their outer contours as polygons."""
    import cv2

    m = mask.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    boxes: list[Box] = []
    polys: list[tuple[int, np.ndarray]] = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        boxes.append(Box(cls, float(x), float(y), float(x + bw), float(y + bh)))
        comp = (labels[y : y + bh, x : x + bw] == i).astype(np.uint8)
        contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        c = max(contours, key=cv2.contourArea)
        c = cv2.approxPolyDP(c, 1.0, True).reshape(-1, 2).astype(np.float64)
        if len(c) < 3:  # a line or dot: use the component's box as its polygon
            c = np.array([[0, 0], [bw, 0], [bw, bh], [0, bh]], dtype=np.float64)
        else:
            c = c + 0.5  # pixel centres -> continuous coordinates
        c[:, 0] += x
        c[:, 1] += y
        polys.append((cls, c))
    return boxes, polys


def ellipse_to_box(
    a: float, b: float, angle_rad: float, cx: float, cy: float
) -> tuple[float, float, float, float]:
    """Axis-aligned bounding box of an ellipse (semi-axes a, b, rotation angle in radians, centre)."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    hw = float(np.sqrt((a * c) ** 2 + (b * s) ** 2))
    hh = float(np.sqrt((a * s) ** 2 + (b * c) ** 2))
    return cx - hw, cy - hh, cx + hw, cy + hh


def _file_digest(p: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ splits


def read_split_files(path: Path) -> dict[str, str]:
    """Split assignment from a dir of {train,val,test}.txt (one id per line) or a file of `id split` lines."""
    path = Path(path)
    out: dict[str, str] = {}

    def put(key: str, split: str, where: Path) -> None:
        key = key.strip().replace("\\", "/")
        for ext in IMAGE_EXTS:
            if key.lower().endswith(ext):
                key = key[: -len(ext)]
        if split not in SPLITS:
            raise DatasetError(f"{where}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        if key in out and out[key] != split:
            raise DatasetError(f"{where}: {key!r} is listed in both {out[key]} and {split}")
        out[key] = split

    if path.is_dir():
        found = False
        for split in SPLITS:
            f = path / f"{split}.txt"
            if f.is_file():
                found = True
                for line in f.read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        put(line.split()[0], split, f)
        if not found:
            raise DatasetError(f"{path}: no train.txt / val.txt / test.txt split files in this directory")
    elif path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 2:
                raise DatasetError(f"{path}:{n}: expected `<id> <split>`, got {line!r}")
            put(parts[0], parts[1], path)
    else:
        raise DatasetError(f"{path}: split file or directory does not exist")
    return out


def assign_from_file(samples: Sequence[Sample], table: Mapping[str, str], where: Path,
                     allow_unknown: bool = False) -> dict[str, str]:
    """Map each sample (by key, else by name) to its split; every sample and every listed id must match
    (``allow_unknown``: ids of samples dropped by --skip-invalid may be listed)."""
    result: dict[str, str] = {}
    used: set[str] = set()
    missing: list[str] = []
    for s in samples:
        for k in (s.key, s.name, Path(s.key).name):
            if k in table:
                result[s.name] = table[k]
                used.add(k)
                break
        else:
            missing.append(s.key)
    if missing:
        raise DatasetError(
            f"{where}: {len(missing)} image(s) of the dataset are in no split file, e.g. {', '.join(missing[:5])}"
        )
    unknown = sorted(set(table) - used)
    if unknown and not allow_unknown:
        raise DatasetError(
            f"{where}: {len(unknown)} id(s) in the split files match no image, e.g. {', '.join(unknown[:5])}"
        )
    return result


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_samples(samples: Sequence[Sample], digests: Mapping[str, str]) -> dict[str, list[Sample]]:
    """Groups that must stay in one split: explicit `group`s joined with byte-identical images."""
    uf = _UnionFind()
    first_by_digest: dict[str, str] = {}
    first_by_group: dict[str, str] = {}
    for s in samples:
        uf.find(s.name)
        d = digests.get(s.name)
        if d is not None:
            uf.union(s.name, first_by_digest.setdefault(d, s.name))
        if s.group is not None:
            uf.union(s.name, first_by_group.setdefault(s.group, s.name))
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[uf.find(s.name)].append(s)
    return dict(groups)


def dominant_class(boxes: Iterable[Box]) -> int:
    """The class with most boxes (ties -> lowest id); -1 for a defect-free image or group."""
    c = Counter(b.cls for b in boxes)
    if not c:
        return -1
    return min(c, key=lambda k: (-c[k], k))


def stratified_split(
    groups: Mapping[str, Sequence[Sample]], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """Seeded split of whole groups, stratified by dominant class (defect-free is its own stratum).

    `fractions` gives the share of each non-train split (e.g. {"val": .15, "test": .15}); the rest is train.
    """
    rng = random.Random(seed)
    strata: dict[int, list[str]] = defaultdict(list)
    for gid in sorted(groups):
        strata[dominant_class(b for s in groups[gid] for b in s.boxes)].append(gid)
    result: dict[str, str] = {}
    for stratum in sorted(strata):
        gids = strata[stratum]
        rng.shuffle(gids)
        n = sum(len(groups[g]) for g in gids)
        targets = [
            (sp, round(n * fractions[sp])) for sp in SPLITS if sp != "train" and fractions.get(sp, 0) > 0
        ]
        counts = dict.fromkeys(fractions, 0)
        for gid in gids:
            split = "train"
            for sp, target in targets:
                if counts[sp] < target:
                    split = sp
                    break
            if split != "train":
                counts[split] += len(groups[gid])
            for s in groups[gid]:
                result[s.name] = split
    return result


def choose_splits(
    ds: SourceDataset,
    digests: Mapping[str, str],
    splits: Path | None,
    seed: int,
    val_frac: float,
    test_frac: float,
    resplit: bool,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Split per sample name, and the card's `split_origin` describing how it was made."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DatasetError(f"bad split fractions: val {val_frac}, test {test_frac} (each in [0,1), sum < 1)")
    path = splits if splits is not None else (None if resplit else ds.default_splits)
    if path is not None:
        table = read_split_files(path)
        assignment = assign_from_file(ds.samples, table, path, allow_unknown=bool(ds.skipped))
        return assignment, {"kind": "file", "path": str(Path(path).resolve())}
    groups = group_samples(ds.samples, digests)
    fixed = [s for s in ds.samples if s.source_split is not None]
    if fixed and not resplit:
        # The source fixes the splits (e.g. a published test set): keep them; carve val out of train
        # (seeded, stratified) when the source has no val split.
        result = {s.name: s.source_split or "train" for s in ds.samples}
        pool = {g: ss for g, ss in groups.items() if all(s.source_split in (None, "train") for s in ss)}
        carve = not any(s.source_split == "val" for s in ds.samples)
        result.update(stratified_split(pool, {"val": val_frac} if carve else {}, seed))
        origin: dict[str, Any] = {"kind": "source", "seed": seed}
        if carve:
            origin.update(
                val_frac_of_train=val_frac, detail="val carved from the source's train (seeded, stratified)"
            )
        return result, origin
    result = stratified_split(groups, {"val": val_frac, "test": test_frac}, seed)
    return result, {
        "kind": "seeded-stratified",
        "seed": seed,
        "val_frac": val_frac,
        "test_frac": test_frac,
        "stratified_by": "dominant class (defect-free as its own stratum)",
        "grouped_by": "source groups and byte-identical images",
    }


# ----------------------------------------------------------------------------------------------- writing


def _yolo_line(b: Box, w: int, h: int) -> str:
    cx, cy = (b.x1 + b.x2) / 2 / w, (b.y1 + b.y2) / 2 / h
    return f"{b.cls} {cx:.6f} {cy:.6f} {(b.x2 - b.x1) / w:.6f} {(b.y2 - b.y1) / h:.6f}"


def _seg_line(cls: int, poly: np.ndarray, w: int, h: int) -> str:
    pts = np.clip(poly / np.array([w, h], dtype=np.float64), 0.0, 1.0).reshape(-1)
    return f"{cls} " + " ".join(f"{v:.6f}" for v in pts)


def _prepare_out(out: Path, src: Path, force: bool) -> None:
    out_r, src_r = out.resolve(), src.resolve()
    if out_r == src_r or out_r in src_r.parents:
        raise DatasetError(f"{out}: the output must not be the source directory or contain it")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DatasetError(
                f"{out}: output directory is not empty (use --force to replace an imported dataset)"
            )
        foreign = [p.name for p in out.iterdir() if p.name not in _OUT_ENTRIES]
        if not (out / "card.json").is_file() and foreign:
            raise DatasetError(f"{out}: not an imported dataset (no card.json); refusing to overwrite it")


def write_dataset(
    ds: SourceDataset,
    out: Path,
    *,
    splits: Path | None = None,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    resplit: bool = False,
    force: bool = False,
) -> DatasetCard:
    """Write `ds` in the internal format under `out` (built in a temp dir, then moved into place)."""
    out = Path(out)
    _prepare_out(out, ds.source, force)
    if not ds.samples:
        raise DatasetError(f"{ds.source}: no images found for format {ds.format!r}")
    names = Counter(s.name for s in ds.samples)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise DatasetError(f"{ds.source}: two images map to the same output name {dup[0]!r}")

    digests = {s.name: _file_digest(s.image) for s in progress(ds.samples, "hashing images")}
    by_digest: dict[str, list[str]] = defaultdict(list)
    for n, d in digests.items():
        by_digest[d].append(n)
    dup_groups = [sorted(v) for v in by_digest.values() if len(v) > 1]
    assignment, origin = choose_splits(ds, digests, splits, seed, val_frac, test_frac, resplit)
    notes = list(ds.notes)
    if ds.skipped:
        notes.append(f"{len(ds.skipped)} file(s) skipped (--skip-invalid); the card lists each with its reason")
    straddling = [g for g in dup_groups if len({assignment[n] for n in g}) > 1]
    if straddling:
        notes.append(
            f"{len(straddling)} group(s) of byte-identical images straddle splits, e.g. {straddling[0]}"
        )
    if dup_groups:
        notes.append(f"{len(dup_groups)} group(s) of byte-identical images, e.g. {dup_groups[0]}")

    stats = {
        sp: SplitStats(
            boxes_per_class=dict.fromkeys(ds.classes, 0), images_per_class=dict.fromkeys(ds.classes, 0)
        )
        for sp in SPLITS
    }
    has_segments = any(s.polygons for s in ds.samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
    try:
        kinds = (
            ["images", "labels"]
            + (["masks"] if ds.has_masks else [])
            + (["labels-seg"] if has_segments else [])
        )
        for kind in kinds:
            for sp in SPLITS:
                (tmp / kind / sp).mkdir(parents=True)
        for s in progress(ds.samples, f"writing {out.name}"):
            sp = assignment[s.name]
            ext = s.image.suffix.lower()
            shutil.copyfile(s.image, tmp / "images" / sp / f"{s.name}{ext}")
            lines = [_yolo_line(b, s.width, s.height) for b in s.boxes]
            (tmp / "labels" / sp / f"{s.name}.txt").write_text("".join(x + "\n" for x in lines))
            if has_segments:
                seg = [_seg_line(c, p, s.width, s.height) for c, p in s.polygons]
                (tmp / "labels-seg" / sp / f"{s.name}.txt").write_text("".join(x + "\n" for x in seg))
            if ds.has_masks:
                _write_mask(s, tmp / "masks" / sp / f"{s.name}.png")
            st = stats[sp]
            st.images += 1
            st.boxes += len(s.boxes)
            if not s.boxes:
                st.defect_free_images += 1
            for b in s.boxes:
                st.boxes_per_class[ds.classes[b.cls]] += 1
            for c in {b.cls for b in s.boxes}:
                st.images_per_class[ds.classes[c]] += 1
        if stats["train"].images == 0:
            raise DatasetError(f"{ds.source}: the train split is empty")
        for sp in ("val", "test"):
            if stats[sp].images == 0:
                notes.append(f"the {sp} split is empty")
        card = DatasetCard(
            format=ds.format,
            source=str(ds.source.resolve()),
            classes=list(ds.classes),
            splits=stats,
            split_origin=origin,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            has_masks=ds.has_masks,
            has_segments=has_segments,
            total_images=sum(st.images for st in stats.values()),
            total_boxes=sum(st.boxes for st in stats.values()),
            duplicate_image_groups=len(dup_groups),
            notes=notes,
            skipped=list(ds.skipped),
        )
        _write_data_yaml(tmp, out.resolve(), ds.classes, stats)
        (tmp / "card.json").write_text(json.dumps(card.to_json(), indent=2) + "\n")
        (tmp / "CARD.md").write_text(render_card_md(card))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "dataset imported",
        extra={"format": ds.format, "out": str(out), "images": card.total_images, "boxes": card.total_boxes},
    )
    return card


def _write_mask(s: Sample, dst: Path) -> None:
    import cv2

    if s.mask is not None:
        m = read_mask(s.mask, (s.width, s.height))
    else:
        m = np.zeros((s.height, s.width), dtype=bool)
    ok, buf = cv2.imencode(".png", m.astype(np.uint8) * 255)
    if not ok:  # pragma: no cover
        raise DatasetError(f"{dst}: cannot encode mask")
    dst.write_bytes(buf.tobytes())


def _write_data_yaml(tmp: Path, final: Path, classes: Sequence[str], stats: Mapping[str, SplitStats]) -> None:
    import yaml

    data: dict[str, Any] = {"path": str(final), "train": "images/train", "val": "images/val"}
    if stats["test"].images:
        data["test"] = "images/test"
    data["nc"] = len(classes)
    data["names"] = dict(enumerate(classes))
    (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir():
        for name in _OUT_ENTRIES:  # Ultralytics' label caches live inside labels/
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for p in tmp.iterdir():
            os.replace(p, out / p.name)
        tmp.rmdir()
    else:
        os.replace(tmp, out)


def render_card_md(card: DatasetCard) -> str:
    """Human-readable dataset card (OUT/CARD.md)."""
    lines = [
        f"# Dataset card: {Path(card.source).name}",
        "",
        f"- source format: `{card.format}`",
        f"- source path: `{card.source}`",
        f"- created: {card.created_at} (importer {card.importer_version})",
        f"- classes ({len(card.classes)}): " + ", ".join(f"{i}={c}" for i, c in enumerate(card.classes)),
        "- split origin: " + ", ".join(f"{k}={v}" for k, v in card.split_origin.items() if v is not None),
        f"- masks: {'yes' if card.has_masks else 'no'}; polygons (labels-seg): {'yes' if card.has_segments else 'no'}",
        f"- byte-identical image groups: {card.duplicate_image_groups}",
        "",
        "| split | images | defect-free | boxes | " + " | ".join(card.classes) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in card.classes) + " |",
    ]
    for sp, st in card.splits.items():
        per = " | ".join(
            f"{st.boxes_per_class.get(c, 0)} ({st.images_per_class.get(c, 0)} img)" for c in card.classes
        )
        lines.append(f"| {sp} | {st.images} | {st.defect_free_images} | {st.boxes} | {per} |")
    lines.append(
        f"| total | {card.total_images} | {sum(s.defect_free_images for s in card.splits.values())} "
        f"| {card.total_boxes} | "
        + " | ".join(
            str(sum(s.boxes_per_class.get(c, 0) for s in card.splits.values())) for c in card.classes
        )
        + " |"
    )
    if card.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card.notes]
    if card.skipped:
        lines += ["", f"## Skipped ({len(card.skipped)}, --skip-invalid)", ""]
        lines += [f"- `{p['file']}`: {p['reason']}" for p in card.skipped]
    return "\n".join(lines) + "\n"
