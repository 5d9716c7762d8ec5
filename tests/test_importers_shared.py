"""Importers on the real shared datasets (../shared/datasets beside the repo): must be present, never skipped."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.dataset_fixtures import SHARED_DATASETS, read_yolo_labels
from training.datasets import SPLITS, DatasetCard
from training.importers import import_dataset

NEU = SHARED_DATASETS / "NEU-DET"
KSDD = SHARED_DATASETS / "KolektorSDD"
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def _split_ids(root: Path) -> dict[str, list[str]]:
    return {sp: (root / "splits" / f"{sp}.txt").read_text().split() for sp in SPLITS}


@pytest.fixture(scope="module")
def neu(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetCard]:
    assert NEU.is_dir(), f"shared dataset missing: {NEU}"
    out = tmp_path_factory.mktemp("neu") / "ds"
    return out, import_dataset("neu-det", NEU, out)


@pytest.fixture(scope="module")
def ksdd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetCard]:
    assert KSDD.is_dir(), f"shared dataset missing: {KSDD}"
    out = tmp_path_factory.mktemp("ksdd") / "ds"
    return out, import_dataset("kolektor", KSDD, out)


def test_neu_det_classes_and_data_yaml(neu: tuple[Path, DatasetCard]) -> None:
    out, card = neu
    assert card.classes == NEU_CLASSES
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(NEU_CLASSES)) and data["nc"] == 6
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val", "images/test")


def test_neu_det_split_counts_match_split_files(neu: tuple[Path, DatasetCard]) -> None:
    out, card = neu
    ids = _split_ids(NEU)
    assert [len(ids[sp]) for sp in SPLITS] == [1261, 180, 359]
    for sp in SPLITS:
        assert card.splits[sp].images == len(ids[sp])
        assert sorted(p.stem for p in (out / "images" / sp).iterdir()) == sorted(ids[sp])
        assert len(list((out / "labels" / sp).glob("*.txt"))) == len(ids[sp])
    assert card.split_origin["kind"] == "file"
    assert card.split_origin["path"] == str((NEU / "splits").resolve())


def test_neu_det_box_totals_match_source(neu: tuple[Path, DatasetCard]) -> None:
    _, card = neu
    per_class = {c: sum(card.splits[sp].boxes_per_class[c] for sp in SPLITS) for c in NEU_CLASSES}
    # per-class totals as counted from the XMLs (SOURCE.txt's own per-class list is off for two classes)
    assert per_class == {
        "crazing": 689,
        "inclusion": 1011,
        "patches": 881,
        "pitted_surface": 432,
        "rolled-in_scale": 628,
        "scratches": 548,
    }
    assert card.total_boxes == 4189 and card.total_images == 1800
    assert sum(card.splits[sp].defect_free_images for sp in SPLITS) == 0
    assert card.duplicate_image_groups == 1  # patches_101 / patches_105


def test_neu_det_known_image_boxes(neu: tuple[Path, DatasetCard]) -> None:
    out, _ = neu
    # ANNOTATIONS/patches_101.xml: (27,1,78,92) (113,1,175,59) (129,79,176,200), 1-based VOC corners
    got = sorted(read_yolo_labels(out, "train", "patches_101", 200, 200))
    want = [(2, 26, 0, 78, 92), (2, 112, 0, 175, 59), (2, 128, 78, 176, 200)]
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0] and np.allclose(g[1:], w[1:], atol=1e-3), (g, w)
    # an XML whose <filename> lacks the extension still finds its image
    assert "patches_104" in (NEU / "ANNOTATIONS" / "patches_104.xml").read_text()
    assert (out / "images" / "train" / "patches_105.jpg").exists()  # the byte-identical pair stays together
    assert (out / "images" / "train" / "patches_104.jpg").read_bytes() == (
        NEU / "IMAGES/patches_104.jpg"
    ).read_bytes()


def test_kolektor_defective_counts_equal_nonempty_masks(ksdd: tuple[Path, DatasetCard]) -> None:
    out, card = ksdd
    ids = _split_ids(KSDD)
    for sp in SPLITS:
        nonempty = 0
        for key in ids[sp]:
            m = cv2.imread(str(KSDD / f"{key}_label.png"), cv2.IMREAD_UNCHANGED)
            nonempty += bool((m > 0).any())
        labelled = sum(1 for p in (out / "labels" / sp).glob("*.txt") if p.read_text().strip())
        assert card.splits[sp].images == len(ids[sp])
        assert card.splits[sp].images - card.splits[sp].defect_free_images == labelled == nonempty, sp
    assert [card.splits[sp].images - card.splits[sp].defect_free_images for sp in SPLITS] == [35, 7, 10]


def test_kolektor_layout_masks_and_card(ksdd: tuple[Path, DatasetCard]) -> None:
    out, card = ksdd
    assert card.classes == ["defect"] and card.has_masks and card.has_segments
    assert card.total_images == 399
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk["split_origin"]["kind"] == "file"
    m = cv2.imread(str(out / "masks/val/kos38_Part0.png"), cv2.IMREAD_UNCHANGED)
    src = cv2.imread(str(KSDD / "kos38/Part0_label.png"), cv2.IMREAD_UNCHANGED)
    src = src.max(axis=2) if src.ndim == 3 else src
    assert np.array_equal(m > 0, src > 0)
    img = cv2.imread(str(out / "images/val/kos38_Part0.jpg"))
    assert img.shape[:2] == m.shape
    # box of the one component equals the mask's extent
    ys, xs = np.nonzero(src)
    [(c, x1, y1, x2, y2)] = read_yolo_labels(out, "val", "kos38_Part0", m.shape[1], m.shape[0])
    assert c == 0 and np.allclose(
        (x1, y1, x2, y2), (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), atol=1e-2
    )
    seg = (out / "labels-seg/val/kos38_Part0.txt").read_text().splitlines()
    assert len(seg) == 1 and len(seg[0].split()) >= 7
