"""Calibrated operating points: the thresholds a line runs a model at, chosen on the validation split.

The image-level decision threshold (a frame FAILs when its top detection score reaches it) is the lowest
threshold whose false-reject rate on defect-free images stays within the budget (--max-fpr), which
maximises image-level recall there; or, with --target-recall, the highest threshold that still reaches
the target recall (the fewest false rejects). Per-class score thresholds decide which boxes an Inspection
reports: each class's box-F1-optimal threshold (IoU 0.5), capped at the image threshold so that every
FAIL names at least one box. The result is stored with the model version (MLflow tag `sqis.thresholds`
and run artifacts), or next to a plain .onnx file as model.thresholds.json, where the serving side and
`sqis eval` read it by default.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference_workers.detections import Detections
from inference_workers.detector import Thresholds
from inference_workers.model_loader import load_detector
from training.errors import TrainingError
from training.evaluate import (
    MAP_CONF,
    GroundTruth,
    _by_score,
    _check_classes,
    _match,
    defective_flags,
    load_ground_truth,
    open_split,
    predict_split,
)

if TYPE_CHECKING:
    from inference_workers.tiling import TileSpec
    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Calibration", "OperatingPoint", "calibrate", "choose_image_threshold", "class_thresholds",
           "operating_curve", "plot_curve", "store_thresholds"]


@dataclass(frozen=True)
class OperatingPoint:
    """One image-level threshold and what it gives on the calibration split (FAIL when score >= threshold)."""

    threshold: float
    recall: float | None
    frr: float | None  # false-reject rate: share of defect-free images that FAIL
    false_rejects: int
    misses: int
    frr_upper95: float | None = None  # one-sided 95 % Clopper-Pearson upper bound of the false-reject rate

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "recall": self.recall, "frr": self.frr,
                "false_rejects": self.false_rejects, "misses": self.misses, "frr_upper95": self.frr_upper95}


def binomial_upper(k: int, n: int, confidence: float = 0.95) -> float | None:
    """One-sided Clopper-Pearson upper bound of a rate seen k times in n (0 of n -> about 3/n at 95 %)."""
    if n == 0:
        return None
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:  # P(X <= k) for X ~ Binomial(n, p)
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):  # cdf falls with p: find p where it equals 1 - confidence
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - confidence else (lo, mid)
    return hi


def _point(s: np.ndarray, d: np.ndarray, thr: float) -> OperatingPoint:
    flagged = s >= thr
    n_pos, n_neg = int(d.sum()), int((~d).sum())
    fr, hit = int((flagged & ~d).sum()), int((flagged & d).sum())
    return OperatingPoint(float(thr), hit / n_pos if n_pos else None, fr / n_neg if n_neg else None, fr, n_pos - hit,
                          binomial_upper(fr, n_neg))


def operating_curve(scores: Sequence[float], defective: Sequence[bool]) -> list[OperatingPoint]:
    """Recall and false-reject rate at the distinct image scores (descending threshold), from 'never FAIL';
    of thresholds with the same outcome only the highest is kept."""
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(defective, dtype=bool)
    cands = sorted({float(v) for v in s if v > 0}, reverse=True)
    curve = [_point(s, d, 1.0 + 1e-9)]
    for t in cands:
        p = _point(s, d, t)
        if (p.false_rejects, p.misses) != (curve[-1].false_rejects, curve[-1].misses):
            curve.append(p)  # a lower threshold that changes nothing is never the better choice
    return curve


def choose_image_threshold(scores: Sequence[float], defective: Sequence[bool], max_fpr: float | None = None,
                           target_recall: float | None = None) -> OperatingPoint:
    """The image-level threshold (one of the observed image scores).

    max_fpr: the highest recall among thresholds whose false-reject rate is <= max_fpr (at most
    floor(max_fpr * defect-free) defect-free images reach it); among equal recalls the highest threshold.
    target_recall: the highest threshold whose recall is >= target_recall (the fewest false rejects).
    """
    if (max_fpr is None) == (target_recall is None):
        raise TrainingError("give exactly one of --max-fpr and --target-recall")
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(defective, dtype=bool)
    if not d.any():
        raise TrainingError("the calibration split has no defective images: recall is undefined")
    curve = operating_curve(s, d)
    if max_fpr is not None:
        if (~d).sum() == 0:
            raise TrainingError("the calibration split has no defect-free images: the false-reject rate is undefined "
                            "(calibrate with --target-recall, or on a split with good parts)")
        allowed = int(np.floor(max_fpr * (~d).sum() + 1e-9))
        ok = [p for p in curve if p.false_rejects <= allowed]  # the first point (never FAIL) always is
        # the highest recall; among equals the fewest false rejects (the highest threshold)
        return max(ok, key=lambda p: (p.recall or 0.0, -p.false_rejects, p.threshold))
    assert target_recall is not None
    ok = [p for p in curve if p.recall is not None and p.recall >= target_recall - 1e-12]
    if not ok:
        raise TrainingError(f"no threshold reaches recall {target_recall} on this split")
    return max(ok, key=lambda p: p.threshold)


def class_thresholds(preds: Detections, gts: Sequence[GroundTruth], class_names: Sequence[str],
                     cap: float | None = None, floor: float = MAP_CONF) -> dict[str, dict[str, Any]]:
    """Per class: the score threshold with the best box F1 at IoU 0.5 on the split (ties -> higher
    threshold), capped at `cap`; a class without ground truth or detections gets `cap` (or 0.25).
    ``preds``: every image's detections, the image in data["image"] (training.evaluate.predict_split)."""
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        cp = _by_score(preds[preds.class_id == c])
        cg = [g for g in gts if g.class_id == c]
        fallback = cap if cap is not None else 0.25
        if not cg or not len(cp):
            out[name] = {"threshold": fallback, "f1": None, "gt": len(cg), "reason": "no ground truth or detections"}
            continue
        tp = _match(cp, cg, 0.5)
        ctp = np.cumsum(tp)
        k = np.arange(1, len(cp) + 1)
        f1 = 2 * ctp / (k + len(cg))
        scores = cp.confidence.astype(np.float64)
        last_of_score = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps every tie of its score
        f1 = np.where(last_of_score, f1, -1.0)
        best = int(np.flatnonzero(f1 == f1.max())[0])  # the highest threshold reaching the best F1
        thr = max(float(scores[best]), floor)
        capped = cap is not None and thr > cap
        out[name] = {"threshold": min(thr, cap) if cap is not None else thr, "f1": float(f1[best]),
                     "f1_threshold": thr, "capped_at_image_threshold": capped, "gt": len(cg)}
    return out


@dataclass
class Calibration:
    """The chosen operating point, its curve and where it was stored."""

    thresholds: Thresholds
    point: OperatingPoint | None
    curve: list[OperatingPoint]
    per_class: dict[str, dict[str, Any]]
    meta: dict[str, Any]
    stored: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds.to_dict(), "chosen": self.point.to_dict() if self.point else None,
                "per_class": self.per_class, **self.meta, "stored": self.stored,
                "curve": [p.to_dict() for p in self.curve]}


def plot_curve(curve: Sequence[OperatingPoint], chosen: OperatingPoint | None, path: Path, title: str,
               max_fpr: float | None = None) -> Path:
    """PNG of image-level recall against false-reject rate, with the chosen point and the budget."""
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in curve if p.frr is not None and p.recall is not None]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.step([p.frr for p in pts], [p.recall for p in pts], where="post", label="val split")
    if max_fpr is not None:
        ax.axvline(max_fpr, color="grey", linestyle="--", label=f"false-reject budget {max_fpr:g}")
    if chosen is not None and chosen.frr is not None:
        ax.plot([chosen.frr], [chosen.recall], "o", color="red",
                label=f"chosen: score >= {chosen.threshold:.4f}\nrecall {chosen.recall:.3f}, FRR {chosen.frr:.3f}")
    ax.set_xlabel("false-reject rate (defect-free images that FAIL)")
    ax.set_ylabel("image-level recall (defective images that FAIL)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def store_thresholds(settings: Settings, model_uri: str, name: str, version: str, model_path: str | None,
                     thresholds: Thresholds, files: Sequence[Path], data: Path | None = None) -> list[str]:
    """Store the operating point where the serving side looks for it (with the content digest of the
    dataset it was calibrated on, a model version's tag); returns where it went."""
    from inference_workers.model_loader import THRESHOLDS_TAG, mlflow_client, sidecar_path

    doc = json.dumps(thresholds.to_dict(), sort_keys=True)
    if model_uri.startswith("models:/"):
        client = mlflow_client(settings)
        client.set_model_version_tag(name, version, THRESHOLDS_TAG, doc)
        mv = client.get_model_version(name, version)
        where = [f"models:/{name}/{version} tag {THRESHOLDS_TAG}"]
        if data is not None and mv.run_id:
            from training.dataset_versions import record_input
            from training.registry import CALIBRATION_DIGEST_TAG

            digest = record_input(client, mv.run_id, data, "calibration")
            if digest:
                client.set_model_version_tag(name, version, CALIBRATION_DIGEST_TAG, digest)
        if mv.run_id:
            for f in files:
                client.log_artifact(mv.run_id, str(f), "calibration")
            where.append(f"run {mv.run_id} artifacts calibration/")
        return where
    assert model_path is not None
    side = sidecar_path(model_path)
    side.write_text(json.dumps(thresholds.to_dict(), indent=2, sort_keys=True) + "\n")
    return [str(side)]


def calibrate(
    model_uri: str, data_dir: Path | str, split: str = "val", *, max_fpr: float | None = 0.05,
    target_recall: float | None = None, iou: float = 0.45, settings: Settings | None = None,
    out_dir: Path | None = None, store: bool = True, tile: TileSpec | None = None, batch: int = 8,
) -> Calibration:
    """Choose the operating point of a model on a split (see the module docstring); write the curve
    (JSON + PNG) to out_dir and, with store, store the thresholds with the model version."""
    settings, data, images = open_split(data_dir, split, settings)
    base = load_detector(settings, model_uri, Thresholds(default_score=MAP_CONF, iou=iou))
    det: Any = base
    if tile is not None:
        from inference_workers.tiling import TiledDetector

        det = TiledDetector(base, tile)
    names = base.class_names
    _check_classes(data, names)
    preds, sizes, img_scores, _, _ = predict_split(det, images, batch)
    gts = load_ground_truth(images, sizes)
    defective = defective_flags(images, gts)
    n_neg = len(images) - sum(defective)
    curve = operating_curve(img_scores, defective)
    point: OperatingPoint | None = None
    note = None
    if max_fpr is not None and n_neg == 0:
        # e.g. NEU-DET: every image has defects; the FRR cannot be measured, so only box thresholds are set
        note = f"split {split!r} has no defect-free images: no image-level threshold (box thresholds only)"
    else:
        point = choose_image_threshold(img_scores, defective, max_fpr, target_recall)
        if max_fpr is not None and point.frr_upper95 is not None and point.frr_upper95 > max_fpr:
            note = (f"only {n_neg} defect-free images in {split!r}: the false-reject rate {point.frr:.3f} is "
                    f"uncertain (95 % upper bound {point.frr_upper95:.3f} > the {max_fpr:g} budget); "
                    f"about {math.ceil(3 / max_fpr)} defect-free images are needed to confirm it")
    cap = point.threshold if point is not None and point.threshold <= 1.0 else None
    per_class = class_thresholds(preds, gts, names, cap=cap)
    source = (f"calibrated:models:/{base.name}/{base.version}" if model_uri.startswith("models:/")
              else f"calibrated:file:{base.path}")
    thresholds = Thresholds(
        default_score=cap if cap is not None else 0.25, iou=iou,
        per_class={n: float(v["threshold"]) for n, v in per_class.items()},
        image_score=cap, source=source)
    meta = {"model": {"uri": model_uri, "name": base.name, "version": base.version, "classes": names},
            "data": str(data), "split": split, "images": len(images), "defective_images": sum(defective),
            "defect_free_images": n_neg, "max_fpr": max_fpr, "target_recall": target_recall,
            "tile": None if tile is None else {"size": tile.size, "overlap": tile.overlap},
            "note": note, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cal = Calibration(thresholds, point, curve, per_class, meta, [])
    files: list[Path] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        js = out_dir / "calibration.json"
        js.write_text(json.dumps(cal.to_dict(), indent=2) + "\n")
        files.append(js)
        if n_neg:
            budget = f"FRR <= {max_fpr:g}" if max_fpr is not None else f"recall >= {target_recall:g}"
            try:
                files.append(plot_curve(curve, point, out_dir / "calibration.png",
                                        f"{base.name} v{base.version} on {split}: {budget}", max_fpr))
            except ImportError:
                log.warning("no matplotlib (the `train` extra): calibration.png not drawn; the curve is in the JSON")
    if store:
        cal.stored = store_thresholds(settings, model_uri, base.name, base.version, base.path, thresholds, files,
                                      data=data)
        if files:
            files[0].write_text(json.dumps(cal.to_dict(), indent=2) + "\n")
    log.info("calibrated", extra={"model_uri": model_uri, "split": split, "image_score": thresholds.image_score,
                                  "recall": point.recall if point else None, "frr": point.frr if point else None})
    return cal


def summary_lines(cal: Calibration) -> list[str]:
    """A few human lines for the CLI."""
    m = cal.meta
    lines = [f"model {m['model']['name']} v{m['model']['version']}  split {m['split']}  images {m['images']} "
             f"(defective {m['defective_images']}, defect-free {m['defect_free_images']})"]
    if cal.point is not None:
        p = cal.point
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"image threshold {p.threshold:.4f}: recall {fmt(p.recall)}  false-reject rate {fmt(p.frr)} "
                     f"({p.false_rejects} false rejects, {p.misses} misses; 95 % upper bound {fmt(p.frr_upper95)})")
    if m.get("note"):
        lines.append(f"note: {m['note']}")
    for n, v in cal.per_class.items():
        lines.append(f"  {n:<20} threshold {v['threshold']:.4f}" + (f"  box F1 {v['f1']:.3f}" if v.get("f1") else ""))
    lines += [f"stored: {w}" for w in cal.stored]
    return lines

