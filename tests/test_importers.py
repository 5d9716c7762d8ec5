"""Importers on small synthetic datasets built in each format's published layout, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dataset_fixtures import (
    NEU_CLASSES,
    Expected,
    build_dagm,
    build_kolektor,
    build_ksdd2,
    build_mvtec_ad,
    build_neu_det,
    build_voc,
    build_yolo,
    read_yolo_labels,
    rect_mask,
    voc_xml,
    write_image,
)
from training.datasets import (
    SPLITS,
    Box,
    DatasetError,
    Sample,
    dominant_class,
    group_samples,
    read_card,
    stratified_split,
)
from training.importers import ImportOptions, import_dataset, scan

REPO = Path(__file__).resolve().parents[1]


def _split_of(out: Path, name: str) -> str:
    hits = [sp for sp in SPLITS if (out / "labels" / sp / f"{name}.txt").is_file()]
    assert len(hits) == 1, (name, hits)
    return hits[0]


def _image_wh(out: Path, split: str, name: str) -> tuple[int, int]:
    [img] = list((out / "images" / split).glob(f"{name}.*"))
    a = cv2.imread(str(img), cv2.IMREAD_UNCHANGED)
    return a.shape[1], a.shape[0]


def assert_labels(
    out: Path, expected: Expected, classes: list[str], name_of=lambda k: k, tol: float = 0.01
) -> None:
    """Every expected image is in exactly one split with exactly the expected boxes (in pixels)."""
    for key, boxes in expected.items():
        name = name_of(key)
        sp = _split_of(out, name)
        w, h = _image_wh(out, sp, name)
        got = sorted(read_yolo_labels(out, sp, name, w, h))
        want = sorted((classes.index(c), x1, y1, x2, y2) for c, x1, y1, x2, y2 in boxes)
        assert len(got) == len(want), (key, got, want)
        for g, e in zip(got, want, strict=True):
            assert g[0] == e[0], (key, g, e)
            assert np.allclose(g[1:], e[1:], atol=tol), (key, g, e)


def assert_layout(out: Path, classes: list[str], n_images: int) -> dict:
    """data.yaml points at the split dirs with names as a dict; card counts add up."""
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert Path(data["path"]) == out.resolve()
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert data["names"] == dict(enumerate(classes))
    card = json.loads((out / "card.json").read_text())
    assert card["classes"] == classes
    assert sum(s["images"] for s in card["splits"].values()) == n_images == card["total_images"]
    for sp in SPLITS:
        imgs = list((out / "images" / sp).iterdir())
        assert card["splits"][sp]["images"] == len(imgs) == len(list((out / "labels" / sp).glob("*.txt")))
        empty = sum(1 for p in (out / "labels" / sp).glob("*.txt") if not p.read_text().strip())
        assert card["splits"][sp]["defect_free_images"] == empty
    assert (out / "CARD.md").read_text().startswith("# Dataset card")
    for key in ("format", "source", "split_origin", "created_at", "importer_version"):
        assert card[key]
    return card


# ------------------------------------------------------------------------------------------- formats


def test_neu_det_uses_split_files_and_resolves_filenames_without_extension(tmp_path: Path) -> None:
    exp = build_neu_det(tmp_path / "src")
    out = tmp_path / "out"
    card = import_dataset("neu-det", tmp_path / "src", out)
    assert_layout(out, NEU_CLASSES, len(exp))
    assert_labels(out, exp, NEU_CLASSES)
    assert card.split_origin["kind"] == "file"
    for sp in SPLITS:
        listed = set((tmp_path / "src" / "splits" / f"{sp}.txt").read_text().split())
        assert {p.stem for p in (out / "images" / sp).iterdir()} == listed
    # original encoding kept: the JPEG bytes are copied as they are
    assert (out / "images" / "train" / "crazing_1.jpg").read_bytes() == (
        tmp_path / "src/IMAGES/crazing_1.jpg"
    ).read_bytes()
    assert card.splits["train"].boxes_per_class["patches"] == 3  # patches_1 has two boxes, patches_2 one


def test_voc_takes_imagesets_splits(tmp_path: Path) -> None:
    exp = build_voc(tmp_path / "src")
    out = tmp_path / "out"
    card = import_dataset("voc", tmp_path / "src", out)
    assert_layout(out, ["dent", "rust"], len(exp))
    assert_labels(out, exp, ["dent", "rust"])
    assert (card.splits["train"].images, card.splits["val"].images, card.splits["test"].images) == (8, 2, 2)
    assert _split_of(out, "2024_0009") == "val"


def test_voc_without_imagesets_is_split_seeded_and_stratified(tmp_path: Path) -> None:
    build_voc(tmp_path / "src", with_imagesets=False)
    a = import_dataset("voc", tmp_path / "src", tmp_path / "a", seed=1, val_frac=0.25, test_frac=0.25)
    b = import_dataset("voc", tmp_path / "src", tmp_path / "b", seed=1, val_frac=0.25, test_frac=0.25)
    import_dataset("voc", tmp_path / "src", tmp_path / "c", seed=7, val_frac=0.25, test_frac=0.25)
    assert a.split_origin == {**a.split_origin, "kind": "seeded-stratified", "seed": 1}
    assert a.splits == b.splits

    def names(d: str, sp: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / d / "images" / sp).iterdir())

    assert all(names("a", sp) == names("b", sp) for sp in SPLITS)  # same seed, same split
    assert any(names("a", sp) != names("c", sp) for sp in SPLITS)  # another seed, another split
    # both strata (dominant class dent / rust, 6 images each) are in every split
    for sp in ("val", "test"):
        assert a.splits[sp].images == 3
        assert all(a.splits[sp].images_per_class[c] >= 1 for c in ("dent", "rust"))


def test_kolektor_masks_become_boxes_polygons_and_masks(tmp_path: Path) -> None:
    exp = build_kolektor(tmp_path / "src")
    out = tmp_path / "out"
    card = import_dataset("kolektor", tmp_path / "src", out)
    assert_layout(out, ["defect"], len(exp))
    assert_labels(out, exp, ["defect"], name_of=lambda k: k.replace("/", "_"))
    assert card.has_masks and card.has_segments
    assert [card.splits[sp].images for sp in SPLITS] == [6, 3, 3]
    assert [card.splits[sp].boxes for sp in SPLITS] == [4, 1, 1]  # the 3-px specks are ignored
    m = cv2.imread(str(out / "masks/train/kos02_Part2.png"), cv2.IMREAD_UNCHANGED)
    src = cv2.imread(str(tmp_path / "src/kos02/Part2_label.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == src.shape and np.array_equal(m > 0, src > 0)
    seg = (out / "labels-seg/train/kos02_Part2.txt").read_text().splitlines()
    assert len(seg) == 2
    pts = np.array([float(v) for v in seg[0].split()[1:]]).reshape(-1, 2) * [100, 250]
    assert len(pts) >= 4 and pts.min() >= 0


def test_kolektor_seeded_split_keeps_items_together(tmp_path: Path) -> None:
    build_kolektor(tmp_path / "src", items=6, with_splits=False)
    out = tmp_path / "out"
    card = import_dataset("kolektor", tmp_path / "src", out, seed=3, val_frac=0.2, test_frac=0.2)
    assert card.split_origin["kind"] == "seeded-stratified"
    for it in range(1, 7):
        assert len({_split_of(out, f"kos{it:02d}_Part{k}") for k in range(3)}) == 1


def test_ksdd2_keeps_published_test_and_carves_val(tmp_path: Path) -> None:
    exp = build_ksdd2(tmp_path / "src")
    out = tmp_path / "out"
    card = import_dataset("ksdd2", tmp_path / "src", out, val_frac=0.25)
    assert_layout(out, ["defect"], len(exp))
    assert_labels(out, exp, ["defect"], name_of=lambda k: k.replace("/", "_"))
    assert card.split_origin["kind"] == "source"
    assert card.splits["test"].images == 6
    assert {p.stem for p in (out / "images/test").iterdir()} == {
        f"test_{k[5:]}" for k in exp if k.startswith("test/")
    }
    assert card.splits["val"].images == 3 and card.splits["train"].images == 9
    assert card.splits["val"].defect_free_images == 2  # stratified: 1 of the 4 defective train images


def test_mvtec_ad_classes_are_defect_types(tmp_path: Path) -> None:
    exp = build_mvtec_ad(tmp_path / "src")
    out = tmp_path / "out"
    card = import_dataset("mvtec-ad", tmp_path / "src", out, val_frac=0.25, test_frac=0.25)
    assert_layout(out, ["crack", "scratch"], len(exp))
    assert_labels(out, exp, ["crack", "scratch"], name_of=lambda k: k.replace("/", "_"))
    assert sum(card.splits[sp].defect_free_images for sp in SPLITS) == 11
    assert all(card.splits[sp].images_per_class["crack"] >= 1 for sp in SPLITS)


def test_mvtec_ad_single_class(tmp_path: Path) -> None:
    exp = build_mvtec_ad(tmp_path / "src")
    out = tmp_path / "out"
    import_dataset("mvtec-ad", tmp_path / "src", out, opts=ImportOptions(single_class=True))
    single = {k: [("defect", *b[1:]) for b in v] for k, v in exp.items()}
    assert_labels(out, single, ["defect"], name_of=lambda k: k.replace("/", "_"))


def test_dagm_ellipses_become_boxes(tmp_path: Path) -> None:
    exp = build_dagm(tmp_path / "src")
    out = tmp_path / "out"
    card = import_dataset("dagm", tmp_path / "src", out, val_frac=0.34)
    assert_layout(out, ["class1", "class2"], len(exp))
    assert_labels(out, exp, ["class1", "class2"], name_of=lambda k: k.replace("/", "_"))
    assert card.splits["test"].images == 6
    assert {p.stem for p in (out / "images/test").iterdir()} == {
        k.replace("/", "_") for k in exp if "/Test/" in k
    }
    assert card.splits["val"].images >= 2


def test_yolo_relayout_with_segments(tmp_path: Path) -> None:
    exp = build_yolo(tmp_path / "src")
    out = tmp_path / "out"
    card = import_dataset("yolo", tmp_path / "src", out)
    assert_layout(out, ["hole", "stain"], len(exp))
    assert_labels(out, exp, ["hole", "stain"])
    assert (card.splits["train"].images, card.splits["val"].images) == (6, 3)
    assert card.has_segments
    assert len((out / "labels-seg/train/trainimg1.txt").read_text().split()) == 7


def test_yolo_roundtrip_of_an_imported_dataset(tmp_path: Path) -> None:
    exp = build_neu_det(tmp_path / "src")
    import_dataset("neu-det", tmp_path / "src", tmp_path / "a")
    card = import_dataset("yolo", tmp_path / "a", tmp_path / "b")
    assert card.classes == NEU_CLASSES
    assert_labels(tmp_path / "b", exp, NEU_CLASSES)
    for sp in SPLITS:
        assert {p.name for p in (tmp_path / "a/images" / sp).iterdir()} == {
            p.name for p in (tmp_path / "b/images" / sp).iterdir()
        }


def test_explicit_split_file_overrides(tmp_path: Path) -> None:
    exp = build_voc(tmp_path / "src")
    f = tmp_path / "split.csv"
    f.write_text("".join(f"{k},{'test' if i < 4 else 'train'}\n" for i, k in enumerate(sorted(exp))))
    card = import_dataset("voc", tmp_path / "src", tmp_path / "out", splits=f)
    assert card.split_origin["kind"] == "file"
    assert (card.splits["train"].images, card.splits["val"].images, card.splits["test"].images) == (8, 0, 4)


def test_read_card_roundtrip(tmp_path: Path) -> None:
    build_ksdd2(tmp_path / "src")
    card = import_dataset("ksdd2", tmp_path / "src", tmp_path / "out")
    assert read_card(tmp_path / "out") == card


# -------------------------------------------------------------------------------------------- errors


def _neu_with(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    build_neu_det(src, per_class=2, with_splits=False)
    return src


def test_missing_image_names_the_xml(tmp_path: Path) -> None:
    src = _neu_with(tmp_path)
    (src / "IMAGES/inclusion_2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"inclusion_2\.xml.*missing"):
        scan("neu-det", src)


def test_box_outside_image_names_the_xml(tmp_path: Path) -> None:
    src = _neu_with(tmp_path)
    (src / "ANNOTATIONS/scratches_1.xml").write_text(
        voc_xml("scratches_1.jpg", 200, 200, [("scratches", 10, 10, 260, 50)])
    )
    with pytest.raises(DatasetError, match=r"scratches_1\.xml.*outside the 200x200 image"):
        scan("neu-det", src)


def test_tiny_overshoot_is_clipped(tmp_path: Path) -> None:
    src = _neu_with(tmp_path)
    (src / "ANNOTATIONS/scratches_1.xml").write_text(
        voc_xml("scratches_1.jpg", 200, 200, [("scratches", 0, 10, 202, 50)])
    )
    ds = scan("neu-det", src)
    [s] = [s for s in ds.samples if s.key == "scratches_1"]
    assert (s.boxes[0].x1, s.boxes[0].x2) == (0.0, 200.0)


def test_unknown_class_names_the_xml(tmp_path: Path) -> None:
    src = _neu_with(tmp_path)
    (src / "ANNOTATIONS/crazing_2.xml").write_text(voc_xml("crazing_2", 200, 200, [("rust", 10, 10, 50, 50)]))
    with pytest.raises(DatasetError, match=r"crazing_2\.xml: unknown class 'rust'"):
        scan("neu-det", src)


def test_unknown_class_with_classes_option_on_voc(tmp_path: Path) -> None:
    build_voc(tmp_path / "src")
    with pytest.raises(DatasetError, match=r"2024_0000\.xml: unknown class 'dent'"):
        scan("voc", tmp_path / "src", ImportOptions(classes=("rust",)))


def test_unreadable_image_names_it(tmp_path: Path) -> None:
    src = _neu_with(tmp_path)
    (src / "IMAGES/patches_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"patches_1\.jpg: unreadable image"):
        scan("neu-det", src)


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    build_kolektor(tmp_path / "src", items=2)
    write_image(tmp_path / "src/kos02/Part0_label.png", rect_mask(50, 50, [(1, 1, 5, 5)]))
    with pytest.raises(DatasetError, match=r"kos02/Part0_label\.png: mask size 50x50 does not match"):
        scan("kolektor", tmp_path / "src")


def test_kolektor_image_without_mask(tmp_path: Path) -> None:
    build_kolektor(tmp_path / "src", items=2)
    (tmp_path / "src/kos01/Part2_label.png").unlink()
    with pytest.raises(DatasetError, match=r"kos01/Part2\.jpg: image without its mask"):
        scan("kolektor", tmp_path / "src")


def test_ksdd2_mask_without_image(tmp_path: Path) -> None:
    build_ksdd2(tmp_path / "src")
    (tmp_path / "src/test/20012.png").unlink()
    with pytest.raises(DatasetError, match=r"20012_GT\.png: mask whose image"):
        scan("ksdd2", tmp_path / "src")


def test_mvtec_defect_without_mask(tmp_path: Path) -> None:
    build_mvtec_ad(tmp_path / "src")
    (tmp_path / "src/ground_truth/crack/002_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/002\.png: defect image without its mask"):
        scan("mvtec-ad", tmp_path / "src")


def test_dagm_ellipse_outside_image(tmp_path: Path) -> None:
    build_dagm(tmp_path / "src")
    lf = tmp_path / "src/Class2/Test/Label/Labels.txt"
    lf.write_text(lf.read_text().replace("\t52.0\t60.0", "\t500.0\t60.0"))
    with pytest.raises(DatasetError, match=r"Class2/Test/Label/Labels\.txt \(0002\.PNG\): ellipse centre"):
        scan("dagm", tmp_path / "src")


def test_yolo_label_without_image_and_bad_class(tmp_path: Path) -> None:
    build_yolo(tmp_path / "src")
    (tmp_path / "src/images/val/valimg2.png").unlink()
    with pytest.raises(DatasetError, match=r"labels/val/valimg2\.txt: label whose image is missing"):
        scan("yolo", tmp_path / "src")
    build_yolo(tmp_path / "src2")
    (tmp_path / "src2/labels/train/trainimg3.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"trainimg3\.txt:1: unknown class id 7"):
        scan("yolo", tmp_path / "src2")


def test_split_file_errors(tmp_path: Path) -> None:
    src = _neu_with(tmp_path)
    (src / "splits").mkdir()
    (src / "splits/train.txt").write_text("crazing_1\nrust_9\n")
    with pytest.raises(DatasetError, match=r"splits: .*in no split file"):
        import_dataset("neu-det", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    build_ksdd2(tmp_path / "src")
    out = tmp_path / "out"
    import_dataset("ksdd2", tmp_path / "src", out)
    with pytest.raises(DatasetError, match="not empty"):
        import_dataset("ksdd2", tmp_path / "src", out)
    (out / "labels" / "train.cache").write_text("x")
    card = import_dataset("ksdd2", tmp_path / "src", out, force=True, seed=5)
    assert card.split_origin["seed"] == 5 and not (out / "labels" / "train.cache").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not an imported dataset"):
        import_dataset("ksdd2", tmp_path / "src", other, force=True)
    assert (other / "precious.txt").read_text() == "keep"


def test_byte_identical_images_stay_in_one_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_voc(src, with_imagesets=False)
    for i in range(1, 4):  # three copies of image 0 (with the same annotation)
        (src / f"JPEGImages/copy_{i}.jpg").write_bytes((src / "JPEGImages/2024_0000.jpg").read_bytes())
        xml = (src / "Annotations/2024_0000.xml").read_text().replace("2024_0000.jpg", f"copy_{i}.jpg")
        (src / f"Annotations/copy_{i}.xml").write_text(xml)
    for seed in range(5):
        out = tmp_path / f"out{seed}"
        card = import_dataset("voc", src, out, seed=seed, val_frac=0.3, test_frac=0.3)
        assert len({_split_of(out, n) for n in ("2024_0000", "copy_1", "copy_2", "copy_3")}) == 1
        assert card.duplicate_image_groups == 1


def test_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    src = _neu_with(tmp_path)
    (src / "IMAGES/inclusion_1.jpg").unlink()
    r = subprocess.run(
        [sys.executable, "-m", "sqis", "data", "import", "neu-det", str(src), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "inclusion_1.xml" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_imports(tmp_path: Path) -> None:
    build_neu_det(tmp_path / "src")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqis",
            "data",
            "import",
            "neu-det",
            str(tmp_path / "src"),
            str(tmp_path / "o"),
            "--seed",
            "0",
            "--no-track",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "imported 24 images" in r.stdout
    assert read_card(tmp_path / "o").splits["val"].images == 6


def test_defect_free_images_get_empty_label_files(tmp_path: Path) -> None:
    build_kolektor(tmp_path / "src", items=2)
    out = tmp_path / "out"
    import_dataset("kolektor", tmp_path / "src", out)
    assert (out / "labels/train/kos01_Part0.txt").read_text() == ""
    m = cv2.imread(str(out / "masks/train/kos01_Part0.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (250, 100) and not m.any()


def test_resplit_ignores_the_source_split_dir(tmp_path: Path) -> None:
    build_neu_det(tmp_path / "src")
    card = import_dataset(
        "neu-det", tmp_path / "src", tmp_path / "out", resplit=True, val_frac=0.25, test_frac=0.25
    )
    assert card.split_origin["kind"] == "seeded-stratified"
    # 4 images per class (each its own stratum): 1 val, 1 test, 2 train per class
    assert [card.splits[sp].images for sp in SPLITS] == [12, 6, 6]
    assert all(card.splits["val"].images_per_class[c] == 1 for c in NEU_CLASSES)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 3)), min_size=1, max_size=80),
    st.floats(0, 0.45),
    st.floats(0, 0.45),
    st.integers(0, 3),
)
def test_stratified_split_properties(spec: list[tuple[int, int]], val: float, test: float, seed: int) -> None:
    """Groups never straddle splits, every sample gets one split, same seed -> same split, sizes near target."""
    samples = [
        Sample(
            key=f"s{i}",
            name=f"s{i}",
            image=Path("x"),
            width=10,
            height=10,
            group=f"g{g}",
            boxes=[] if c < 0 else [Box(c, 0, 0, 1, 1)],
        )
        for i, (g, c) in enumerate(spec)
    ]
    groups = group_samples(samples, {})
    fr = {"val": val, "test": test}
    a = stratified_split(groups, fr, seed)
    assert a == stratified_split(groups, fr, seed)
    assert set(a) == {s.name for s in samples} and set(a.values()) <= set(SPLITS)
    for members in groups.values():
        assert len({a[s.name] for s in members}) == 1
    if all(len(m) == 1 for m in groups.values()):  # singletons: per-stratum counts hit the rounded target
        by_stratum: dict[int, list[str]] = {}
        for s in samples:
            by_stratum.setdefault(dominant_class(s.boxes), []).append(a[s.name])
        for assigned in by_stratum.values():
            n = len(assigned)
            assert assigned.count("val") == min(round(n * val), n)
            assert assigned.count("test") == min(round(n * test), n - assigned.count("val"))
