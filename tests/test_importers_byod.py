"""Bringing one's own data: COCO JSON and plain pixel-box importers on fixtures in their published
layouts, and errors that say the likely fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dataset_fixtures import build_coco, build_coco_roboflow, build_pixel_boxes, build_yolo
from tests.test_importers import assert_labels, assert_layout
from training.datasets import DatasetError
from training.importers import import_dataset, scan

REPO = Path(__file__).resolve().parents[1]


def test_coco_2017_layout(tmp_path: Path) -> None:
    exp = build_coco(tmp_path / "src")
    card = import_dataset("coco", tmp_path / "src", tmp_path / "out")
    assert card.classes == ["open", "short"]  # category ids 1, 3 -> classes 0, 1
    assert_layout(tmp_path / "out", ["open", "short"], len(exp))
    assert_labels(tmp_path / "out", exp, ["open", "short"])
    assert card.splits["val"].images == 2 and card.splits["train"].defect_free_images >= 0
    assert card.split_origin["kind"] == "source"
    assert len(list((tmp_path / "out" / "labels-seg").rglob("*.txt"))) >= 1  # the polygon is kept


def test_coco_roboflow_export_drops_the_parent_category(tmp_path: Path) -> None:
    exp = build_coco_roboflow(tmp_path / "src")
    card = import_dataset("coco", tmp_path / "src", tmp_path / "out")
    assert card.classes == ["missing_hole", "spur"]
    assert_labels(tmp_path / "out", exp, card.classes)
    assert {sp: st.images for sp, st in card.splits.items()} == {"train": 3, "val": 3, "test": 3}


def test_coco_errors_say_the_fix(tmp_path: Path) -> None:
    build_coco(tmp_path / "src")
    f = tmp_path / "src/annotations/instances_val2017.json"
    doc = json.loads(f.read_text())
    doc["annotations"][0]["bbox"] = [0.1, 0.2, 0.3, 0.2]
    f.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"looks normalised \(0-1\); COCO boxes are in pixels"):
        scan("coco", tmp_path / "src")
    doc["annotations"][0]["bbox"] = [100, 20, 150, 50]  # x1 y1 x2 y2 written as x y w h
    f.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"is it \[x1, y1, x2, y2\]"):
        scan("coco", tmp_path / "src")
    doc["annotations"][0]["bbox"], doc["annotations"][0]["category_id"] = [10, 20, 30, 30], 2
    f.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"category_id 2, which is not in `categories`"):
        scan("coco", tmp_path / "src")


def test_pixel_boxes(tmp_path: Path) -> None:
    exp = build_pixel_boxes(tmp_path / "src")
    card = import_dataset("pixel-boxes", tmp_path / "src", tmp_path / "out")
    assert card.classes == ["open", "short", "mousebite"]
    assert_layout(tmp_path / "out", card.classes, len(exp))
    assert_labels(tmp_path / "out", exp, card.classes)
    assert card.split_origin["kind"].startswith("seeded")


@pytest.mark.parametrize(("line", "match"), [
    ("11 12 51 40 3", r"class id 3 is not one of the 3 classes .*class ids start at 0"),
    ("0.1 0.1 0.4 0.3 0", r"look normalised \(0-1\); this format takes pixels"),
    ("1 11 12 51 40 x", r"expected `x1 y1 x2 y2 class`"),
    ("open 11 12 51 40", r"the class comes last in this format"),
    ("50 40 10 12 0", r"is it `x y width height`"),
])
def test_pixel_box_errors_say_the_fix(tmp_path: Path, line: str, match: str) -> None:
    build_pixel_boxes(tmp_path / "src")
    (tmp_path / "src/labels/00003.txt").write_text(line + "\n")
    with pytest.raises(DatasetError, match=match) as exc:
        scan("pixel-boxes", tmp_path / "src")
    assert "00003.txt" in str(exc.value)


def test_yolo_pixel_coordinates_say_yolo_is_0_1(tmp_path: Path) -> None:
    build_yolo(tmp_path / "src")
    (tmp_path / "src/labels/train/trainimg3.txt").write_text("0 60 40 30 20\n")
    with pytest.raises(DatasetError, match=r"trainimg3\.txt:1: YOLO coordinates are 0-1"):
        scan("yolo", tmp_path / "src")
    (tmp_path / "src/labels/train/trainimg3.txt").write_text("2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"class ids start at 0"):
        scan("yolo", tmp_path / "src")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqis", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def test_help_shows_bracket_hints_and_format_docs() -> None:
    r = _cli("data", "import", "--help")
    assert r.returncode == 0, r.stderr
    assert "docs/formats/" in r.stdout and "pixel-boxes" in r.stdout and "coco" in r.stdout
    assert "[default: SRC/splits if present]" in r.stdout
    for fmt in ("neu-det", "kolektor", "ksdd2", "mvtec-ad", "dagm", "voc", "yolo", "coco", "pixel-boxes"):
        assert (REPO / "docs" / "formats" / f"{fmt}.md").is_file(), fmt
    r = _cli("train", "--help")
    assert r.returncode == 0, r.stderr
    assert "[env SQIS_STATE_DIR]" in r.stdout and "--out" in r.stdout and "mlflow.db" in r.stdout


def test_cli_pixel_box_error_is_one_line_exit_2(tmp_path: Path) -> None:
    build_pixel_boxes(tmp_path / "src")
    (tmp_path / "src/labels/00002.txt").write_text("11 12 51 40 3\n")
    r = _cli("data", "import", "pixel-boxes", str(tmp_path / "src"), str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "class ids start at 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
