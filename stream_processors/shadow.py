"""Champion against challenger: per-line agreement of the production Inspection and the shadow one of the
same frame (``inspections`` x ``inspections.shadow``, joined on frame_id).

Per pair: verdict agreement, the IoU of boxes matched greedily within a class (IoU >= ``MATCH_IOU``), and
per-class counts of both. Summed per (event-time window, line, champion version, challenger version) into
PostgreSQL table ``shadow_agreement`` (infra/migrations/007_shadow.sql). Pure functions plus a small join
with a bounded buffer; :class:`ShadowAgreement` consumes both topics (used by ``sqis model canary`` and
``sqis model shadow``).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from infra.review_queue import ReviewItem, Sampler

log = logging.getLogger(__name__)

MATCH_IOU = 0.5  # two boxes of one class with at least this IoU are the same defect
MAX_PENDING = 50_000  # frames waiting for their other half; the oldest are forgotten first
US = 1_000_000


def _boxes(dets: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], np.float64).reshape(-1, 4)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (N,4) and b (M,4), xyxy."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(champ: Sequence[Mapping[str, Any]], chall: Sequence[Mapping[str, Any]],
                min_iou: float = MATCH_IOU) -> list[float]:
    """IoUs of the box pairs matched greedily (highest IoU first, same class only, each box once)."""
    out: list[float] = []
    for cls in {str(d["class_name"]) for d in champ} & {str(d["class_name"]) for d in chall}:
        a = [d for d in champ if str(d["class_name"]) == cls]
        b = [d for d in chall if str(d["class_name"]) == cls]
        m = iou_matrix(_boxes(a), _boxes(b))
        while m.size and m.max() >= min_iou:
            i, j = np.unravel_index(int(m.argmax()), m.shape)
            out.append(float(m[i, j]))
            m[i, :] = -1
            m[:, j] = -1
    return out


@dataclass
class Agreement:
    """Sums over the pairs of one (window, line, champion, challenger)."""

    frames: int = 0
    verdict_agree: int = 0
    champion_fail: int = 0
    challenger_fail: int = 0
    iou_sum: float = 0.0
    matched: int = 0
    champion_boxes: int = 0
    challenger_boxes: int = 0
    champion_classes: dict[str, int] = field(default_factory=dict)
    challenger_classes: dict[str, int] = field(default_factory=dict)

    def add(self, champ: Mapping[str, Any], chall: Mapping[str, Any]) -> None:
        cd, sd = list(champ.get("detections") or ()), list(chall.get("detections") or ())
        self.frames += 1
        self.verdict_agree += champ["verdict"] == chall["verdict"]
        self.champion_fail += champ["verdict"] == "FAIL"
        self.challenger_fail += chall["verdict"] == "FAIL"
        ious = match_boxes(cd, sd)
        self.iou_sum += sum(ious)
        self.matched += len(ious)
        self.champion_boxes += len(cd)
        self.challenger_boxes += len(sd)
        for dets, counts in ((cd, self.champion_classes), (sd, self.challenger_classes)):
            for d in dets:
                counts[str(d["class_name"])] = counts.get(str(d["class_name"]), 0) + 1

    def merge(self, other: Agreement) -> None:
        for f in ("frames", "verdict_agree", "champion_fail", "challenger_fail", "iou_sum", "matched",
                  "champion_boxes", "challenger_boxes"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for mine, theirs in ((self.champion_classes, other.champion_classes),
                             (self.challenger_classes, other.challenger_classes)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    @property
    def verdict_rate(self) -> float | None:
        """Share of frames with the same verdict (None before any pair)."""
        return self.verdict_agree / self.frames if self.frames else None

    @property
    def box_recall(self) -> float | None:
        """Matched boxes over the boxes either model found (1.0 when neither found any)."""
        total = max(self.champion_boxes, self.challenger_boxes)
        return self.matched / total if total else (1.0 if self.frames else None)

    @property
    def iou_mean(self) -> float | None:
        return self.iou_sum / self.matched if self.matched else None

    def evidence(self) -> dict[str, Any]:
        return {"frames": self.frames, "verdict_agreement": self.verdict_rate, "iou_mean": self.iou_mean,
                "box_recall": self.box_recall, "champion_fail": self.champion_fail,
                "challenger_fail": self.challenger_fail, "champion_classes": self.champion_classes,
                "challenger_classes": self.challenger_classes}


AggKey = tuple[int, str, str, str, str]  # (window start us, line, model name, champion version, challenger version)


class ShadowJoin:
    """Pairs production and shadow Inspections of the same frame; bounded (oldest unpaired forgotten)."""

    def __init__(self, window_s: float = 60.0, max_pending: int = MAX_PENDING) -> None:
        self.window_us = int(window_s * US)
        self.max_pending = max_pending
        self._champ: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._chall: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._paired: OrderedDict[str, None] = OrderedDict()  # frame ids already counted (shadow redone)
        self.windows: dict[AggKey, Agreement] = {}
        self.dirty: set[AggKey] = set()
        self.forgotten = 0
        # pairs whose verdicts differ, not yet offered to the review queue (bounded like the pending halves)
        self.disagreements: OrderedDict[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = OrderedDict()

    def _key(self, champ: Mapping[str, Any], chall: Mapping[str, Any]) -> AggKey:
        start = int(champ["captured_at"]) // self.window_us * self.window_us
        return (start, str(champ["line_id"]), str(champ["model_name"]), str(champ["model_version"]),
                str(chall["model_version"]))

    def _remember(self, d: OrderedDict[str, Any], k: str, v: Any) -> None:
        d[k] = v
        while len(d) > self.max_pending:
            d.popitem(last=False)
            self.forgotten += 1

    def add_production(self, rec: Mapping[str, Any]) -> AggKey | None:
        return self._add(rec, self._champ, self._chall, champion=True)

    def add_shadow(self, rec: Mapping[str, Any]) -> AggKey | None:
        return self._add(rec, self._chall, self._champ, champion=False)

    def _add(self, rec: Mapping[str, Any], mine: OrderedDict[str, Any], other: OrderedDict[str, Any],
             *, champion: bool) -> AggKey | None:
        fid = str(rec["frame_id"])
        if fid in self._paired:
            return None
        peer = other.pop(fid, None)
        if peer is None:
            self._remember(mine, fid, rec)
            return None
        champ, chall = (rec, peer) if champion else (peer, rec)
        if champ["model_version"] == chall["model_version"] and champ["model_name"] == chall["model_name"]:
            return None  # a frame the challenger served itself (canary line): nothing to compare
        key = self._key(champ, chall)
        self.windows.setdefault(key, Agreement()).add(champ, chall)
        self.dirty.add(key)
        self._remember(self._paired, fid, None)
        if champ["verdict"] != chall["verdict"]:
            self.disagreements[fid] = (champ, chall)
            while len(self.disagreements) > self.max_pending:
                self.disagreements.popitem(last=False)
        return key

    def total(self, *, line: str | None = None, challenger_version: str | None = None,
              since_us: int = 0) -> Agreement:
        out = Agreement()
        for (start, ln, _n, _cv, sv), a in self.windows.items():
            if (line is None or ln == line) and (challenger_version is None or sv == challenger_version) \
                    and start + self.window_us > since_us:
                out.merge(a)
        return out


UPSERT = """
INSERT INTO shadow_agreement (window_start, window_end, line_id, model_name, champion_version,
    challenger_version, frames, verdict_agree, champion_fail, challenger_fail, matched_boxes, iou_sum,
    champion_boxes, challenger_boxes, champion_classes, challenger_classes, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (window_start, line_id, model_name, champion_version, challenger_version) DO UPDATE SET
    frames = EXCLUDED.frames, verdict_agree = EXCLUDED.verdict_agree, champion_fail = EXCLUDED.champion_fail,
    challenger_fail = EXCLUDED.challenger_fail, matched_boxes = EXCLUDED.matched_boxes,
    iou_sum = EXCLUDED.iou_sum, champion_boxes = EXCLUDED.champion_boxes,
    challenger_boxes = EXCLUDED.challenger_boxes, champion_classes = EXCLUDED.champion_classes,
    challenger_classes = EXCLUDED.challenger_classes, updated_at = now()
"""


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / US, UTC)


def agreement_rows(join: ShadowJoin, keys: Iterable[AggKey]) -> list[tuple[Any, ...]]:
    rows = []
    for k in sorted(keys):
        a = join.windows[k]
        start, line, name, cv, sv = k
        rows.append((_ts(start), _ts(start + join.window_us), line, name, cv, sv, a.frames, a.verdict_agree,
                     a.champion_fail, a.challenger_fail, a.matched, a.iou_sum, a.champion_boxes,
                     a.challenger_boxes, json.dumps(a.champion_classes, sort_keys=True),
                     json.dumps(a.challenger_classes, sort_keys=True)))
    return rows


def disagreement_item(champ: Mapping[str, Any], chall: Mapping[str, Any]) -> ReviewItem:
    """A champion/challenger verdict disagreement as a review candidate: the challenger's boxes are the
    candidates when it failed a frame the champion passed (a possible miss), else none (the champion's
    own boxes are in the record)."""
    top = max((float(d["score"]) for d in champ["detections"]), default=None)
    cands = [{"class_id": int(d["class_id"]), "class_name": str(d["class_name"]), "score": round(float(d["score"]), 4),
              "x1": float(d["x1"]), "y1": float(d["y1"]), "x2": float(d["x2"]), "y2": float(d["y2"])}
             for d in chall["detections"]] if champ["verdict"] != "FAIL" else []
    return ReviewItem(str(champ["frame_id"]), str(champ["line_id"]), ("challenger_disagree",),
                      camera_id=str(champ["camera_id"]), score=top, candidates=cands[:20],
                      model_version=str(champ["model_version"]))


def write_agreement(conn: Any, join: ShadowJoin, sampler: Sampler | None = None) -> int:
    """Upsert the windows changed since the last write (absolute sums: a rewrite is idempotent); with a
    ``sampler``, offer the verdict disagreements to the review queue (idempotent on frame_id too)."""
    keys, join.dirty = join.dirty, set()
    rows = agreement_rows(join, keys)
    if rows:
        with conn.cursor() as cur:
            cur.executemany(UPSERT, rows)
        if not getattr(conn, "autocommit", False):
            conn.commit()
    if sampler is not None and join.disagreements:
        pending = join.disagreements
        try:
            sampler.offer(conn, [disagreement_item(c, s) for c, s in pending.values()])
            if not getattr(conn, "autocommit", False):
                conn.commit()
        except Exception:
            if not getattr(conn, "autocommit", False):
                conn.rollback()
            raise  # kept: offered again at the next write (queueing is idempotent on frame_id)
        join.disagreements = OrderedDict()  # the join is fed on this same thread: nothing arrived meanwhile
    return len(rows)


def open_from(settings: Any, since_ms: int) -> tuple[Any, str, str]:
    """A consumer assigned to ``inspections`` and ``inspections.shadow`` from ``since_ms`` (no group
    commits: the agreement is rebuilt from the topics on every start, and its upserts are absolute)."""
    import uuid

    from infra import kafka
    from schemas.catalog import TopicCatalog

    cat = TopicCatalog(settings.topic_prefix)
    c = kafka.consumer(settings, group_id=f"stream-shadow-{uuid.uuid4().hex[:8]}", client_id="shadow-agreement",
                       **{"enable.auto.commit": False, "fetch.wait.max.ms": 50})
    admin = kafka.admin_client(settings)
    tps = []
    for t in (cat.inspections, cat.inspections_shadow):
        md = admin.list_topics(t, timeout=10).topics[t]
        tps += [kafka.TopicPartition(t, p, since_ms) for p in md.partitions]
    c.assign(c.offsets_for_times(tps, timeout=10))
    return c, cat.inspections, cat.inspections_shadow


def records(consumer: Any, timeout: float = 0.2) -> list[tuple[str, dict[str, Any]]]:
    """(topic, Inspection) of what the consumer has now; undecodable records are skipped (logged)."""
    from schemas.serde import deserialize

    out = []
    for m in consumer.consume(num_messages=500, timeout=timeout):
        if m.error() is not None:
            continue
        try:
            out.append((m.topic(), deserialize("inspection", m.value(), m.headers())))
        except Exception as exc:
            log.warning("undecodable inspection skipped", extra={"source": f"{m.topic()}[{m.partition()}]@{m.offset()}",
                                                                  "error": str(exc)})
    return out


def run_agreement(settings: Any, dsn: str, *, since_s: float = 3600.0, window_s: float = 60.0,
                  flush_s: float = 2.0, stop: Any = None) -> ShadowJoin:
    """The shadow agreement processor (``sqis model shadow``): join both topics from ``since_s`` ago and
    upsert the changed windows every ``flush_s`` until ``stop`` is set."""
    import threading
    import time

    from infra.db import connect

    stop = stop or threading.Event()
    sampler = Sampler.from_settings(settings, queued_by="shadow-agreement")
    join = ShadowJoin(window_s)
    c, insp, _shadow = open_from(settings, int((time.time() - since_s) * 1000))
    try:
        with connect(dsn, autocommit=True) as conn:
            next_flush = time.monotonic() + flush_s
            while not stop.is_set():
                for topic, rec in records(c):
                    if topic == insp:
                        join.add_production(rec)
                    else:
                        join.add_shadow(rec)
                if time.monotonic() >= next_flush:
                    write_agreement(conn, join, sampler)
                    next_flush = time.monotonic() + flush_s
            write_agreement(conn, join, sampler)
    finally:
        c.close()
    return join
