"""Builders of tiny synthetic datasets in each source format's published layout (for importer tests).

Each builder writes under a given root and returns the expected annotations: image key -> list of
(class name, x1, y1, x2, y2) in continuous pixel coordinates (empty list for a defect-free image).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import cv2
import numpy as np

Expected = dict[str, list[tuple[str, float, float, float, float]]]


def _shared_datasets() -> Path:
    """The real datasets: SQIS_SHARED_DATASETS, else ../shared/datasets beside this checkout, else (a clone
    made elsewhere, e.g. in a temp dir) beside the checkout it was cloned from. Never skipped when missing:
    the tests that need them fail naming the path."""
    if os.environ.get("SQIS_SHARED_DATASETS"):
        return Path(os.environ["SQIS_SHARED_DATASETS"])
    root = Path(__file__).resolve().parents[1]
    beside = root.parent / "shared" / "datasets"
    if beside.is_dir():
        return beside
    try:
        origin = subprocess.run(["git", "-C", str(root), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir():
        cloned_from = Path(origin).resolve().parent / "shared" / "datasets"
        if cloned_from.is_dir():
            return cloned_from
    return beside


SHARED_DATASETS = _shared_datasets()


def texture(w: int, h: int, seed: int) -> np.ndarray:
    """A grey noisy surface (HxWx3 uint8) that differs per seed, so no two images are byte-identical."""
    rng = np.random.default_rng(seed)
    img = rng.normal(128, 12, size=(h, w)).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


def write_image(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix.lower() if path.suffix.lower() != ".jpeg" else ".jpg", img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def rect_mask(w: int, h: int, rects: list[tuple[int, int, int, int]], value: int = 255) -> np.ndarray:
    """A uint8 mask with filled rectangles given as (x1, y1, x2, y2) pixel-inclusive corners."""
    m = np.zeros((h, w), dtype=np.uint8)
    for x1, y1, x2, y2 in rects:
        m[y1 : y2 + 1, x1 : x2 + 1] = value
    return m


def voc_xml(
    filename: str, w: int, h: int, objects: list[tuple[str, int, int, int, int]], depth: int = 3
) -> str:
    objs = "".join(
        f"\t<object>\n\t\t<name>{n}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n"
        f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for n, x1, y1, x2, y2 in objects
    )
    return (
        f"<annotation>\n\t<folder>f</folder>\n\t<filename>{filename}</filename>\n\t<source>\n"
        f"\t\t<database>synthetic</database>\n\t</source>\n\t<size>\n\t\t<width>{w}</width>\n"
        f"\t\t<height>{h}</height>\n\t\t<depth>{depth}</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
        f"{objs}</annotation>\n"
    )


NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def build_neu_det(root: Path, per_class: int = 4, with_splits: bool = True) -> Expected:
    """NEU-DET layout: IMAGES/<class>_<n>.jpg, ANNOTATIONS/<class>_<n>.xml (VOC boxes, 1-based), depth 1.

    Like the real release, some <filename> fields lack `.jpg`; the box of `patches_1` touches the
    border; splits/{train,val,test}.txt list stems (n=1,2 train, 3 val, 4 test).
    """
    exp: Expected = {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    seed = 0
    for ci, cname in enumerate(NEU_CLASSES):
        for n in range(1, per_class + 1):
            stem = f"{cname}_{n}"
            seed += 1
            img = texture(200, 200, seed)
            x1, y1 = 10 + 5 * ci + n, 20 + 3 * n
            x2, y2 = x1 + 40 + 10 * n, y1 + 30 + 5 * ci
            objs = [(cname, x1, y1, x2, y2)]
            if cname == "patches" and n == 1:
                objs.append((cname, 120, 1, 200, 200))  # touches the right and bottom border
            for _, a, b, c, d in objs:
                cv2.rectangle(img, (a - 1, b - 1), (c - 1, d - 1), (40, 40, 40), -1)
            write_image(root / "IMAGES" / f"{stem}.jpg", img)
            fname = stem if n % 2 == 0 else f"{stem}.jpg"  # the release's missing-extension quirk
            (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
            (root / "ANNOTATIONS" / f"{stem}.xml").write_text(voc_xml(fname, 200, 200, objs, depth=1))
            exp[stem] = [(c, a - 1, b - 1, cc, d) for c, a, b, cc, d in objs]
            splits["train" if n <= 2 else "val" if n == 3 else "test"].append(stem)
    if with_splits:
        (root / "splits").mkdir(parents=True, exist_ok=True)
        for sp, stems in splits.items():
            (root / "splits" / f"{sp}.txt").write_text("".join(s + "\n" for s in stems))
    return exp


def build_voc(root: Path, with_imagesets: bool = True) -> Expected:
    """Generic Pascal VOC: Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{train,val,test}.txt."""
    exp: Expected = {}
    classes = ["dent", "rust"]
    ids = [f"2024_{i:04d}" for i in range(12)]
    for i, key in enumerate(ids):
        img = texture(160, 120, 100 + i)
        objs = [(classes[i % 2], 11 + i, 21, 60 + i, 70)]
        if i % 3 == 0:
            objs.append((classes[(i + 1) % 2], 100, 80, 150, 110))
        write_image(root / "JPEGImages" / f"{key}.jpg", img)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{key}.xml").write_text(voc_xml(f"{key}.jpg", 160, 120, objs))
        exp[key] = [(c, a - 1, b - 1, cc, d) for c, a, b, cc, d in objs]
    if with_imagesets:
        m = root / "ImageSets" / "Main"
        m.mkdir(parents=True)
        (m / "train.txt").write_text("\n".join(ids[:8]) + "\n")
        (m / "val.txt").write_text("\n".join(ids[8:10]) + "\n")
        (m / "test.txt").write_text("\n".join(ids[10:]) + "\n")
    return exp


def build_kolektor(root: Path, items: int = 4, parts: int = 3, with_splits: bool = True) -> Expected:
    """KolektorSDD: kosNN/PartK.jpg + kosNN/PartK_label.png (8-bit, defect where > 0).

    Part1 of every item is defective (one rectangle + a 3-px speck that must be ignored); kos02/Part2
    has two separate defects. splits/ puts kos01-02 in train, kos03 in val, kos04 in test.
    """
    exp: Expected = {}
    w, h = 100, 250
    for it in range(1, items + 1):
        for k in range(parts):
            key = f"kos{it:02d}/Part{k}"
            img = texture(w, h, 1000 + it * 10 + k)
            rects: list[tuple[int, int, int, int]] = []
            if k == 1:
                rects = [(20 + it, 50, 39 + it, 119)]
            if it == 2 and k == 2:
                rects = [(10, 10, 29, 29), (60, 200, 89, 239)]
            m = rect_mask(w, h, rects)
            if k == 1:
                m[240, 5:8] = 255  # a speck below the min area
            for x1, y1, x2, y2 in rects:
                cv2.rectangle(img, (x1, y1), (x2, y2), (30, 30, 30), -1)
            write_image(root / f"kos{it:02d}" / f"Part{k}.jpg", img)
            write_image(root / f"kos{it:02d}" / f"Part{k}_label.png", m)
            exp[key] = [("defect", x1, y1, x2 + 1, y2 + 1) for x1, y1, x2, y2 in rects]
    if with_splits:
        (root / "splits").mkdir(parents=True, exist_ok=True)
        groups = {"train": [1, 2], "val": [3], "test": [4]}
        for sp, its in groups.items():
            lines = [f"kos{i:02d}/Part{k}" for i in its if i <= items for k in range(parts)]
            (root / "splits" / f"{sp}.txt").write_text("".join(x + "\n" for x in lines))
    return exp


def build_ksdd2(root: Path) -> Expected:
    """KolektorSDD2: train/NNNNN.png + train/NNNNN_GT.png, test/ likewise; every 3rd image defective."""
    exp: Expected = {}
    w, h = 64, 160
    n = 0
    for sp, count in (("train", 12), ("test", 6)):
        for i in range(count):
            stem = f"{10000 + n:05d}" if sp == "train" else f"{20000 + n:05d}"
            n += 1
            img = texture(w, h, 2000 + n)
            rects = [(5 + i, 30, 24 + i, 69)] if i % 3 == 0 else []
            write_image(root / sp / f"{stem}.png", img)
            write_image(root / sp / f"{stem}_GT.png", rect_mask(w, h, rects))
            exp[f"{sp}/{stem}"] = [("defect", x1, y1, x2 + 1, y2 + 1) for x1, y1, x2, y2 in rects]
    return exp


def build_mvtec_ad(root: Path) -> Expected:
    """One MVTec AD category: train/good/NNN.png, test/{good,crack,scratch}/NNN.png, ground_truth/<t>/NNN_mask.png."""
    exp: Expected = {}
    w = h = 96
    seed = 3000
    for i in range(8):
        seed += 1
        write_image(root / "train" / "good" / f"{i:03d}.png", texture(w, h, seed))
        exp[f"train/good/{i:03d}"] = []
    for i in range(3):
        seed += 1
        write_image(root / "test" / "good" / f"{i:03d}.png", texture(w, h, seed))
        exp[f"test/good/{i:03d}"] = []
    for t, rect in (("crack", (10, 20, 39, 29)), ("scratch", (50, 5, 59, 84))):
        for i in range(4):
            seed += 1
            r = (rect[0] + i, rect[1], rect[2] + i, rect[3])
            write_image(root / "test" / t / f"{i:03d}.png", texture(w, h, seed))
            write_image(root / "ground_truth" / t / f"{i:03d}_mask.png", rect_mask(w, h, [r]))
            exp[f"test/{t}/{i:03d}"] = [(t, r[0], r[1], r[2] + 1, r[3] + 1)]
    return exp


def build_dagm(root: Path) -> Expected:
    """DAGM 2007: ClassN/{Train,Test}/NNNN.PNG, ClassN/{Train,Test}/Label/Labels.txt (+ NNNN_label.PNG).

    Labels.txt: a count header, then `index flag filename 0 [a b angle cx cy]` per image; defective images
    also get an elliptic *_label.PNG mask.
    """
    exp: Expected = {}
    w = h = 128
    seed = 4000
    for c in (1, 2):
        for sp, count in (("Train", 6), ("Test", 3)):
            d = root / f"Class{c}" / sp
            lines = [str(count)]
            for i in range(1, count + 1):
                seed += 1
                stem = f"{i:04d}"
                img = texture(w, h, seed)
                write_image(d / f"{stem}.PNG", img)
                if i % 2 == 0:
                    a, b, ang, cx, cy = 20.0, 8.0, 0.5 * c, 50.0 + i, 60.0
                    lines.append(f"{i}\t1\t{stem}.PNG\t0\t{a}\t{b}\t{ang}\t{cx}\t{cy}")
                    m = np.zeros((h, w), dtype=np.uint8)
                    cv2.ellipse(
                        m, (round(cx), round(cy)), (round(a), round(b)), np.degrees(ang), 0, 360, 255, -1
                    )
                    write_image(d / "Label" / f"{stem}_label.PNG", m)
                    hw = np.sqrt((a * np.cos(ang)) ** 2 + (b * np.sin(ang)) ** 2)
                    hh = np.sqrt((a * np.sin(ang)) ** 2 + (b * np.cos(ang)) ** 2)
                    exp[f"Class{c}/{sp}/{stem}"] = [(f"class{c}", cx - hw, cy - hh, cx + hw, cy + hh)]
                else:
                    lines.append(f"{i}\t0\t{stem}.PNG\t0")
                    exp[f"Class{c}/{sp}/{stem}"] = []
            (d / "Label").mkdir(parents=True, exist_ok=True)
            (d / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return exp


def build_yolo(root: Path) -> Expected:
    """An Ultralytics dataset: data.yaml (relative path, names list), images/{train,val}, labels/{train,val}.

    One label uses the segment format; one image has no label file (defect-free).
    """
    import yaml

    exp: Expected = {}
    names = ["hole", "stain"]
    w, h = 120, 80
    seed = 5000
    for sp, count in (("train", 6), ("val", 3)):
        for i in range(count):
            seed += 1
            stem = f"{sp}img{i}"
            write_image(root / "images" / sp / f"{stem}.png", texture(w, h, seed))
            lbl = root / "labels" / sp / f"{stem}.txt"
            lbl.parent.mkdir(parents=True, exist_ok=True)
            if i == 0:
                exp[stem] = []  # no label file at all
                continue
            cls = i % 2
            x1, y1, x2, y2 = 12.0 + i, 10.0, 60.0 + i, 50.0
            if i == 1:  # a segment (triangle) line
                pts = [(x1, y1), (x2, y1), (x1, y2)]
                lbl.write_text(f"{cls} " + " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in pts) + "\n")
            else:
                lbl.write_text(
                    f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
                )
            exp[stem] = [(names[cls], x1, y1, x2, y2)]
    (root / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names})
    )
    return exp


def read_yolo_labels(
    out: Path, split: str, name: str, w: int, h: int
) -> list[tuple[int, float, float, float, float]]:
    """The boxes of OUT/labels/<split>/<name>.txt back in pixel corners (class, x1, y1, x2, y2)."""
    rows = []
    for line in (out / "labels" / split / f"{name}.txt").read_text().splitlines():
        c, cx, cy, bw, bh = line.split()
        cxf, cyf, bwf, bhf = float(cx) * w, float(cy) * h, float(bw) * w, float(bh) * h
        rows.append((int(c), cxf - bwf / 2, cyf - bhf / 2, cxf + bwf / 2, cyf + bhf / 2))
    return rows


def build_coco(root: Path) -> Expected:
    """COCO 2017 layout: annotations/instances_{train,val}2017.json, images in {train,val}2017/.

    Category ids 1 and 3 (COCO's gaps); one polygon segmentation; one image without annotations.
    """
    import json

    exp: Expected = {}
    cats = [{"id": 1, "name": "open", "supercategory": "pcb"}, {"id": 3, "name": "short", "supercategory": "pcb"}]
    names = {1: "open", 3: "short"}
    w, h = 160, 120
    seed, ann_id = 7000, 0
    for sp, count in (("train", 5), ("val", 2)):
        images, anns = [], []
        for i in range(count):
            seed += 1
            fn = f"{sp}_{i:04d}.jpg"
            write_image(root / f"{sp}2017" / fn, texture(w, h, seed))
            images.append({"id": i + 1, "file_name": fn, "width": w, "height": h})
            exp[f"{sp}_{i:04d}"] = []
            if i == 0:
                continue
            cid = 1 if i % 2 else 3
            x, y, bw, bh = 10.0 + 3 * i, 20.0, 40.0, 30.0
            ann_id += 1
            a = {"id": ann_id, "image_id": i + 1, "category_id": cid, "bbox": [x, y, bw, bh], "area": bw * bh,
                 "iscrowd": 0}
            if i == 1:
                a["segmentation"] = [[x, y, x + bw, y, x, y + bh]]
            anns.append(a)
            exp[f"{sp}_{i:04d}"].append((names[cid], x, y, x + bw, y + bh))
        doc = {"info": {"description": "synthetic"}, "licenses": [], "images": images, "annotations": anns,
               "categories": cats}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{sp}2017.json").write_text(json.dumps(doc))
    return exp


def build_coco_roboflow(root: Path) -> Expected:
    """Roboflow's COCO export: {train,valid,test}/_annotations.coco.json next to the images, with the
    dataset-level parent category (id 0, supercategory 'none') that no annotation uses."""
    import json

    exp: Expected = {}
    cats = [{"id": 0, "name": "pcb-defects", "supercategory": "none"},
            {"id": 1, "name": "missing_hole", "supercategory": "pcb-defects"},
            {"id": 2, "name": "spur", "supercategory": "pcb-defects"}]
    w, h = 100, 100
    seed = 7100
    for sp in ("train", "valid", "test"):
        images, anns = [], []
        for i in range(3):
            seed += 1
            fn = f"{sp}{i}_jpg.rf.{seed}.jpg"
            write_image(root / sp / fn, texture(w, h, seed))
            images.append({"id": i, "file_name": fn, "width": w, "height": h})
            cid = 1 + i % 2
            anns.append({"id": i, "image_id": i, "category_id": cid, "bbox": [5, 5, 20, 10], "area": 200,
                         "segmentation": [], "iscrowd": 0})
            exp[Path(fn).stem] = [(["missing_hole", "spur"][cid - 1], 5.0, 5.0, 25.0, 15.0)]
        (root / sp / "_annotations.coco.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
    return exp


def build_pixel_boxes(root: Path) -> Expected:
    """Pixel boxes, one text file per image (`x1 y1 x2 y2 class`), as DeepPCB and factory tools write:
    images/, labels/, classes.txt (line 1 = id 0); one file comma-separated; one image unlabelled."""
    exp: Expected = {}
    classes = ["open", "short", "mousebite"]
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    w, h = 200, 150
    for i in range(8):
        stem = f"{i:05d}"
        write_image(root / "images" / f"{stem}.jpg", texture(w, h, 7200 + i))
        if i == 0:
            exp[stem] = []
            continue
        rows = [(10 + i, 12, 50 + i, 40, i % 3), (100, 60, 130, 100, (i + 1) % 3)]
        sep = "," if i == 1 else " "
        (root / "labels" / f"{stem}.txt").write_text(
            "".join(sep.join(str(v) for v in r) + "\n" for r in rows))
        exp[stem] = [(classes[c], float(x1), float(y1), float(x2), float(y2)) for x1, y1, x2, y2, c in rows]
    return exp
