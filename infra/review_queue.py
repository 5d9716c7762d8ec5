"""The review queue (active learning, issue #21 section 2): which marked frames a person reviews.

The worker marks frames (inference_workers/review.py) and the shadow processor finds champion/challenger
disagreements; the :class:`Sampler` decides which of them are queued in table ``review_queue``
(infra/migrations/008_review_queue.sql), per line: a sample rate, then a per-hour cap. Both are
durable and replay-safe:

- the rate is a hash of the frame id (the same frame is always in or out, whichever process or replay
  sees it), not a random draw;
- the cap counts the rows already queued for the line in the current UTC hour, in PostgreSQL, under a
  transaction-scoped advisory lock per line, so a restarted sink, a second sink or the shadow processor
  share one budget;
- with ``spread`` (the default) the hour's budget is released evenly (cap 20: one slot per 3 minutes,
  unused slots kept for later in the hour), so a busy line does not spend it all in the hour's first
  minutes and the queue samples the whole hour (lighting, shift changes), not its start.

A frame already queued is never counted twice: its reasons are merged instead. Operators' own picks
(``source='operator'``) bypass rate and cap. Lives in infra: the sink, the stream processors and the
dashboard all use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.metrics import REVIEW_DROPPED, REVIEW_QUEUED

log = logging.getLogger(__name__)

REVIEW_HEADER = "sqis-review"  # Kafka header on an Inspection: comma-separated reasons
REVIEW_DETAIL_HEADER = "sqis-review-detail"  # JSON: {"score", "margin", "candidates": [box, ...]}
REASONS = ("uncertain", "seg_disagree", "challenger_disagree", "operator")
MAX_DETAIL_BYTES = 4096  # the detail header is bounded (top-k candidates, rounded): never a large header

_INSERT = (
    "INSERT INTO review_queue (frame_id, line_id, camera_id, reasons, score, margin, candidates, source,"
    " queued_by, model_version) VALUES (%(frame_id)s, %(line_id)s, %(camera_id)s, %(reasons)s, %(score)s,"
    " %(margin)s, %(candidates)s, %(source)s, %(queued_by)s, %(model_version)s) ON CONFLICT (frame_id) DO NOTHING")
_MERGE = (
    "UPDATE review_queue SET reasons = ARRAY(SELECT DISTINCT unnest(reasons || %(reasons)s::text[]) ORDER BY 1),"
    " candidates = CASE WHEN candidates = '[]'::jsonb THEN %(candidates)s ELSE candidates END"
    " WHERE frame_id = %(frame_id)s")
_HOUR_START = "date_bin('1 hour', now(), TIMESTAMPTZ '2000-01-01 00:00:00+00')"
_THIS_HOUR = (
    f"SELECT count(*), extract(epoch FROM now() - {_HOUR_START}) FROM review_queue WHERE line_id = %s"
    f" AND source = 'auto' AND queued_at >= {_HOUR_START}")


def hour_allowance(cap: int, seconds_into_hour: float, spread: bool = True) -> int:
    """How many automatic rows a line may have this hour by now: the cap, or with ``spread`` the share of
    it released so far (one slot at the hour's start, then one every 3600/cap seconds)."""
    if not spread or cap <= 0:
        return max(0, cap)
    return min(cap, int(cap * max(0.0, seconds_into_hour) / 3600) + 1)


@dataclass(frozen=True)
class ReviewItem:
    """A frame proposed for review, with why and what a reviewer needs (candidate boxes for a PASS frame)."""

    frame_id: str
    line_id: str
    reasons: tuple[str, ...]
    camera_id: str | None = None
    score: float | None = None
    margin: float | None = None
    candidates: Sequence[Mapping[str, Any]] = ()
    model_version: str | None = None
    source: str = "auto"
    queued_by: str = ""

    def params(self) -> dict[str, Any]:
        return {"frame_id": uuid.UUID(str(self.frame_id)), "line_id": self.line_id, "camera_id": self.camera_id,
                "reasons": list(self.reasons), "score": self.score, "margin": self.margin,
                "candidates": json.dumps(list(self.candidates), allow_nan=False), "source": self.source,
                "queued_by": self.queued_by, "model_version": self.model_version}


def encode_headers(reasons: Sequence[str], score: float | None, margin: float | None,
                   candidates: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """The Kafka headers that carry a frame's marks (the Avro contract is not touched): the reasons, and a
    bounded JSON detail (candidates dropped from the end until it fits MAX_DETAIL_BYTES)."""
    if not reasons:
        return []
    cands = list(candidates)
    while True:
        detail = json.dumps({"score": score, "margin": margin, "candidates": cands}, separators=(",", ":"))
        if len(detail) <= MAX_DETAIL_BYTES or not cands:
            break
        cands.pop()
    return [(REVIEW_HEADER, ",".join(reasons).encode()), (REVIEW_DETAIL_HEADER, detail.encode())]


def decode_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(reasons, detail) from an Inspection's headers; ((), {}) when unmarked. A malformed detail is
    ignored (the marks still count): a header never makes a record undecodable."""
    reasons: tuple[str, ...] = ()
    detail: dict[str, Any] = {}
    for k, v in headers or ():
        if k == REVIEW_HEADER and v:
            reasons = tuple(r for r in v.decode(errors="replace").split(",") if r in REASONS)
        elif k == REVIEW_DETAIL_HEADER and v:
            try:
                d = json.loads(v)
                detail = d if isinstance(d, dict) else {}
            except (ValueError, RecursionError):  # malformed, or nested deep enough to exhaust the stack
                detail = {}
    return reasons, detail


def _candidate(c: Any) -> dict[str, Any] | None:
    """A candidate box from a header, typed (class_id int, coordinates and score numbers), or None: a header
    is input like any other and must not put a string where the export expects a coordinate."""
    if not isinstance(c, dict):
        return None
    try:
        out = {k: float(c[k]) for k in ("score", "x1", "y1", "x2", "y2")}
        if not all(math.isfinite(x) for x in out.values()):  # NaN/inf: jsonb refuses them (the row would fail)
            return None
        return {"class_id": int(c["class_id"]), "class_name": str(c.get("class_name", c["class_id"]))[:100]} | out
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def item_from_record(rec: Mapping[str, Any], headers: Iterable[tuple[str, bytes | None]] | None) -> ReviewItem | None:
    """The review item of a marked Inspection (its headers), or None. Never raises on a hostile header: the
    marks are advisory, the inspection row must not depend on them."""
    try:
        return _item_from_record(rec, headers)
    except Exception as exc:
        log.warning("review headers ignored", extra={"frame_id": str(rec.get("frame_id")), "error": repr(exc)[:200]})
        return None


def _item_from_record(rec: Mapping[str, Any], headers: Iterable[tuple[str, bytes | None]] | None) -> ReviewItem | None:
    reasons, detail = decode_headers(headers)
    if not reasons:
        return None
    cands = detail.get("candidates")
    score, margin = detail.get("score"), detail.get("margin")
    return ReviewItem(str(rec["frame_id"]), str(rec["line_id"]), reasons, camera_id=str(rec["camera_id"]),
                      score=_finite(score), margin=_finite(margin),
                      candidates=[c for c in map(_candidate, cands[:20]) if c is not None] if isinstance(cands, list) else [],
                      model_version=str(rec.get("model_version") or "") or None)


def in_sample(frame_id: str, rate: float) -> bool:
    """Deterministic: the frame is in the sample when a hash of its id falls below ``rate``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(str(frame_id).encode(), digest_size=8).digest(), "big")
    return h / 2**64 < rate


@dataclass
class SampleResult:
    queued: int = 0
    merged: int = 0  # already queued: reasons merged
    dropped_rate: int = 0
    dropped_cap: int = 0
    counts: list[tuple[str, str, str]] = field(default_factory=list)  # (line, reason, 'queued'|'rate'|'cap')

    def count_metrics(self) -> None:
        """Add to the Prometheus counters (once the transaction that queued committed)."""
        for line, reason, what in self.counts:
            if what == "queued":
                REVIEW_QUEUED.labels(line, reason, "auto").inc()
            else:
                REVIEW_DROPPED.labels(line, reason, what).inc()
        self.counts = []


@dataclass
class Sampler:
    """Per-line sample rate and per-hour cap (module docstring)."""

    rate: float = 1.0
    per_hour: int = 20
    line_rate: Mapping[str, float] = field(default_factory=dict)
    line_per_hour: Mapping[str, int] = field(default_factory=dict)
    queued_by: str = ""
    spread: bool = True

    @classmethod
    def from_settings(cls, settings: Any, queued_by: str = "") -> Sampler:
        return cls(settings.review_rate, settings.review_per_hour, dict(settings.review_line_rate),
                   dict(settings.review_line_per_hour), queued_by, settings.review_spread)

    def rate_for(self, line: str) -> float:
        return float(self.line_rate.get(line, self.rate))

    def cap_for(self, line: str) -> int:
        return int(self.line_per_hour.get(line, self.per_hour))

    def offer(self, conn: Any, items: Iterable[ReviewItem], *, defer_metrics: bool = False) -> SampleResult:
        """Queue what the rate and the caps let through, in one transaction (nested in the caller's open
        one: the sink queues in the transaction that writes the inspections, and then counts the metrics
        itself after its commit, ``defer_metrics``)."""
        res = SampleResult()
        by_line: dict[str, list[ReviewItem]] = {}
        for it in items:
            by_line.setdefault(it.line_id, []).append(it)
        if not by_line:
            return res
        with conn.transaction(), conn.cursor() as cur:
            for line in sorted(by_line):  # one lock order: two writers never deadlock
                self._offer_line(cur, line, by_line[line], res)
        if not defer_metrics:
            res.count_metrics()
        return res

    def _offer_line(self, cur: Any, line: str, items: list[ReviewItem], res: SampleResult) -> None:
        rate, cap = self.rate_for(line), self.cap_for(line)
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended('sqis.review_queue:' || %s, 0))", (line,))
        cur.execute(_THIS_HOUR, (line,))
        used_, secs = cur.fetchone()
        used, cap = int(used_), hour_allowance(cap, float(secs), self.spread)
        for it in items:
            p = it.params()
            cur.execute(_MERGE, p)
            if cur.rowcount:
                res.merged += 1
                continue
            if not in_sample(it.frame_id, rate):
                res.dropped_rate += 1
                res.counts += [(line, r, "rate") for r in it.reasons]
                continue
            if used >= cap:
                res.dropped_cap += 1
                res.counts += [(line, r, "cap") for r in it.reasons]
                continue
            p["queued_by"] = it.queued_by or self.queued_by
            cur.execute(_INSERT, p)
            if cur.rowcount:
                used += 1
                res.queued += 1
                res.counts += [(line, r, "queued") for r in it.reasons]
        if res.dropped_cap:
            log.debug("review cap reached", extra={"line_id": line, "cap": cap, "dropped": res.dropped_cap})


def queue_by_operator(conn: Any, frame_id: str | uuid.UUID, who: str, comment: str = "") -> bool:
    """An operator's own pick: queued whatever the rate and cap (merged into an automatic row if one
    exists). False when no such inspection."""
    fid = uuid.UUID(str(frame_id))
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT line_id, camera_id, model_version FROM inspections WHERE frame_id = %s", (fid,))
        row = cur.fetchone()
        if row is None:
            return False
        it = ReviewItem(str(fid), row[0], ("operator",), camera_id=row[1], model_version=row[2], source="operator",
                        queued_by=who[:200])
        p = it.params()
        cur.execute(_MERGE, p)
        if not cur.rowcount:
            cur.execute(_INSERT, p)
    REVIEW_QUEUED.labels(row[0], "operator", "operator").inc()
    log.info("frame queued for review by an operator", extra={"frame_id": str(fid), "who": who,
                                                               "comment": comment[:200]})
    return True
