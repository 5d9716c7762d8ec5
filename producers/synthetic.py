"""Synthetic cameras: procedurally rendered metal parts with scratches, dents and spots.

Every image comes with its ground-truth boxes, so the same renderer feeds the live pipeline
(FrameRef.truth) and YOLO training (`generate_dataset`). Rendering is deterministic for a seed:
all randomness flows from one ``numpy.random.Generator`` per camera.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from producers.base import CLASS_NAMES, Frame, InvalidSourceError, TruthBox, now_us

log = logging.getLogger(__name__)

__all__ = ["SyntheticSource", "camera_rng", "generate_dataset", "render_part"]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A uniform draw as a Python float (a numpy float64 scalar would upcast float32 images)."""
    return float(rng.uniform(lo, hi))


def camera_rng(seed: int, camera_index: int) -> np.random.Generator:
    """The generator of one synthetic camera: independent streams per (seed, camera)."""
    return np.random.default_rng([seed, camera_index])


# ---- rendering ---------------------------------------------------------------------------------


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A dark conveyor belt: noisy grey with faint transverse ribs."""
    base = _u(rng, 35, 75)
    noise = rng.standard_normal((h, w), dtype=np.float32) * _u(rng, 3, 7)
    noise = cv2.GaussianBlur(noise, (3, 3), 0)
    period = _u(rng, 6, 14) * max(w, h) / 320
    ys = np.arange(h, dtype=np.float32)[:, None]
    ribs = (_u(rng, 2, 6) * np.sin(2 * np.pi * ys / period + _u(rng, 0, 6.28))).astype(np.float32)
    grey = base + noise + ribs
    tint = rng.uniform(0.95, 1.05, 3).astype(np.float32)
    return np.repeat(grey[:, :, None], 3, axis=2) * tint


def _part_mask(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A part silhouette (plate, disc or polygonal bracket) with bolt holes, as a uint8 0/255 mask."""
    s = min(w, h)
    cx = w / 2 + _u(rng, -0.07, 0.07) * w
    cy = h / 2 + _u(rng, -0.07, 0.07) * h
    angle = _u(rng, 0, 180)
    mask = np.zeros((h, w), np.uint8)
    kind = rng.integers(0, 3)
    holes: list[tuple[float, float, float]] = []
    if kind == 0:  # rounded rectangular plate
        pw, ph = _u(rng, 0.5, 0.7) * s, _u(rng, 0.4, 0.6) * s
        r = _u(rng, 0.05, 0.15) * s
        rect = np.zeros((h, w), np.uint8)
        m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
        x0, y0, x1, y1 = cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2
        cv2.rectangle(rect, (int(x0 + r), int(y0)), (int(x1 - r), int(y1)), 255, -1)
        cv2.rectangle(rect, (int(x0), int(y0 + r)), (int(x1), int(y1 - r)), 255, -1)
        for qx, qy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
            cv2.circle(rect, (int(qx), int(qy)), int(r), 255, -1, cv2.LINE_AA)
        mask = cv2.warpAffine(rect, m, (w, h), flags=cv2.INTER_LINEAR)
        if rng.random() < 0.7:
            hr = _u(rng, 0.025, 0.045) * s
            for qx, qy in ((x0 + 1.6 * r + hr, y0 + 1.6 * r + hr), (x1 - 1.6 * r - hr, y1 - 1.6 * r - hr)):
                px, py = m @ np.array([qx, qy, 1.0])
                holes.append((px, py, hr))
    elif kind == 1:  # disc / flange with a centre bore
        r = _u(rng, 0.3, 0.42) * s
        cv2.circle(mask, (int(cx), int(cy)), int(r), 255, -1, cv2.LINE_AA)
        if rng.random() < 0.6:
            holes.append((cx, cy, _u(rng, 0.12, 0.25) * r))
    else:  # polygonal bracket
        n = int(rng.integers(5, 9))
        radii = rng.uniform(0.3, 0.42, n) * s
        step = 2 * np.pi / n  # evenly spread corners with jitter: no slivers
        angs = np.arange(n) * step + rng.uniform(-0.35, 0.35, n) * step + _u(rng, 0, step)
        pts = np.stack([cx + radii * np.cos(angs), cy + radii * np.sin(angs)], 1).astype(np.int32)
        cv2.fillPoly(mask, [cv2.convexHull(pts)], 255, cv2.LINE_AA)
    for hx, hy, hr in holes:
        cv2.circle(mask, (int(hx), int(hy)), int(hr), 0, -1, cv2.LINE_AA)
    return mask


def _metal(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Brushed metal: directional fine grain, low-frequency waviness, a lighting gradient and a glint."""
    base = _u(rng, 120, 185)
    big = int(math.ceil(math.hypot(w, h))) + 2
    grain = rng.standard_normal((big, big), dtype=np.float32)
    k = int(rng.integers(9, 31))
    grain = cv2.blur(grain, (k, 1))
    grain = grain / (grain.std() + 1e-6) * _u(rng, 4, 10)
    m = cv2.getRotationMatrix2D((big / 2, big / 2), _u(rng, 0, 180), 1.0)
    m[:, 2] -= [(big - w) / 2, (big - h) / 2]
    grain = cv2.warpAffine(grain, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    wave = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    theta = _u(rng, 0, 2 * np.pi)
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    along = xs * math.cos(theta) + ys * math.sin(theta)
    gradient = _u(rng, 10, 35) * along
    off, width = _u(rng, -0.6, 0.6), _u(rng, 0.1, 0.35)
    across = -xs * math.sin(theta) + ys * math.cos(theta)
    glint = _u(rng, 10, 35) * np.exp(-(((across - off) / width) ** 2))
    grey = base + grain + _u(rng, 2, 6) * wave + gradient + glint
    tint = rng.uniform(0.97, 1.03, 3).astype(np.float32)
    return np.repeat(grey[:, :, None], 3, axis=2) * tint


def _inside(mask: np.ndarray, x: float, y: float) -> bool:
    h, w = mask.shape
    xi, yi = int(round(x)), int(round(y))
    return 0 <= xi < w and 0 <= yi < h and mask[yi, xi] > 0


def _box_around(x1: float, y1: float, x2: float, y2: float, min_side: float, w: int, h: int) -> tuple[float, float, float, float]:
    """Grow a box to at least ``min_side`` per side around its centre, clipped to the image."""
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    bw, bh = max(x2 - x1, min_side), max(y2 - y1, min_side)
    return (max(0.0, cx - bw / 2), max(0.0, cy - bh / 2), min(float(w), cx + bw / 2), min(float(h), cy + bh / 2))


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over the smaller box: keeps a small defect from hiding inside another's box."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _scratch(rng: np.random.Generator, img: np.ndarray, safe: np.ndarray, s: int) -> tuple[float, float, float, float] | None:
    """A thin bright or dark stroke, straight or gently curved (quadratic Bezier)."""
    h, w = safe.shape
    for _ in range(30):
        x0, y0 = _u(rng, 0, w), _u(rng, 0, h)
        length = _u(rng, 0.12, 0.35) * s
        a = _u(rng, 0, np.pi)
        x2, y2 = x0 + length * math.cos(a), y0 + length * math.sin(a)
        bend = _u(rng, -0.18, 0.18) * length
        cxm, cym = (x0 + x2) / 2 - bend * math.sin(a), (y0 + y2) / 2 + bend * math.cos(a)
        t = np.linspace(0, 1, 40)[:, None]
        pts = (1 - t) ** 2 * np.array([x0, y0]) + 2 * (1 - t) * t * np.array([cxm, cym]) + t**2 * np.array([x2, y2])
        if not all(_inside(safe, px, py) for px, py in pts[::3]):
            continue
        thick = max(1, int(round(_u(rng, 1.0, 2.2) * s / 320)))
        layer = np.zeros(safe.shape, np.float32)
        poly = np.round(pts * 16).astype(np.int32)  # 4 fractional bits for anti-aliasing
        cv2.polylines(layer, [poly], False, 1.0, thick, cv2.LINE_AA, shift=4)
        amp = _u(rng, 55, 95) * (1 if rng.random() < 0.55 else -1)
        img += (amp * layer)[:, :, None]
        if rng.random() < 0.5:  # a faint companion groove, as tool scratches come in bundles
            shift = np.array([-math.sin(a), math.cos(a)]) * _u(rng, 2, 4) * s / 320
            layer2 = np.zeros(safe.shape, np.float32)
            cv2.polylines(layer2, [np.round((pts + shift) * 16).astype(np.int32)], False, 1.0, 1, cv2.LINE_AA, shift=4)
            img += (0.45 * amp * layer2)[:, :, None]
        pad = thick + 2
        return (pts[:, 0].min() - pad, pts[:, 1].min() - pad, pts[:, 0].max() + pad, pts[:, 1].max() + pad)
    return None


def _dent(rng: np.random.Generator, img: np.ndarray, safe: np.ndarray, s: int) -> tuple[float, float, float, float] | None:
    """An elliptical depression: shaded dark on the lit side, bright on the far side, soft rim."""
    h, w = safe.shape
    for _ in range(30):
        cx, cy = _u(rng, 0, w), _u(rng, 0, h)
        a = _u(rng, 0.035, 0.075) * s
        b = a * _u(rng, 0.55, 1.0)
        phi = _u(rng, 0, np.pi)
        hw = math.sqrt((a * math.cos(phi)) ** 2 + (b * math.sin(phi)) ** 2)
        hh = math.sqrt((a * math.sin(phi)) ** 2 + (b * math.cos(phi)) ** 2)
        if not all(_inside(safe, x, y) for x, y in ((cx, cy), (cx - hw, cy), (cx + hw, cy), (cx, cy - hh), (cx, cy + hh))):
            continue
        x0, x1 = max(0, int(cx - hw) - 1), min(w, int(cx + hw) + 2)
        y0, y1 = max(0, int(cy - hh) - 1), min(h, int(cy + hh) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(phi) + dy * math.sin(phi)) / a
        v = (-dx * math.sin(phi) + dy * math.cos(phi)) / b
        r2 = u * u + v * v
        inside = np.clip(1 - r2, 0, 1)
        light = _u(rng, 0, 2 * np.pi)
        lu, lv = math.cos(light - phi), math.sin(light - phi)
        amp = _u(rng, 50, 75)
        shade = amp * (u * lu + v * lv) * inside * 1.6 - amp * 0.35 * inside**2
        img[y0:y1, x0:x1] += shade[:, :, None]
        # the grain is smeared where the metal was pushed in
        patch = img[y0:y1, x0:x1]
        blurred = cv2.GaussianBlur(patch, (5, 5), 0)
        wgt = (inside**0.5)[:, :, None]
        img[y0:y1, x0:x1] = patch * (1 - wgt) + blurred * wgt
        return (cx - hw, cy - hh, cx + hw, cy + hh)
    return None


def _spot(rng: np.random.Generator, img: np.ndarray, safe: np.ndarray, s: int) -> tuple[float, float, float, float] | None:
    """A small dark stain (oil, rust) with a soft, slightly irregular edge and a darker ring."""
    h, w = safe.shape
    for _ in range(30):
        cx, cy = _u(rng, 0, w), _u(rng, 0, h)
        r = _u(rng, 0.014, 0.032) * s
        if not _inside(safe, cx, cy) or not _inside(safe, cx + r, cy) or not _inside(safe, cx - r, cy):
            continue
        x0, x1 = max(0, int(cx - 1.5 * r)), min(w, int(cx + 1.5 * r) + 2)
        y0, y1 = max(0, int(cy - 1.5 * r)), min(h, int(cy + 1.5 * r) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx - cx, yy - cy
        ang = np.arctan2(dy, dx)
        k = rng.uniform(0, 2 * np.pi, 3)
        wobble = 1 + 0.07 * np.sin(2 * ang + k[0]) + 0.04 * np.sin(5 * ang + k[1])
        rr = np.sqrt(dx * dx + dy * dy) / (r * wobble)
        body = 1 / (1 + np.exp((rr - 1) * 8))
        ring = np.exp(-(((rr - 0.9) / 0.15) ** 2)) * _u(rng, 0.1, 0.3)
        strength = np.clip(body * _u(rng, 0.45, 0.7) + ring, 0, 0.9)
        tint = rng.choice(np.array([[0.45, 0.55, 0.75], [0.5, 0.5, 0.52], [0.4, 0.5, 0.65]], np.float32))
        patch = img[y0:y1, x0:x1]
        stained = patch * tint * 0.6
        img[y0:y1, x0:x1] = patch * (1 - strength[:, :, None]) + stained * strength[:, :, None]
        return (cx - r * 1.2, cy - r * 1.2, cx + r * 1.2, cy + r * 1.2)
    return None


_DEFECTS = {"scratch": _scratch, "dent": _dent, "spot": _spot}


def render_part(rng: np.random.Generator, width: int = 320, height: int = 320,
                defective: bool | None = None, defect_rate: float = 0.5) -> tuple[np.ndarray, list[TruthBox]]:
    """Render one part on the belt; returns (BGR uint8 image, truth boxes in pixels).

    ``defective`` forces the choice; otherwise a part is defective with probability ``defect_rate``.
    A defective part carries 1-3 defects, each of a uniformly chosen class.
    """
    if defective is None:
        defective = bool(rng.random() < defect_rate)
    for _ in range(10):
        img, truth = _render(rng, width, height, defective)
        if truth or not defective:
            break
    return img, truth


def _render(rng: np.random.Generator, w: int, h: int, defective: bool) -> tuple[np.ndarray, list[TruthBox]]:
    s = min(w, h)
    mask = _part_mask(rng, w, h)
    img = _background(rng, w, h)
    metal = _metal(rng, w, h)
    rim = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(np.float32) / 255
    alpha = (cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32) / 255)[:, :, None]
    img = img * (1 - alpha) + metal * alpha
    img -= (rim * _u(rng, 15, 35))[:, :, None]
    # shadow of the part on the belt, offset towards the lower right
    shadow = cv2.GaussianBlur(np.roll(mask, (int(0.02 * s), int(0.02 * s)), (0, 1)), (0, 0), 0.02 * s)
    img *= 1 - (0.35 * shadow.astype(np.float32) / 255 * (1 - alpha[:, :, 0]))[:, :, None]

    truth: list[TruthBox] = []
    if defective:
        margin = max(3, int(0.03 * s))
        safe = cv2.erode(mask, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
        n = int(rng.choice([1, 1, 1, 2, 2, 3]))
        boxes: list[tuple[float, float, float, float]] = []
        attempts = 0
        while len(truth) < n and attempts < 4 * n:
            attempts += 1
            name = CLASS_NAMES[int(rng.integers(0, len(CLASS_NAMES)))]
            probe = img.copy()
            box = _DEFECTS[name](rng, probe, safe, s)
            if box is None:
                continue
            box = _box_around(*box, min_side=max(6.0, 0.02 * s), w=w, h=h)
            if any(_overlap(box, b) > 0.1 for b in boxes):
                continue
            img = probe
            boxes.append(box)
            truth.append((name, *(round(float(v), 2) for v in box)))  # type: ignore[arg-type]

    img += rng.standard_normal(img.shape, dtype=np.float32) * _u(rng, 1.5, 4.0)
    img = img * _u(rng, 0.9, 1.1) + _u(rng, -8, 8)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        out = cv2.GaussianBlur(out, (3, 3), 0)
    return out, truth


# ---- the camera ------------------------------------------------------------------------------------


class SyntheticSource:
    """A camera over a conveyor of rendered parts; ``count`` frames (0: endless).

    Scenario options (for demos of the stream processors): ``part_group`` makes cameras that share
    it see the same parts (same part_id per seq); ``rate_after_s``/``rate_after`` switch the defect
    rate after that many seconds; ``lighting_after_s``/``lighting_factor`` scale the image brightness
    (ramped over ``lighting_ramp_s``), like a lamp ageing or failing.
    """

    def __init__(self, camera_id: str, line_id: str, *, camera_index: int = 0, seed: int = 0,
                 size: tuple[int, int] = (320, 320), defect_rate: float = 0.3, count: int = 0,
                 part_group: str | None = None, rate_after_s: float | None = None, rate_after: float | None = None,
                 lighting_after_s: float | None = None, lighting_factor: float = 1.0,
                 lighting_ramp_s: float = 0.0) -> None:
        for name, v in (("--defect-rate", defect_rate), ("the later defect rate", rate_after)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise InvalidSourceError(f"{name} must be within [0, 1], got {v}")
        if size[0] < 32 or size[1] < 32:
            raise InvalidSourceError(f"synthetic image size must be at least 32x32, got {size[0]}x{size[1]}")
        if not 0.05 <= lighting_factor <= 5:
            raise InvalidSourceError(f"lighting factor must be within [0.05, 5], got {lighting_factor}")
        self.camera_id, self.line_id = camera_id, line_id
        self.seed, self.camera_index = seed, camera_index
        self.size, self.defect_rate, self.count = size, defect_rate, count
        self.part_group = part_group
        self.rate_after_s, self.rate_after = rate_after_s, rate_after
        self.lighting_after_s, self.lighting_factor, self.lighting_ramp_s = lighting_after_s, lighting_factor, lighting_ramp_s
        self.reconnects = 0
        self.failed_reads = 0
        self._rng = camera_rng(seed, camera_index)

    def _rate(self, elapsed: float) -> float:
        if self.rate_after_s is not None and self.rate_after is not None and elapsed >= self.rate_after_s:
            return self.rate_after
        return self.defect_rate

    def _light(self, img: np.ndarray, elapsed: float) -> np.ndarray:
        if self.lighting_after_s is None or elapsed < self.lighting_after_s or self.lighting_factor == 1.0:
            return img
        frac = 1.0 if self.lighting_ramp_s <= 0 else min(1.0, (elapsed - self.lighting_after_s) / self.lighting_ramp_s)
        f = 1.0 + (self.lighting_factor - 1.0) * frac
        return np.clip(img.astype(np.float32) * f, 0, 255).astype(np.uint8)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        seq = 0
        t0 = time.monotonic()
        while not stop.is_set() and (self.count <= 0 or seq < self.count):
            elapsed = time.monotonic() - t0
            img, truth = render_part(self._rng, self.size[0], self.size[1], defect_rate=self._rate(elapsed))
            pid = (f"P{self.seed}-{self.part_group}-{seq:08d}" if self.part_group
                   else f"P{self.seed}-{self.camera_id}-{seq:08d}")
            yield Frame(self.camera_id, self.line_id, seq, now_us(), self._light(img, elapsed), truth, part_id=pid)
            seq += 1

    def close(self) -> None:
        pass


# ---- training data ----------------------------------------------------------------------------------


def generate_dataset(out_dir: str | Path, n_images: int, seed: int = 0, size: int | tuple[int, int] = 320, *,
                     defect_rate: float = 0.85, splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
                     jpeg_quality: int = 95) -> Path:
    """Write a YOLO dataset of rendered parts; returns the path of its data.yaml.

    Layout: images/{train,val,test}/*.jpg, labels/{train,val,test}/*.txt (``cls cx cy w h``,
    normalized; defect-free parts get an empty label file), classes scratch=0, dent=1, spot=2.
    """
    import yaml

    if n_images < 1:
        raise InvalidSourceError("n_images must be >= 1")
    w, h = (size, size) if isinstance(size, int) else size
    out = Path(out_dir).resolve()
    rng = np.random.default_rng([seed, 1_000_003])
    n_val = max(1, round(n_images * splits[1])) if n_images >= 3 else 0
    n_test = max(1, round(n_images * splits[2])) if n_images >= 3 else 0
    n_train = n_images - n_val - n_test
    plan = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    counts = {c: 0 for c in CLASS_NAMES}
    for split in ("train", "val", "test"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(plan):
        img, truth = render_part(rng, w, h, defect_rate=defect_rate)
        name = f"syn_{seed}_{i:06d}"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {name}")
        (out / "images" / split / f"{name}.jpg").write_bytes(buf.tobytes())
        lines = []
        for cls, x1, y1, x2, y2 in truth:
            counts[cls] += 1
            lines.append(f"{CLASS_NAMES.index(cls)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                         f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        (out / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "nc": len(CLASS_NAMES),
        "names": dict(enumerate(CLASS_NAMES)),
    }
    yaml_path = out / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    log.info("synthetic dataset written", extra={"dir": str(out), "images": n_images, "seed": seed,
                                                   "train": n_train, "val": n_val, "test": n_test, **counts})
    return yaml_path
