"""Inspection frames for the browser: the image from the configured object store (nothing else), with
the defects' boxes and masks drawn over it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import cv2
import numpy as np

from infra.objectstore import FileStore, ObjectNotFound, S3Store

log = logging.getLogger(__name__)

# BGR colours per class index (cycled); a colour-blind-safe palette (Okabe-Ito).
PALETTE = [(0, 159, 230), (233, 180, 86), (115, 158, 0), (66, 228, 240), (178, 114, 0), (0, 94, 213),
           (167, 121, 204)]


class FrameRefused(ObjectNotFound):
    """The URI is not an object of the configured store (refused, never read)."""


def in_store(store: FileStore | S3Store, uri: str) -> bool:
    """True when ``uri`` names an object under the configured store's root/prefix."""
    if isinstance(store, FileStore):
        if not uri.startswith("file://"):
            return False
        from pathlib import Path

        p = Path(unquote(urlparse(uri).path)).resolve()
        return p.is_relative_to(store.root) and p != store.root
    u = urlparse(uri)
    key = u.path.lstrip("/")
    return (u.scheme == "s3" and u.netloc == store.bucket and key.startswith(store.prefix)
            and ".." not in key.split("/") and len(key) > len(store.prefix))


def load(store: FileStore | S3Store, uri: str) -> bytes:
    """The bytes of an object of the configured store; FrameRefused for any other URI."""
    if not in_store(store, uri):
        log.warning("frame refused: outside the object store", extra={"uri": uri[:200], "store": store.url})
        raise FrameRefused(f"{uri[:200]} is not in the object store")
    return store.get(uri)


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO uncompressed RLE ({height, width, counts: [ints]}) -> HxW bool mask (pycocotools)."""
    from pycocotools import mask as mask_utils

    h, w = int(rle["height"]), int(rle["width"])
    compressed = mask_utils.frPyObjects({"size": [h, w], "counts": list(rle["counts"])}, h, w)
    return mask_utils.decode(compressed).astype(bool)


def overlay(image: bytes, defects: Sequence[dict[str, Any]], max_side: int | None = None) -> bytes:
    """JPEG of the frame with each defect's mask (translucent) and box with its class and score."""
    img = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("the frame is not a decodable image")
    h, w = img.shape[:2]
    thick = max(1, round(max(h, w) / 320))
    for d in defects:
        color = PALETTE[int(d.get("class_id") or 0) % len(PALETTE)]
        rle = d.get("mask_rle")
        if rle:
            try:
                m = decode_rle(rle)
                if m.shape == (h, w):
                    img[m] = (0.55 * img[m] + 0.45 * np.array(color)).astype(np.uint8)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("mask not drawn", extra={"error": str(exc)})
        x1, y1, x2, y2 = (round(float(d[k])) for k in ("x1", "y1", "x2", "y2"))
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
        label = f"{d.get('class_name', '?')} {float(d.get('score') or 0):.2f}"
        scale = 0.4 * thick
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 3 if y1 - th - 4 >= 0 else min(h - 1, y2 + th + 3)
        cv2.rectangle(img, (x1, ty - th - 2), (x1 + tw + 2, ty + 2), color, -1)
        cv2.putText(img, label, (x1 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:  # pragma: no cover
        raise ValueError("cannot encode the overlay")
    return buf.tobytes()
