"""`sqis bench segment`: segmentation-stage latency per image with 1, 5 and 20 boxes.

SAM: a ViT-B-shaped graph (random weights; 1024 px) exported with `sqis sam export`'s code, run through
SamSegmenter (encoder once per image + one batched decoder call); yolo-seg: a YOLOv8-seg ONNX through
YoloSegSegmenter. Needs the `sam` extra for the SAM export (cached under the state dir).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["bench_sam", "bench_yolo_seg", "export_untrained_yolo_seg", "synthetic_boxes"]


def synthetic_boxes(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, w * 0.8, n)
    y1 = rng.uniform(0, h * 0.8, n)
    return np.stack([x1, y1, x1 + rng.uniform(16, w * 0.2, n), y1 + rng.uniform(16, h * 0.2, n)], 1).astype(np.float32)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(ts), 2)


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(60, 200, (h, w, 3), dtype=np.uint8)


def bench_sam(model_dir: Path, *, boxes: Sequence[int] = (1, 5, 20), repeats: int = 3, threads: int = 0,
              image_hw: tuple[int, int] = (1024, 1024)) -> dict[str, Any]:
    """Encoder once per image, then decoder (one batched call) for each box count; per-image totals."""
    from inference_workers.segment import SamSegmenter

    seg = SamSegmenter.from_dir(model_dir, "cpu", threads)
    img = _image(*image_hw)
    seg.segment(img, synthetic_boxes(1, *image_hw), [0])  # warm-up
    emb, scale = seg.encode(img)
    enc_ms = _median_ms(lambda: seg.encode(img), repeats)
    rows = []
    h, w = image_hw
    for n in boxes:
        b = synthetic_boxes(n, *image_hw, seed=n)
        low = seg.decode_low_res(emb, scale, b, h, w)
        dec_ms = _median_ms(lambda b=b: seg.decode_low_res(emb, scale, b, h, w), max(repeats, 5))
        post_ms = _median_ms(lambda low=low: seg.postprocess(low, h, w), max(repeats, 5))
        rows.append({"boxes": n, "encoder_runs": 1, "encoder_ms": enc_ms, "decoder_ms": dec_ms,
                     "decoder_ms_per_box": round(dec_ms / n, 2), "upscale_ms": post_ms,
                     "total_ms": round(enc_ms + dec_ms + post_ms, 2)})
    return {"segmenter": seg.name, "image": list(image_hw), "img_size": seg.img_size, "per_boxes": rows}


def export_untrained_yolo_seg(out_dir: Path, imgsz: int = 640, nc: int = 1, model: str = "yolov8n-seg.yaml", *,
                              spread_head: bool = False) -> Path:
    """An untrained YOLOv8-seg exported to ONNX (timing only); needs the `train` extra. ``spread_head``:
    class scores spread over (0, 0.6) instead of near 0, so a threshold gives a few detections per frame
    (masks to decode, as a trained model would)."""
    from training.export import export_onnx
    from training.offline import import_ultralytics

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx = out_dir / f"untrained-{Path(model).stem}-{imgsz}{'-spread' if spread_head else ''}.onnx"
    if onnx.is_file():
        return onnx
    import_ultralytics(out_dir / "state")
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    m = SegmentationModel(model, nc=nc, verbose=False)
    m.names = {i: f"class{i}" for i in range(nc)}
    if spread_head:
        with torch.no_grad():
            for seq in m.model[-1].cv3:
                seq[-1].bias.uniform_(-3.5, -0.5)
                seq[-1].weight.mul_(20.0)
    m.eval()
    pt = out_dir / "untrained-seg.pt"
    torch.save({"model": m, "train_args": {"imgsz": imgsz, "task": "segment"}, "epoch": -1, "date": None}, pt)
    return export_onnx(pt, onnx, imgsz=imgsz, name="untrained-yolo-seg", version="0", state_dir=out_dir / "state")


def bench_yolo_seg(onnx_path: Path, *, boxes: Sequence[int] = (1, 5, 20), repeats: int = 5, threads: int = 0,
                   image_hw: tuple[int, int] = (1024, 1024)) -> dict[str, Any]:
    """One forward pass per image (boxes + prototypes), then the numpy mask decoding per box count."""
    from inference_workers.detector import make_session
    from inference_workers.segment import YoloSegSegmenter

    seg = YoloSegSegmenter(make_session(onnx_path, "cpu", threads), path=str(onnx_path))
    img = _image(*image_hw)
    seg.segment(img, synthetic_boxes(1, *image_hw), [0])
    pred, protos, meta = seg.run(img)
    fwd_ms = _median_ms(lambda: seg.run(img), repeats)
    rows = []
    for n in boxes:
        b = synthetic_boxes(n, *image_hw, seed=n)
        dec = _median_ms(lambda b=b, n=n: seg.masks_for(pred, protos, meta, b, [0] * n), repeats)
        rows.append({"boxes": n, "forward_runs": 1, "forward_ms": fwd_ms, "mask_decode_ms": dec,
                     "mask_decode_ms_per_box": round(dec / n, 2), "total_ms": round(fwd_ms + dec, 2)})
    return {"segmenter": seg.name, "model": str(onnx_path), "imgsz": list(seg.imgsz), "image": list(image_hw),
            "per_boxes": rows}


def export_tinyvit_encoder(out: Path, img_size: int = 1024) -> Path:
    """A MobileSAM-scale image encoder with random weights: TinyViT-5M (timm; embed dims 64/128/160/320,
    depths 2/2/6/2, windows 7/7/14/7) with its last stage kept at stride 16 as MobileSAM does, and SAM's
    neck to a [1, 256, S/16, S/16] embedding. Timing only (needs the `sam` extra with timm)."""
    if out.is_file():
        return out
    import torch
    from segment_anything.modeling.common import LayerNorm2d
    from timm.models.tiny_vit import TinyVit
    from torch import nn

    torch.manual_seed(0)
    body = TinyVit(num_classes=0, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
                   window_sizes=(7, 7, 14, 7), drop_path_rate=0.0)
    body.stages[3].downsample.conv2.conv.stride = (1, 1)
    neck = nn.Sequential(nn.Conv2d(320, 256, 1, bias=False), LayerNorm2d(256),
                         nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.neck = body, neck

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.neck(self.body.forward_features(x))

    enc = Encoder().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(enc, (torch.randn(1, 3, img_size, img_size),), str(out), input_names=["image"],
                          output_names=["image_embeddings"], opset_version=17, dynamo=False)
    return out


def bench_tinyvit(onnx_path: Path, *, repeats: int = 5, threads: int = 0, img_size: int = 1024) -> dict[str, Any]:
    from inference_workers.detector import make_session

    sess = make_session(onnx_path, "cpu", threads)
    x = np.random.default_rng(0).standard_normal((1, 3, img_size, img_size)).astype(np.float32)
    emb = sess.run(None, {"image": x})[0]
    ms = _median_ms(lambda: sess.run(None, {"image": x}), repeats)
    return {"encoder": "tinyvit-5m-shaped (random weights)", "img_size": img_size, "embedding": list(emb.shape),
            "encoder_ms": ms, "under_100ms": ms < 100}
