"""Generic Pascal VOC: Annotations/*.xml + JPEGImages/*, optional ImageSets/Main/{train,val,test}.txt."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import (
    SPLITS,
    DatasetError,
    Problems,
    Sample,
    SourceDataset,
    find_image,
    image_size,
    make_box,
    progress,
)

if TYPE_CHECKING:
    from training.importers import ImportOptions

log = logging.getLogger(__name__)

ANNOTATION_DIRS = ("Annotations", "ANNOTATIONS", "annotations")
IMAGE_DIRS = ("JPEGImages", "IMAGES", "Images", "images")


def _first_dir(src: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (src / n).is_dir():
            return src / n
    raise DatasetError(f"{src}: no {names[0]}/ directory (looked for {', '.join(names)})")


def _num(el: ET.Element, tag: str, xml: Path) -> float:
    txt = el.findtext(tag)
    if txt is None:
        raise DatasetError(f"{xml}: <{tag}> missing in <bndbox>")
    try:
        return float(txt.strip())
    except ValueError:
        raise DatasetError(f"{xml}: <{tag}> is not a number: {txt!r}") from None


def parse_xml(xml: Path) -> tuple[str | None, list[tuple[str, tuple[float, float, float, float]]]]:
    """(filename field, [(class name, (xmin, ymin, xmax, ymax))]) of one VOC XML file."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml}: invalid XML ({exc})") from None
    objs = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{xml}: <object> without a <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{xml}: object {name!r} has no <bndbox>")
        objs.append((name, tuple(_num(bb, t, xml) for t in ("xmin", "ymin", "xmax", "ymax"))))
    fn = root.findtext("filename")
    return (fn.strip() if fn else None), objs  # type: ignore[return-value]


def resolve_image(images: Path, xml: Path, filename: str | None) -> Path:
    """The image of an XML: its <filename> (with or without extension), else the XML's own stem."""
    if filename:
        p = images / filename
        if p.is_file() and p.suffix:
            return p
        found = find_image(
            images,
            Path(filename).stem
            if Path(filename).suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
            else filename,
        )
        if found is not None:
            return found
    found = find_image(images, xml.stem)
    if found is None:
        raise DatasetError(f"{xml}: its image ({filename or xml.stem}) is missing from {images}")
    return found


def scan_voc(
    src: Path,
    fmt: str,
    classes: list[str] | None,
    *,
    ann_dir: Path | None = None,
    img_dir: Path | None = None,
    problems: Problems | None = None,
) -> SourceDataset:
    """Scan a VOC-style tree; with `classes` given, another class name is an error naming the XML.
    Each invalid XML or image is recorded in ``problems`` and left out."""
    problems = Problems() if problems is None else problems
    ann_dir = ann_dir or _first_dir(src, ANNOTATION_DIRS)
    img_dir = img_dir or _first_dir(src, IMAGE_DIRS)
    xmls = sorted(p for p in ann_dir.iterdir() if p.suffix.lower() == ".xml")
    if not xmls:
        raise DatasetError(f"{ann_dir}: no XML annotation files")
    parsed = []
    no_ext = 0
    for xml in progress(xmls, "reading XML"):
        with problems.check():
            fn, objs = parse_xml(xml)
            parsed.append((xml, resolve_image(img_dir, xml, fn), objs))
            if fn is not None and not Path(fn).suffix:
                no_ext += 1
    fixed = classes is not None
    names = list(classes) if fixed else sorted({n for _, _, objs in parsed for n, _ in objs})
    index = {n: i for i, n in enumerate(names)}
    samples = []
    notes: list[str] = []
    if no_ext:
        notes.append(f"{no_ext} XML <filename> fields lack the extension; images matched by stem")
    for xml, img, objs in progress(parsed, "checking images"):
        with problems.check():
            w, h = image_size(img)
            boxes = []
            for name, (x1, y1, x2, y2) in objs:
                if name not in index:
                    raise DatasetError(f"{xml}: unknown class {name!r} (known: {', '.join(names)})")
                # VOC boxes are 1-based inclusive pixel indices -> continuous [xmin-1, xmax].
                b = make_box(index[name], x1 - 1, y1 - 1, x2, y2, w, h, xml)
                if b is not None:
                    boxes.append(b)
            samples.append(Sample(key=xml.stem, name=xml.stem, image=img, width=w, height=h, boxes=boxes))
    ds = SourceDataset(format=fmt, source=src, classes=names, samples=samples, notes=notes)
    imagesets = src / "ImageSets" / "Main"
    if imagesets.is_dir():
        _apply_imagesets(ds, imagesets, lenient=bool(problems))
    return ds


def _apply_imagesets(ds: SourceDataset, d: Path, lenient: bool = False) -> None:
    """ImageSets/Main/{train,val,test,trainval}.txt -> each sample's source split (unlisted -> train);
    ``lenient``: ids of samples left out for their problems may be listed."""
    by_key = {s.key: s for s in ds.samples}
    files = {sp: d / f"{sp}.txt" for sp in (*SPLITS, "trainval")}
    if not any(f.is_file() for f in files.values()):
        return
    for sp in ("trainval", *SPLITS):
        f = files[sp]
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            key = line.split()[0] if line.split() else ""
            if not key:
                continue
            if key not in by_key:
                if lenient:
                    continue
                raise DatasetError(f"{f}: lists {key!r} which has no annotation XML")
            by_key[key].source_split = None if sp == "trainval" else sp
    ds.notes.append(f"splits from {d} (unlisted images -> train)")


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    return scan_voc(src, "voc", list(opts.classes) if opts.classes else None, problems=problems)
