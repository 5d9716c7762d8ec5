"""Static INT8 quantization of an exported YOLOv8 detector, with a parity report and an accuracy gate.

ONNX Runtime's QDQ quantizer (per-channel weights, MinMax activations calibrated on the dataset's val
split through the serving letterbox). The Detect head's decode (DFL softmax, anchor grid, concat of
boxes and scores) is kept in FP32: quantized, it collapses every box (mAP 0.000 on NEU-DET). The
gate evaluates FP32 and INT8 through the workers' own code path (training/evaluate.py) on the test
split: mAP@0.5 may drop at most ``max_map_drop``, and where the FP32 model has a calibrated
image-level operating point (training/calibrate.py), the INT8 model, calibrated on val in its own
right, must keep the FP32 image recall at its operating point. Needs the ``onnx`` package (the
``train`` extra); serving the result needs ONNX Runtime only.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.errors import ParityBlocked, TrainingError

if TYPE_CHECKING:
    from inference_workers.detector import Detector
    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "INT8_SUFFIX", "KEEP_FP32", "GateResult", "QuantizeReport", "QuantizeRefused", "fp32_nodes", "int8_path", "parity_report", "quantize",
    "quantize_onnx",
]

# What stays in FP32 (see fp32_nodes): 'decode': the head's decode only (its convs and their SiLU run
# INT8); 'head': every non-Conv node of the head; 'head-all': the whole head; 'none': nothing.
# `quantize(keep_fp32='auto')` tries 'decode', then 'head-all'.
KEEP_FP32 = ("decode", "head", "head-all", "none")
INT8_SUFFIX = "-int8"
_MODULE = re.compile(r"^/model\.(\d+)/")
_ACT = re.compile(r"/act/(Sigmoid|Mul)$")


def int8_path(model: Path | str) -> Path:
    """Where a model's INT8 file goes by default (and where `sqis bench model` looks): model.onnx -> model-int8.onnx."""
    p = Path(model)
    return p.with_name(f"{p.stem}{INT8_SUFFIX}{p.suffix}")


class QuantizeRefused(ParityBlocked):  # noqa: N818 - a refusal, like a parity block: the CLI maps it to exit 1
    """The INT8 model missed the accuracy gate; the message carries the figures."""


def head_prefix(node_names: Sequence[str]) -> str | None:
    """The Detect head's name prefix (the highest /model.N/ of an Ultralytics export), or None."""
    idx = [int(m.group(1)) for n in node_names if (m := _MODULE.match(n))]
    return f"/model.{max(idx)}/" if idx else None


def fp32_nodes(model: Any, keep: str = "decode") -> list[str]:
    """Names of the nodes to keep in FP32 under a KEEP_FP32 policy (model: an onnx.ModelProto)."""
    if keep not in KEEP_FP32:
        raise TrainingError(f"--keep-fp32 {keep!r}: choose one of {', '.join(KEEP_FP32)}")
    nodes = list(model.graph.node)
    prefix = head_prefix([n.name for n in nodes])
    if keep == "none" or prefix is None:
        return []
    head = [n for n in nodes if n.name.startswith(prefix)]
    if keep == "head-all":
        return [n.name for n in head]
    if keep == "head":
        return [n.name for n in head if n.op_type != "Conv"]
    return [n.name for n in head if n.op_type != "Conv" and not _ACT.search(n.name)]


class _Reader:
    """Calibration batches (one image each) letterboxed exactly as the worker does it."""

    def __init__(self, det: Detector, images: Sequence[Path]) -> None:
        self._det = det
        self._images = list(images)
        self._it: Iterator[Path] = iter(self._images)
        self._name = det.session.get_inputs()[0].name

    def get_next(self) -> dict[str, np.ndarray] | None:
        import cv2

        p = next(self._it, None)
        if p is None:
            return None
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise TrainingError(f"{p}: unreadable calibration image")
        batch, _ = self._det.preprocess([img])
        return {self._name: batch}

    def rewind(self) -> None:
        self._it = iter(self._images)


def quantize_onnx(src: Path | str, dst: Path | str, calib: Sequence[Path], *, keep_fp32: str = "decode",
                  per_channel: bool = True, method: str = "minmax") -> dict[str, Any]:
    """Write the static INT8 (QDQ) model of src to dst; returns what was done (node counts, sizes, time)."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise ImportError(f"INT8 quantization needs onnx (install the `train` extra): {exc}") from exc
    from inference_workers.detector import Detector, make_session

    if not calib:
        raise TrainingError("no calibration images")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise TrainingError(f"--calib-method {method!r}: choose one of {', '.join(methods)}")
    t0 = time.perf_counter()
    model = onnx.load(str(src))
    keep = fp32_nodes(model, keep_fp32)
    det = Detector(make_session(src, "cpu", 0), path=str(src))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sqis-quant-") as tmp:
        # the calibrator writes an augmented copy of the model; keep it out of the working directory
        tmp_dst = Path(tmp) / "model.int8.onnx"
        quantize_static(
            str(src), str(tmp_dst), _Reader(det, calib), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibTensorRangeSymmetric": False,
                           "CalibMovingAverage": False},
        )
        q = onnx.load(str(tmp_dst))
        # keep the detector's metadata (names, imgsz, stride, registry name) and mark the precision
        meta = {p.key: p.value for p in model.metadata_props}
        meta["sqis_precision"] = "int8"
        # a plain INT8 file must not pass for its FP32 source in the inspections: v2 -> v2-int8
        # (registering it stamps the new registry version instead)
        if meta.get("sqis_model_version") and not meta["sqis_model_version"].endswith("-int8"):
            meta["sqis_model_version"] += "-int8"
        meta["sqis_quantization"] = json.dumps({"format": "QDQ", "per_channel": per_channel, "method": method,
                                                "keep_fp32": keep_fp32, "calibration_images": len(calib)})
        del q.metadata_props[:]
        for k, v in meta.items():
            q.metadata_props.add(key=k, value=v)
        onnx.save(q, str(dst))
    counts: dict[str, int] = {}
    for n in q.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"src": str(src), "dst": str(dst), "keep_fp32": keep_fp32, "fp32_nodes": len(keep), "per_channel": per_channel,
            "calib_method": method, "calibration_images": len(calib),
            "quantize_linear_nodes": counts.get("QuantizeLinear", 0),
            "src_bytes": Path(src).stat().st_size, "dst_bytes": dst.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 1)}


# ---- parity ---------------------------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a [n,4] x b [m,4]."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def parity_report(ref: Detector, test: Detector, images: Sequence[Path], conf: float = 0.25,
                  iou_match: float = 0.5) -> dict[str, Any]:
    """Score and box differences of test (INT8) against ref (FP32) on the same images.

    Raw output: max / mean absolute difference of the class scores over all anchors. Detections at conf:
    each FP32 box is matched greedily to the best same-class INT8 box (IoU >= iou_match); reported are
    the share matched, score differences and IoU of the matched pairs, and boxes only one side has."""
    import cv2

    from inference_workers.detector import Thresholds

    ref = ref.with_thresholds(Thresholds(default_score=conf))
    test = test.with_thresholds(Thresholds(default_score=conf))
    raw_max, raw_sum, raw_n = 0.0, 0.0, 0
    top_diff: list[float] = []
    score_diffs: list[float] = []
    ious: list[float] = []
    n_ref = n_test = matched = 0
    for p in images:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise TrainingError(f"{p}: unreadable image")
        batch, metas = ref.preprocess([img])
        r_raw, t_raw = ref.infer(batch), test.infer(batch)
        d = np.abs(r_raw[:, 4:, :] - t_raw[:, 4:, :])
        raw_max = max(raw_max, float(d.max(initial=0.0)))
        raw_sum += float(d.sum())
        raw_n += d.size
        top_diff.append(abs(float(ref.max_raw_scores(r_raw)[0]) - float(test.max_raw_scores(t_raw)[0])))
        rd, td = ref.postprocess(r_raw, metas)[0], test.postprocess(t_raw, metas)[0]
        n_ref += len(rd)
        n_test += len(td)
        if len(rd) and len(td):
            m = _iou(rd.xyxy.astype(np.float64), td.xyxy.astype(np.float64))
            m[rd.class_id[:, None] != td.class_id[None, :]] = 0.0
            used: set[int] = set()
            for i in np.argsort(-rd.confidence):
                order = [j for j in np.argsort(-m[i]) if j not in used and m[i, j] >= iou_match]
                if order:
                    j = int(order[0])
                    used.add(j)
                    matched += 1
                    ious.append(float(m[i, j]))
                    score_diffs.append(abs(float(rd.confidence[i]) - float(td.confidence[j])))

    def stat(v: list[float], f: Any) -> float | None:
        return round(float(f(v)), 4) if v else None

    return {
        "images": len(images), "conf": conf, "iou_match": iou_match,
        "raw_score_abs_diff": {"max": round(raw_max, 4), "mean": round(raw_sum / max(raw_n, 1), 6)},
        "top_score_abs_diff": {"max": stat(top_diff, np.max), "mean": stat(top_diff, np.mean)},
        "boxes": {"fp32": n_ref, "int8": n_test, "matched": matched,
                  "matched_share": round(matched / n_ref, 4) if n_ref else None,
                  "fp32_only": n_ref - matched, "int8_only": n_test - matched},
        "matched_score_abs_diff": {"max": stat(score_diffs, np.max), "mean": stat(score_diffs, np.mean)},
        "matched_iou": {"min": stat(ious, np.min), "mean": stat(ious, np.mean)},
    }


# ---- the gate -------------------------------------------------------------------------------------
@dataclass
class GateResult:
    """FP32 and INT8 figures on the test split and whether the INT8 model passes."""

    passed: bool
    reasons: list[str]
    fp32: dict[str, Any]
    int8: dict[str, Any]
    max_map_drop: float
    tried: list[str] = field(default_factory=list)  # policies refused before this one (keep-fp32 auto)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "max_map_drop": self.max_map_drop,
                "fp32": self.fp32, "int8": self.int8, "refused_before": self.tried}


def _figures(ev: dict[str, Any]) -> dict[str, Any]:
    il = ev["image_level"]
    op = il.get("at_operating") or {}
    return {"map50": ev["map50"], "map50_95": ev["map50_95"], "precision": ev["precision"], "recall": ev["recall"],
            "thresholds_source": ev["thresholds"]["source"], "image_score": ev["thresholds"]["image_score"],
            "image_recall_at_operating": op.get("recall"), "image_fpr_at_operating": op.get("fpr"),
            "image_recall_at_fpr": il.get("recall"), "eval_wall_s": ev["eval_wall_s"]}


def check_gate(fp32: dict[str, Any], int8: dict[str, Any], max_map_drop: float = 0.01) -> GateResult:
    """Pass when mAP@0.5 drops by at most max_map_drop and, where the FP32 model is served at a calibrated
    image-level operating point, the INT8 image recall at its own operating point is not lower."""
    reasons = []
    if fp32["map50"] is not None:
        drop = fp32["map50"] - (int8["map50"] or 0.0)
        if drop > max_map_drop + 1e-9:
            reasons.append(f"mAP@0.5 {int8['map50'] or 0.0:.3f} vs FP32 {fp32['map50']:.3f} "
                           f"(drop {drop:.3f} > {max_map_drop:g})")
    if fp32.get("image_score") is not None and fp32.get("image_recall_at_operating") is not None:
        r32, r8 = fp32["image_recall_at_operating"], int8.get("image_recall_at_operating")
        if r8 is None or r8 < r32 - 1e-9:
            reasons.append(f"image recall at the calibrated operating point {r8 if r8 is not None else 0:.3f} "
                           f"vs FP32 {r32:.3f}")
    return GateResult(not reasons, reasons, fp32, int8, max_map_drop)


# ---- entry point ----------------------------------------------------------------------------------
@dataclass
class QuantizeReport:
    """What `sqis model quantize` did: the INT8 file, parity against FP32, the gate, its calibration."""

    model: str
    out: str
    quantization: dict[str, Any]
    parity: dict[str, Any]
    gate: GateResult | None
    calibration: dict[str, Any] | None = None
    registered: dict[str, str] | None = None
    stored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "out": self.out, "quantization": self.quantization, "parity": self.parity,
                "gate": None if self.gate is None else self.gate.to_dict(), "calibration": self.calibration,
                "registered": self.registered, "stored": self.stored}


def quantize(
    model_uri: str, data_dir: Path | str, out: Path | str, *, settings: Settings | None = None,
    calib_split: str = "val", calib_images: int = 64, calib_from: str | None = None, keep_fp32: str = "auto",
    per_channel: bool = True, method: str = "minmax", max_map_drop: float = 0.01, gate: bool = True,
    parity_images: int = 32, calibrate_int8: bool = True, max_fpr: float = 0.05, register: str | None = None,
    seed: int = 0,
) -> QuantizeReport:
    """Quantize MODEL (.onnx path or models:/ URI) to OUT, report parity, gate on the test split, calibrate
    the INT8 model on the val split (its own operating point) and optionally register it.

    keep_fp32 'auto': 'decode' first and, when the gate refuses it, 'head-all' (the whole head FP32).
    Raises QuantizeRefused (OUT removed) when the gate fails every policy tried."""
    from inference_workers.model_loader import load_detector
    from training.evaluate import evaluate, open_split

    if keep_fp32 != "auto" and keep_fp32 not in KEEP_FP32:
        raise TrainingError(f"--keep-fp32 {keep_fp32!r}: choose auto or one of {', '.join(KEEP_FP32)}")
    settings, data, val_images = open_split(data_dir, calib_split, settings)
    settings = settings.model_copy(update={"onnx_providers": "cpu"})
    ref = load_detector(settings, model_uri)
    if ref.path is None:
        raise TrainingError(f"{model_uri}: no local ONNX file")
    pool = val_images if calib_from in (None, calib_split) else open_split(data, calib_from, settings)[2]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(pool), size=min(calib_images, len(pool)), replace=False))
    calib = [pool[i] for i in pick]
    out = Path(out).expanduser()
    # the INT8 model gets its own operating point only where the FP32 one is served at a calibrated point
    # (the demo model deliberately is not: see README, Operating points)
    calibrate_int8 = calibrate_int8 and ref.thresholds.source.startswith("calibrated")
    policies = ["decode", "head-all"] if keep_fp32 == "auto" else [keep_fp32]
    fp32: dict[str, Any] | None = None
    refused: list[str] = []
    for policy in policies:
        info = quantize_onnx(ref.path, out, calib, keep_fp32=policy, per_channel=per_channel, method=method)
        par = parity_report(ref, load_detector(settings, str(out), ref.thresholds), val_images[:parity_images])
        report = QuantizeReport(model_uri, str(out), info, par, None)
        cal = _calibrate_sidecar(out, data, calib_split, settings, max_fpr) if calibrate_int8 else None
        report.calibration = cal
        if not gate:
            break
        if fp32 is None:
            fp32 = _figures(evaluate(model_uri, data, "test", settings=settings))
        report.gate = check_gate(fp32, _figures(evaluate(str(out), data, "test", settings=settings)), max_map_drop)
        report.gate.tried = [*refused]
        if report.gate.passed:
            break
        refused.append(f"keep-fp32 {policy}: " + "; ".join(report.gate.reasons))
        _remove(out)
        log.warning("INT8 model refused", extra={"model_uri": model_uri, "keep_fp32": policy,
                                                 "reasons": report.gate.reasons})
    else:
        raise QuantizeRefused("INT8 model refused by the accuracy gate: " + " | ".join(refused))
    if register:
        report.registered = _register(settings, report, register, data, calib_split, max_fpr, calibrate_int8)
    return report


def _calibrate_sidecar(model: Path, data: Path, split: str, settings: Settings, max_fpr: float) -> dict[str, Any]:
    """The INT8 model's own operating point on val, stored next to it (MODEL.thresholds.json)."""
    from training.calibrate import calibrate

    with tempfile.TemporaryDirectory(prefix="sqis-quant-cal-") as tmp:
        cal = calibrate(str(model), data, split, max_fpr=max_fpr, settings=settings, out_dir=Path(tmp), store=True)
        doc = cal.to_dict()
        keep = model.with_name(model.stem + ".calibration.json")
        shutil.copyfile(Path(tmp) / "calibration.json", keep)
    return {"thresholds": doc.get("thresholds"), "point": doc.get("chosen"), "stored": cal.stored, "curve_file": str(keep)}


def _remove(model: Path) -> None:
    for p in (model, model.with_name(model.stem + ".thresholds.json"), model.with_name(model.stem + ".calibration.json")):
        p.unlink(missing_ok=True)


def _register(settings: Settings, report: QuantizeReport, name: str, data: Path, split: str,
              max_fpr: float, calibrate_version: bool) -> dict[str, str]:
    """A new version of NAME (its own MLflow run), calibrated on val in its own right (tag sqis.thresholds)."""
    from training.calibrate import calibrate
    from training.registry import client_for, ensure_experiment, register_onnx

    client = client_for(settings)
    exp = ensure_experiment(client, settings, name)
    run = client.create_run(exp, run_name=f"{name}-int8")
    rid = run.info.run_id
    client.log_param(rid, "source_model", report.model)
    for k, v in report.quantization.items():
        if k not in ("src", "dst"):
            client.log_param(rid, f"quant.{k}", v)
    if report.gate is not None:
        for side in ("fp32", "int8"):
            for k in ("map50", "map50_95", "image_recall_at_operating"):
                v = getattr(report.gate, side).get(k)
                if v is not None:
                    client.log_metric(rid, f"{side}.{k}", float(v))
    with tempfile.TemporaryDirectory(prefix="sqis-quant-") as tmp:
        rep = Path(tmp) / "quantize.json"
        rep.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        client.log_artifact(rid, str(rep), "quantization")
    tags = {"sqis.precision": "int8", "sqis.source_model": report.model}
    if report.gate is not None:
        tags["metric.map50"] = f"{report.gate.int8['map50']:.4f}"
    version = register_onnx(client, run, report.out, name, tags=tags,
                            description=f"static INT8 (QDQ) of {report.model}")
    client.set_terminated(rid)
    uri = f"models:/{name}/{version}"
    if calibrate_version:
        calibrate(uri, data, split, max_fpr=max_fpr, settings=settings, out_dir=None, store=True)
    return {"name": name, "version": version, "uri": uri}
