"""Tiled inference: tile layout, boxes mapped back to the frame, defects cut by a tile border merged."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from inference_workers.detector import Detection, Thresholds
from inference_workers.tiling import TiledDetector, TileSpec, merge_tiled, tile_grid, tile_origins


def test_tile_origins_cover_the_frame_with_the_overlap() -> None:
    assert tile_origins(400, 512, 0.2) == [0]
    o = tile_origins(1250, 512, 0.2)
    assert o == [0, 369, 738] and o[-1] + 512 == 1250
    assert all(a + 512 - b >= 0.2 * 512 for a, b in zip(o, o[1:], strict=False))
    assert tile_grid(500, 1250, TileSpec(512, 0.2)) == [(0, 0, 500, 512), (0, 369, 500, 881), (0, 738, 500, 1250)]
    with pytest.raises(ValueError):
        TileSpec(512, 0.95)


class FakeDetector:
    """Finds the bright pixels of each crop it is given, one box per crop (tile coordinates)."""

    name, version, class_names, imgsz, providers, path, max_det = "fake", "1", ["defect"], (64, 64), [], None, 300
    thresholds = Thresholds()

    def __init__(self) -> None:
        self.crop_shapes: list[tuple[int, ...]] = []

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        out = []
        for img in images:
            self.crop_shapes.append(img.shape)
            ys, xs = np.nonzero(img[..., 0] > 128)
            out.append([Detection(0, "defect", 0.9, float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                  float(ys.max() + 1))] if len(xs) else [])
        return out

    def warmup(self, batch_size: int = 1) -> None:
        pass


def _frame(w: int, h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img


def test_a_box_in_one_tile_maps_back_to_the_frame() -> None:
    fake = FakeDetector()
    tiled = TiledDetector(fake, TileSpec(512, 0.2))  # type: ignore[arg-type]
    [dets] = tiled.detect([_frame(500, 1250, (100, 1000, 140, 1030))])  # only in the last tile (738..1250)
    assert [d.xyxy for d in dets] == [(100.0, 1000.0, 140.0, 1030.0)]
    assert fake.crop_shapes == [(512, 500, 3)] * 3  # three tiles, one detector run
    assert not hasattr(tiled, "preprocess") and tiled.name == "fake"


def test_a_defect_cut_by_a_tile_border_is_one_box() -> None:
    # a long scratch from y=300 to y=700: tile 0 (0..512) sees 300..512, tile 1 (369..881) sees 369..700
    fake = FakeDetector()
    [dets] = TiledDetector(fake, TileSpec(512, 0.2)).detect([_frame(500, 1250, (200, 300, 210, 700))])  # type: ignore[arg-type]
    assert [d.xyxy for d in dets] == [(200.0, 300.0, 210.0, 700.0)]


def test_separate_defects_stay_separate() -> None:
    d = [Detection(0, "defect", 0.8, 10, 10, 30, 30), Detection(0, "defect", 0.7, 10, 450, 30, 470),
         Detection(1, "other", 0.6, 10, 440, 30, 512)]
    tiles = [(0, 0, 500, 512), (0, 369, 500, 881)]
    out = merge_tiled(d, [0, 1, 0], tiles, 500, 1250)
    # the class-1 box is cut by tile 0's lower border and touches the class-0 box of tile 1: other class, kept
    assert sorted(x.xyxy for x in out) == sorted(x.xyxy for x in d)


def test_tile_dataset_clips_boxes_into_the_tiles(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import cv2
    import yaml

    from training.tiles import clip_to_tile, tile_dataset

    # a box cut by the border between tiles 0 (0..512) and 1 (369..881) is in both, clipped
    assert clip_to_tile([(0, 200, 300, 210, 700)], (0, 0, 500, 512)) == [(0, 200, 300, 210, 512)]
    assert clip_to_tile([(0, 200, 300, 210, 700)], (0, 369, 500, 881)) == [(0, 200, 0, 210, 331)]
    assert clip_to_tile([(0, 200, 508, 210, 540)], (0, 0, 500, 512)) == []  # a 4 px sliver of 32 px: dropped
    src = tmp_path / "src"
    (src / "images" / "train").mkdir(parents=True)
    (src / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(src / "images/train/a.png"), np.zeros((1250, 500, 3), np.uint8))
    (src / "labels/train/a.txt").write_text(f"0 {205 / 500} {500 / 1250} {10 / 500} {400 / 1250}\n")
    (src / "data.yaml").write_text(yaml.safe_dump({"path": str(src), "train": "images/train", "names": {0: "d"}}))
    stats = tile_dataset(src, tmp_path / "out", TileSpec(512, 0.2))
    assert stats["train"] == {"images": 1, "tiles": 3, "boxes": 2, "defect_free_tiles": 1}
    v = [float(x) for x in (tmp_path / "out/labels/train/a_x0_y369.txt").read_text().split()]
    assert v[0] == 0 and np.allclose(np.array(v[1:]) * [500, 512, 500, 512], [205, 165.5, 10, 331], atol=0.01)
