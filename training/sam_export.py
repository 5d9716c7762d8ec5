"""Export a segment-anything checkpoint (vit_b / vit_l / vit_h) to two ONNX files for the worker's
SamSegmenter: the image encoder (run once per image) and a box-prompted mask decoder that takes ALL
boxes of an image in one call (prompt batch dimension dynamic), with a parity check against PyTorch.

torch and segment_anything are imported lazily (the `sam` extra). Files written to OUT:
encoder.onnx, decoder.onnx, sam.json (type, img_size, mask_input_size, checkpoint sha256, parity).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import TrainingError
from training.offline import require_train_extra

log = logging.getLogger(__name__)

__all__ = ["SAM_TYPES", "SamExport", "build_tiny_sam", "export_sam", "load_sam", "sam_parity_check"]

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "vit_t", "tiny")  # vit_t: MobileSAM (its `mobile_sam` package)
# Official checkpoints (https://github.com/facebookresearch/segment-anything#model-checkpoints) and their sha256;
# sizes: vit_b 375,042,383 bytes, vit_l 1,249,524,607, vit_h 2,564,550,879
OFFICIAL_SHA256 = {
    "sam_vit_b_01ec64.pth": "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    "sam_vit_l_0b3195.pth": "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    "sam_vit_h_4b8939.pth": "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    "mobile_sam.pt": "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",  # 40,728,226 bytes
}
DEFAULT_OPSET = 17
# encoder: max |embedding diff| / max |embedding|; decoder (same embedding): mask agreement of ONNX vs
# PyTorch (SamPredictor.predict_torch, multimask_output=False) as IoU of the thresholded masks
SAM_PARITY_TOLERANCE = {"encoder_rel_diff": 1e-3, "min_mask_iou": 0.98}


@dataclass
class SamExport:
    out_dir: Path
    encoder: Path
    decoder: Path
    info: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def build_tiny_sam(seed: int = 0, img_size: int = 256) -> Any:
    """A small randomly initialised SAM from segment_anything.modeling (ViT depth 2, dim 64): the same
    graph structure as vit_b at a fraction of the size, for tests."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    emb = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=64, img_size=img_size, mlp_ratio=4, num_heads=2,
                                      patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,),
                                      window_size=4, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(emb, emb), input_image_size=(img_size, img_size),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                                                         mlp_dim=512, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=64),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_sam(sam_type: str, checkpoint: Path | str | None) -> Any:
    """A SAM model of `sam_type` with the checkpoint's weights (random weights when checkpoint is None)."""
    require_train_extra("torch")
    if sam_type not in SAM_TYPES:
        raise TrainingError(f"--type {sam_type!r}: expected one of {', '.join(SAM_TYPES)}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise TrainingError(f"--checkpoint {checkpoint}: no such file")
    import torch

    if sam_type == "tiny":
        sam = build_tiny_sam()
        if checkpoint is not None:
            sam.load_state_dict(torch.load(str(checkpoint), map_location="cpu"))
        return sam.eval()
    if sam_type == "vit_t":  # MobileSAM: TinyViT encoder, the same prompt encoder / decoder and interface
        try:
            from mobile_sam import sam_model_registry
        except ImportError:
            raise TrainingError("--type vit_t needs MobileSAM's package: pip install "
                            "git+https://github.com/ChaoningZhang/MobileSAM (and timm)") from None
    else:
        from segment_anything import sam_model_registry

    try:
        return sam_model_registry[sam_type](checkpoint=str(checkpoint) if checkpoint else None).eval()
    except RuntimeError as exc:  # a state_dict of another type: size mismatches
        raise TrainingError(f"--checkpoint {checkpoint} is not a {sam_type} SAM checkpoint: {str(exc)[:300]}") from None


def _decoder_module(sam: Any) -> Any:
    """SamOnnxModel that returns the single-mask output (mask token 0, as SamPredictor with
    multimask_output=False) at the decoder's resolution for a batch of box prompts; the upscaling to the
    frame runs in numpy (SamSegmenter.postprocess: traced, the crop size would be frozen to the dummy's)."""
    from segment_anything.utils.onnx import SamOnnxModel

    class BoxDecoder(SamOnnxModel):
        def forward(self, image_embeddings: Any, point_coords: Any, point_labels: Any, mask_input: Any,
                    has_mask_input: Any) -> Any:
            sparse = self._embed_points(point_coords, point_labels)
            dense = self._embed_masks(mask_input, has_mask_input)
            masks, scores = self.model.mask_decoder.predict_masks(
                image_embeddings=image_embeddings, image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
            return masks[:, :1], scores[:, :1]

    return BoxDecoder(sam, return_single_mask=False).eval()


def export_sam(
    sam: Any, out_dir: Path | str, *, sam_type: str, checkpoint: Path | str | None = None, opset: int = DEFAULT_OPSET,
    parity: bool = True, images: Sequence[np.ndarray] | None = None,
) -> SamExport:
    """Write encoder.onnx, decoder.onnx and sam.json under out_dir; run the parity check when asked."""
    require_train_extra("torch", "onnx")
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc_path, dec_path = out / "encoder.onnx", out / "decoder.onnx"
    img_size = int(sam.image_encoder.img_size)
    emb_hw = tuple(int(v) for v in sam.prompt_encoder.image_embedding_size)
    mask_in = 4 * emb_hw[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        x = torch.randn(1, 3, img_size, img_size)
        torch.onnx.export(sam.image_encoder, (x,), str(enc_path), input_names=["image"],
                          output_names=["image_embeddings"], opset_version=opset, dynamo=False)
        dec = _decoder_module(sam)
        n = 3
        dummy = (
            torch.randn(1, 256, *emb_hw), torch.randint(0, img_size, (n, 2, 2), dtype=torch.float),
            torch.tensor([[2, 3]] * n, dtype=torch.float), torch.zeros(n, 1, mask_in, mask_in), torch.zeros(1),
        )
        torch.onnx.export(
            dec, dummy, str(dec_path), opset_version=opset, dynamo=False,
            input_names=["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
            output_names=["low_res_masks", "iou_predictions"],
            dynamic_axes={"point_coords": {0: "boxes", 1: "points"}, "point_labels": {0: "boxes", 1: "points"},
                          "mask_input": {0: "boxes"}, "low_res_masks": {0: "boxes"}, "iou_predictions": {0: "boxes"}},
        )
    info: dict[str, Any] = {
        "type": sam_type, "img_size": img_size, "embedding_hw": list(emb_hw), "mask_input_size": mask_in,
        "opset": opset, "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": _sha256(Path(checkpoint)) if checkpoint else None,
        "parameters": int(sum(p.numel() for p in sam.parameters())),
        "export_s": round(time.perf_counter() - t0, 2),
    }
    if checkpoint is not None and Path(checkpoint).name in OFFICIAL_SHA256:
        info["official_sha256_ok"] = info["checkpoint_sha256"] == OFFICIAL_SHA256[Path(checkpoint).name]
        if not info["official_sha256_ok"]:
            log.warning("checkpoint sha256 differs from the official file of that name",
                        extra={"checkpoint": str(checkpoint), "sha256": info["checkpoint_sha256"],
                               "expected": OFFICIAL_SHA256[Path(checkpoint).name]})
    result = SamExport(out_dir=out, encoder=enc_path, decoder=dec_path, info=info)
    if parity:
        result.parity = sam_parity_check(sam, out, images=images, img_size=img_size, mask_input_size=mask_in)
        info["parity"] = result.parity
    (out / "sam.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("exported SAM", extra={"out_dir": str(out), **{k: v for k, v in info.items() if k != "parity"}})
    return result


def _parity_images(img_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Synthetic parts (grey texture, a dark streak and a bright blob) and boxes around them."""
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for k, (h, w) in enumerate(((int(img_size * 0.75), img_size), (img_size, int(img_size * 0.5)))):
        img = cv2.cvtColor(rng.normal(128, 12, (h, w)).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        cv2.line(img, (w // 8, h // 4), (w // 2, h // 3 + 5 * k), (30, 30, 30), 3)
        cv2.circle(img, (3 * w // 4, 2 * h // 3), max(h // 10, 4), (230, 230, 230), -1)
        boxes = np.array([[w // 8 - 4, h // 4 - 6, w // 2 + 4, h // 3 + 5 * k + 6],
                          [3 * w // 4 - h // 8, 2 * h // 3 - h // 8, 3 * w // 4 + h // 8, 2 * h // 3 + h // 8],
                          [0, 0, w // 3, h // 3]], np.float32)
        out.append((img, boxes))
    return out


def sam_parity_check(
    sam: Any, out_dir: Path | str, *, images: Sequence[np.ndarray] | None = None, img_size: int,
    mask_input_size: int, tolerance: dict[str, float] | None = None,
) -> dict[str, Any]:
    """ONNX (through inference_workers.segment.SamSegmenter) vs PyTorch on the same preprocessed input:
    encoder embeddings (relative max diff) and, from one embedding, the masks of all boxes (IoU)."""
    import torch
    from segment_anything import SamPredictor

    from inference_workers.detector import make_session
    from inference_workers.segment import SamSegmenter, mask_iou, sam_preprocess

    tol = {**SAM_PARITY_TOLERANCE, **(tolerance or {})}
    d = Path(out_dir)
    seg = SamSegmenter(make_session(d / "encoder.onnx", "cpu"), make_session(d / "decoder.onnx", "cpu"),
                       img_size=img_size, mask_input_size=mask_input_size)
    pairs = _parity_images(img_size) if images is None else [
        (im, np.array([[0, 0, im.shape[1] // 2, im.shape[0] // 2]], np.float32)) for im in images]
    predictor = SamPredictor(sam)
    enc_rel, ious = 0.0, []
    for img, boxes in pairs:
        x, scale = sam_preprocess(img, img_size)
        emb_onnx = seg.encoder.run(None, {seg._enc_input: x})[0]
        with torch.no_grad():
            emb_t = sam.image_encoder(torch.from_numpy(x)).numpy()
        enc_rel = max(enc_rel, float(np.abs(emb_onnx - emb_t).max() / max(np.abs(emb_t).max(), 1e-9)))
        h, w = img.shape[:2]
        logits = seg.decode(emb_t, scale, boxes, h, w)
        # PyTorch decoder from the same embedding: SamPredictor with its features set directly
        predictor.reset_image()
        predictor.features = torch.from_numpy(emb_t)
        predictor.original_size = (h, w)
        predictor.input_size = (int(h * scale + 0.5), int(w * scale + 0.5))
        predictor.is_image_set = True
        tb = predictor.transform.apply_boxes_torch(torch.from_numpy(boxes), (h, w))
        with torch.no_grad():
            tm, _, _ = predictor.predict_torch(None, None, boxes=tb, multimask_output=False, return_logits=True)
        tm = tm[:, 0].numpy()
        for a, b in zip(logits, tm, strict=True):
            ious.append(mask_iou(a > 0, b > 0))
    report = {
        "images": len(pairs), "masks": len(ious), "encoder_rel_diff": round(enc_rel, 8),
        "min_mask_iou": round(min(ious), 6) if ious else 0.0, "mean_mask_iou": round(float(np.mean(ious)), 6) if ious else 0.0,
        "tolerance": tol,
    }
    report["passed"] = bool(ious) and enc_rel <= tol["encoder_rel_diff"] and report["min_mask_iou"] >= tol["min_mask_iou"]
    log.log(logging.INFO if report["passed"] else logging.WARNING, "SAM parity check", extra=report)
    return report
