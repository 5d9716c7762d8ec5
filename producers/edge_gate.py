"""The edge gate: a cheap check that calls a frame *good* or *suspect* before it leaves the cell.

Every suspect frame is forwarded; of the good ones only a configured sample, chosen by a hash of the
frame id (so a resend makes the same choice). The decision travels with the frame (the ``gate``
header field; the bridge puts it on the FrameRef as the Kafka header ``sqis-edge-gate``), so the line
can measure the gate's miss rate against the full model on the sampled good frames
(:func:`miss_rate`).

``StatsGate`` scores the fraction of pixels that differ from their 15x15 median by more than 30 grey
levels (a scratch, dent or spot is a small local deviation; the part's smooth metal and the belt are
not); above ``threshold`` the frame is suspect. On the synthetic line it calls about a quarter of the
good parts good while keeping ~95% of the defective ones suspect: cheap, and honest about its misses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

GOOD, SUSPECT = "good", "suspect"


@dataclass(frozen=True)
class GateDecision:
    decision: str  # good | suspect
    score: float
    sampled: bool  # a good frame forwarded as part of the sample

    @property
    def forward(self) -> bool:
        return self.decision == SUSPECT or self.sampled

    def as_header(self) -> dict[str, Any]:
        return {"decision": self.decision, "score": round(self.score, 6), "sampled": self.sampled}


def _sampled(frame_id: str, rate: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(frame_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < rate


@dataclass(frozen=True)
class StatsGate:
    threshold: float = 0.0004
    sample_rate: float = 0.1  # of the frames called good, this share is forwarded anyway
    kernel: int = 15
    level: int = 30

    def score(self, image: np.ndarray) -> float:
        g = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        residual = cv2.absdiff(g, cv2.medianBlur(g, self.kernel))
        return float((residual > self.level).mean())

    def decide(self, image: np.ndarray, frame_id: str) -> GateDecision:
        s = self.score(image)
        if s > self.threshold:
            return GateDecision(SUSPECT, s, False)
        return GateDecision(GOOD, s, _sampled(frame_id, self.sample_rate))


def miss_rate(gate_by_frame: Mapping[str, Mapping[str, Any]], defective_by_frame: Mapping[str, bool]) -> dict[str, Any]:
    """The gate's misses on the frames it called good and forwarded as the sample, judged by the full
    model: ``misses / sampled_good``; also how many suspect frames the model found clean."""
    good = [f for f, g in gate_by_frame.items() if g.get("decision") == GOOD and f in defective_by_frame]
    suspect = [f for f, g in gate_by_frame.items() if g.get("decision") == SUSPECT and f in defective_by_frame]
    misses = sum(defective_by_frame[f] for f in good)
    clean_suspects = sum(not defective_by_frame[f] for f in suspect)
    return {"sampled_good": len(good), "misses": misses,
            "miss_rate": round(misses / len(good), 4) if good else None,
            "suspect": len(suspect), "suspect_clean": clean_suspects}


def parse_gate_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, Any] | None:
    import json

    for k, v in headers or ():
        if k == "sqis-edge-gate" and v:
            try:
                out = json.loads(v)
            except ValueError:
                return None
            return out if isinstance(out, dict) else None
    return None
