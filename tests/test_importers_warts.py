"""Real datasets have warts (issue #21, part 6): every problem reported in one pass, --skip-invalid
imports the rest and lists what it dropped, and the plain "image + same-stem mask" folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.dataset_fixtures import build_mvtec_ad, rect_mask, texture, write_image
from training.datasets import DatasetError
from training.importers import ImportOptions, import_dataset, scan

W = H = 64


def _blank_masks(root: Path, names: list[tuple[str, str]]) -> None:
    for t, stem in names:
        write_image(root / "ground_truth" / t / f"{stem}_mask.png", np.zeros((H * 3 // 2, H * 3 // 2), np.uint8))


def test_mvtec_ad_reports_every_problem_in_one_pass(tmp_path: Path) -> None:
    build_mvtec_ad(tmp_path / "src")
    _blank_masks(tmp_path / "src", [("crack", "001"), ("scratch", "003")])  # 96x96 like the images: empty
    (tmp_path / "src/ground_truth/crack/002_mask.png").unlink()
    with pytest.raises(DatasetError) as exc:
        scan("mvtec-ad", tmp_path / "src")
    msg = str(exc.value)
    assert "3 problems, nothing imported" in msg and "--skip-invalid" in msg
    assert "ground_truth/crack/001_mask.png: empty mask for a defect image" in msg
    assert "ground_truth/scratch/003_mask.png: empty mask for a defect image" in msg
    assert "test/crack/002.png: defect image without its mask" in msg
    assert not (tmp_path / "out").exists()


def test_skip_invalid_imports_the_rest_and_lists_the_dropped_in_the_card(tmp_path: Path) -> None:
    exp = build_mvtec_ad(tmp_path / "src")
    _blank_masks(tmp_path / "src", [("crack", "001"), ("scratch", "003")])
    out = tmp_path / "out"
    card = import_dataset("mvtec-ad", tmp_path / "src", out, opts=ImportOptions(skip_invalid=True))
    assert card.total_images == len(exp) - 2
    assert sorted(Path(p["file"]).name for p in card.skipped) == ["001_mask.png", "003_mask.png"]
    assert {p["reason"] for p in card.skipped} == {"empty mask for a defect image"}
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk["skipped"] == card.skipped
    md = (out / "CARD.md").read_text()
    assert "## Skipped (2, --skip-invalid)" in md and "001_mask.png`: empty mask for a defect image" in md


def _mask_folders(root: Path, *, subfolders: bool = False) -> dict[str, int]:
    """Magnetic-Tile-like: MT_Blowhole/Imgs/STEM.jpg + STEM.png, MT_Free/Imgs/ (empty masks); or
    <class>/images + <class>/masks. Returns key -> boxes expected."""
    exp: dict[str, int] = {}
    seed = 7000
    for cls in ("MT_Blowhole", "MT_Crack", "MT_Free"):
        for i in range(4):
            seed += 1
            stem = f"exp{i}_num_{seed}"
            rects = [] if cls == "MT_Free" else [(5 + 3 * i, 10, 20 + 3 * i, 30)]
            if subfolders:
                write_image(root / cls / "images" / f"{stem}.jpg", texture(W, H, seed))
                write_image(root / cls / "masks" / f"{stem}_mask.png", rect_mask(W, H, rects))
            else:
                write_image(root / cls / "Imgs" / f"{stem}.jpg", texture(W, H, seed))
                write_image(root / cls / "Imgs" / f"{stem}.png", rect_mask(W, H, rects))
            exp[f"{cls}/{stem}" if subfolders else f"{cls}/Imgs/{stem}"] = len(rects)
    return exp


@pytest.mark.parametrize("subfolders", [False, True])
def test_mask_folders_layout_imports_image_and_same_stem_mask(tmp_path: Path, subfolders: bool) -> None:
    exp = _mask_folders(tmp_path / "src", subfolders=subfolders)
    ds = scan("mask-folders", tmp_path / "src")
    assert ds.classes == ["MT_Blowhole", "MT_Crack"]  # MT_Free: defect-free
    got = {s.key: len(s.boxes) for s in ds.samples}
    assert got == exp
    crack = next(s for s in ds.samples if s.key.startswith("MT_Crack/"))
    assert {b.cls for b in crack.boxes} == {1} and crack.mask is not None and crack.image.suffix == ".jpg"


def test_mask_folders_problems_in_one_pass_then_skip_invalid(tmp_path: Path) -> None:
    src = tmp_path / "src"
    exp = _mask_folders(src)
    empty = src / "MT_Crack/Imgs/exp1_num_7006.png"
    write_image(empty, np.zeros((H, W), np.uint8))  # an empty mask for a defect image
    (src / "MT_Blowhole/Imgs/exp2_num_7003.png").unlink()  # a defect image without its mask
    write_image(src / "MT_Free/Imgs/exp0_num_7009.png", rect_mask(W, H, [(1, 1, 9, 9)]))  # defect in "free"
    with pytest.raises(DatasetError) as exc:
        scan("mask-folders", src)
    msg = str(exc.value)
    assert msg.startswith(f"{src}: 3 problems") and msg.count("\n") == 3
    assert "exp1_num_7006.png: empty mask for a defect image" in msg
    assert "exp2_num_7003.jpg: defect image without its mask" in msg
    assert "exp0_num_7009.png: defect pixels in the mask of a defect-free class" in msg
    card = import_dataset("mask-folders", src, tmp_path / "out", opts=ImportOptions(skip_invalid=True))
    assert card.total_images == len(exp) - 3 and len(card.skipped) == 3


def test_cli_strict_refusal_is_exit_2_and_skip_invalid_lists_the_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sqis.cli import run

    build_mvtec_ad(tmp_path / "src")
    _blank_masks(tmp_path / "src", [("crack", "001"), ("crack", "003")])
    argv = ["data", "import", "mvtec-ad", str(tmp_path / "src"), str(tmp_path / "out"), "--no-track"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "2 problems" in err
    assert run([*argv, "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 invalid file(s)" in out and "001_mask.png: empty mask for a defect image" in out


def test_kolektor_with_split_files_reports_all_then_skips(tmp_path: Path) -> None:
    from tests.dataset_fixtures import build_kolektor

    src = tmp_path / "src"
    exp = build_kolektor(src, items=2)
    (src / "kos01/Part2_label.png").unlink()
    write_image(src / "kos02/Part0_label.png", rect_mask(50, 50, [(1, 1, 5, 5)]))
    with pytest.raises(DatasetError) as exc:
        scan("kolektor", src)
    msg = str(exc.value)
    assert "2 problems" in msg and "kos01/Part2.jpg: image without its mask" in msg
    assert "kos02/Part0_label.png: mask size 50x50 does not match" in msg
    # the split files still list the two dropped parts: that is no longer an error once they are skipped
    card = import_dataset("kolektor", src, tmp_path / "out", opts=ImportOptions(skip_invalid=True))
    assert card.total_images == len(exp) - 2 and card.split_origin["kind"] == "file"


def test_voc_reports_every_bad_xml(tmp_path: Path) -> None:
    from tests.dataset_fixtures import build_voc

    src = tmp_path / "src"
    build_voc(src)
    (src / "Annotations/2024_0003.xml").write_text("<annotation><object>")
    (src / "JPEGImages/2024_0005.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError) as exc:
        scan("voc", src)
    assert "2 problems" in str(exc.value) and "2024_0003.xml: invalid XML" in str(exc.value)
    assert "2024_0005.jpg: unreadable image" in str(exc.value)
    assert len(scan("voc", src, ImportOptions(skip_invalid=True)).samples) == 10


def test_pixel_boxes_reports_every_bad_label(tmp_path: Path) -> None:
    from tests.dataset_fixtures import build_pixel_boxes

    src = tmp_path / "src"
    exp = build_pixel_boxes(src)
    (src / "labels/00002.txt").write_text("11 12 51 40 3\n")  # class id past the 3 classes
    (src / "labels/00004.txt").write_text("0.1 0.2 0.3 0.4 1\n")  # normalised, not pixels
    (src / "labels/99999.txt").write_text("1 1 5 5 0\n")  # no image
    with pytest.raises(DatasetError) as exc:
        scan("pixel-boxes", src)
    msg = str(exc.value)
    assert "3 problems" in msg and "00002.txt:1: class id 3" in msg and "00004.txt:1: coordinates" in msg
    assert "99999.txt: label whose image is missing" in msg
    assert sorted(s.key for s in scan("pixel-boxes", src, ImportOptions(skip_invalid=True)).samples) == sorted(
        k for k in exp if k not in ("00002", "00004"))


def test_yolo_reports_every_problem(tmp_path: Path) -> None:
    from tests.dataset_fixtures import build_yolo

    src = tmp_path / "src"
    exp = build_yolo(src)
    (src / "images/val/valimg2.png").unlink()
    (src / "labels/train/trainimg3.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError) as exc:
        scan("yolo", src)
    msg = str(exc.value)
    assert "2 problems" in msg and "labels/val/valimg2.txt: label whose image is missing" in msg
    assert "trainimg3.txt:1: unknown class id 7" in msg
    assert len(scan("yolo", src, ImportOptions(skip_invalid=True)).samples) == len(exp) - 2


def test_dagm_and_coco_report_every_problem(tmp_path: Path) -> None:
    import json as _json

    from tests.dataset_fixtures import build_coco, build_dagm

    build_dagm(tmp_path / "dagm")
    lf = tmp_path / "dagm/Class2/Test/Label/Labels.txt"
    lf.write_text(lf.read_text().replace("\t52.0\t60.0", "\t500.0\t60.0"))
    (tmp_path / "dagm/Class1/Train/0001.PNG").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as exc:
        scan("dagm", tmp_path / "dagm")
    assert "2 problems" in str(exc.value) and "ellipse centre" in str(exc.value)
    assert "0001.PNG: unreadable image" in str(exc.value)

    build_coco(tmp_path / "coco")
    ann = next((tmp_path / "coco").rglob("*.json"))
    doc = _json.loads(ann.read_text())
    doc["annotations"][0]["category_id"] = 99
    doc["images"][-1]["file_name"] = "nowhere.jpg"
    ann.write_text(_json.dumps(doc))
    with pytest.raises(DatasetError) as exc:
        scan("coco", tmp_path / "coco")
    assert "2 problems" in str(exc.value) and "category_id 99" in str(exc.value)
    assert "'nowhere.jpg'" in str(exc.value) and "not found" in str(exc.value)
