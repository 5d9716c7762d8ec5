"""The canary controller (``sqis model canary``): route chosen lines (or a share of cameras) to the
challenger, watch it, roll it back or promote it.

    start:  route tag ``sqis.canary`` on the registered model (state canary, lines, share, version)
            -> workers following NAME@challenger serve those frames with it (inference_workers/challenger.py)
    watch:  ``inspections`` (read_committed) + ``inspections.shadow`` from the start time:
            the challenger's verdicts on the canary lines, production's everywhere else, shadow pairs
    judge:  every ``poll_s`` (:func:`judge`, pure):
            rollback  when the challenger's FAIL rate leaves production's p-chart limits
                      (p̄ from production's verdicts meanwhile, ``sigma``·σ for the challenger's n),
                      or its p95 latency (timings.total_ms) exceeds the budget,
                      or shadow verdict agreement drops below ``min_agreement``;
            promote   after ``clean_s`` without a rollback, with at least ``min_frames`` canary verdicts
                      (and ``min_pairs`` shadow pairs when asked for)
    act:    rollback: route state rolled_back, challenger alias removed; promote: production alias moved to
            the challenger, challenger alias removed. Every switch (start included) is an alert on ``alerts``,
            MLflow tags on the version (``sqis.canary.*`` with the evidence), and a ``model_switches`` row.

Agreement windows go to ``shadow_agreement`` as they change (stream_processors/shadow.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_processors.alerts import Alert, alert_id
from stream_processors.shadow import Agreement, ShadowJoin, open_from, records, write_agreement
from stream_processors.spc import limits

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger(__name__)

ROUTE_TAG = "sqis.canary"  # the same tag inference_workers/challenger.py reads
US = 1_000_000


@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary is rolled back or promoted."""

    sigma: float = 3.0  # width of production's p-chart limits the challenger's FAIL rate must stay in
    min_frames: int = 30  # challenger verdicts before the FAIL-rate and latency rules judge
    latency_budget_ms: float = 500.0  # p95 of the challenger's timings.total_ms
    min_agreement: float = 0.9  # shadow verdict agreement
    min_pairs: int = 30  # shadow pairs before the agreement rule judges
    clean_s: float = 3600.0  # clean period before promotion
    require_shadow: bool = False  # promotion also needs min_pairs shadow pairs
    latency_window: int = 1000  # the latest verdicts the p95 is taken over


@dataclass
class CanaryState:
    """What the controller saw since the canary started."""

    started_at: float
    production_n: int = 0
    production_fail: int = 0
    canary_n: int = 0
    canary_fail: int = 0
    outside_lines: int = 0  # challenger verdicts outside the route's lines (must stay 0 with a lines route)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    shadow: Agreement = field(default_factory=Agreement)
    by_line: dict[str, list[int]] = field(default_factory=dict)  # canary line -> [n, fail]

    def evidence(self) -> dict[str, Any]:
        p95 = float(np.percentile(list(self.latencies), 95)) if self.latencies else None
        return {"production": {"frames": self.production_n, "fail": self.production_fail},
                "canary": {"frames": self.canary_n, "fail": self.canary_fail, "p95_total_ms": p95,
                           "by_line": self.by_line, "outside_lines": self.outside_lines},
                "shadow": self.shadow.evidence(), "elapsed_s": round(time.time() - self.started_at, 3)}


@dataclass(frozen=True)
class Verdict:
    action: str  # rollback | promote
    rule: str  # fail_rate | latency | agreement | clean_period
    message: str
    value: float | None = None
    center: float | None = None
    lcl: float | None = None
    ucl: float | None = None


def production_p_bar(n: int, d: int) -> float:
    """Production's FAIL rate as the p-chart centre; (d + 0.5) / (n + 1) so that a production model with no
    FAIL yet still has limits of non-zero width (a single challenger FAIL is not out of control)."""
    return (d + 0.5) / (n + 1)


def judge(st: CanaryState, policy: CanaryPolicy, now: float) -> Verdict | None:
    """Rollback or promotion from what was seen so far; None: keep watching."""
    if st.canary_n >= policy.min_frames:
        p_bar = production_p_bar(st.production_n, st.production_fail)
        lcl, ucl = limits(p_bar, st.canary_n, policy.sigma)
        p = st.canary_fail / st.canary_n
        if not lcl <= p <= ucl:
            return Verdict("rollback", "fail_rate", f"challenger FAIL rate {p:.3f} over {st.canary_n} frames is "
                           f"outside production's limits [{lcl:.3f}, {ucl:.3f}] (p̄ {p_bar:.3f})", p, p_bar, lcl, ucl)
        if st.latencies:
            p95 = float(np.percentile(list(st.latencies), 95))
            if p95 > policy.latency_budget_ms:
                return Verdict("rollback", "latency", f"challenger p95 latency {p95:.0f} ms exceeds the budget "
                               f"{policy.latency_budget_ms:.0f} ms", p95, None, None, policy.latency_budget_ms)
    rate = st.shadow.verdict_rate
    if rate is not None and st.shadow.frames >= policy.min_pairs and rate < policy.min_agreement:
        return Verdict("rollback", "agreement", f"shadow verdict agreement {rate:.3f} over {st.shadow.frames} "
                       f"frames is below {policy.min_agreement:.3f}", rate, None, policy.min_agreement, None)
    if now - st.started_at >= policy.clean_s and st.canary_n >= policy.min_frames and \
            (not policy.require_shadow or st.shadow.frames >= policy.min_pairs):
        return Verdict("promote", "clean_period", f"clean for {now - st.started_at:.0f} s over {st.canary_n} "
                       f"canary frames and {st.shadow.frames} shadow pairs")
    return None


@dataclass
class Outcome:
    action: str  # rollback | promote | stopped
    rule: str
    message: str
    version: str
    decided_after_s: float
    evidence: dict[str, Any]


class CanaryController:
    """One canary of NAME's challenger version: start, watch, decide, act (see the module docstring)."""

    def __init__(self, settings: Settings, name: str, *, lines: list[str] | None = None, share: float = 0.0,
                 policy: CanaryPolicy | None = None, version: str | None = None, dsn: str | None = None,
                 poll_s: float = 1.0, window_s: float = 60.0, production_alias: str = "production",
                 lease_s: float = 120.0) -> None:
        from inference_workers.model_loader import mlflow_client

        if not lines and share <= 0:
            raise ValueError("a canary needs --lines or a --share of cameras > 0")
        self.settings = settings
        from infra.review_queue import Sampler

        self.sampler = Sampler.from_settings(settings, queued_by=f"canary-{name}")  # challenger_disagree frames
        self.name = name
        self.lines = sorted(set(lines or ()))
        self.share = share
        self.policy = policy or CanaryPolicy()
        self.poll_s = poll_s
        self.lease_s = lease_s  # workers stop serving the route when the controller has not renewed it this long
        self._renewed = 0.0
        self.production_alias = production_alias
        self.challenger_alias = settings.challenger_alias
        self.client = mlflow_client(settings)
        rm = self.client.get_registered_model(name)
        aliases = {k: str(v) for k, v in (rm.aliases or {}).items()}  # versions come back as int or str
        self.version = str(version or aliases.get(self.challenger_alias) or "")
        if not self.version:
            raise ValueError(f"model {name!r} has no @{self.challenger_alias} version to canary")
        if aliases.get(self.challenger_alias) != self.version:
            self.client.set_registered_model_alias(name, self.challenger_alias, self.version)
        self.production_version = aliases.get(production_alias)
        self.dsn = dsn
        self.join = ShadowJoin(window_s)
        self.state = CanaryState(started_at=time.time())
        self.state.latencies = deque(maxlen=self.policy.latency_window)
        self._stop = threading.Event()
        self.outcome: Outcome | None = None

    # ---- registry, alerts, table --------------------------------------------------------------------
    def _route(self, state: str, reason: str = "") -> None:
        from inference_workers.challenger import Route

        expires = time.time() + self.lease_s if state == "canary" and self.lease_s > 0 else 0.0
        r = Route(self.version, frozenset(self.lines), self.share, state, self.state.started_at, reason, expires)
        self.client.set_registered_model_tag(self.name, ROUTE_TAG, r.to_json())
        self._renewed = time.monotonic()

    def _tags(self, action: str, reason: str, evidence: dict[str, Any]) -> None:
        ev = json.dumps(evidence, sort_keys=True, default=str)[:4900]
        for k, v in {"sqis.canary.state": action, "sqis.canary.reason": reason[:4900], "sqis.canary.evidence": ev,
                     "sqis.canary.at": str(round(time.time(), 3)), "sqis.canary.lines": ",".join(self.lines),
                     "sqis.canary.share": str(self.share)}.items():
            self.client.set_model_version_tag(self.name, self.version, k, v)

    def _alert(self, action: str, verdict: Verdict | None, message: str, evidence: dict[str, Any]) -> None:
        """A switch as an alert on the alerts topic (the existing path: sink, dashboard, notifiers)."""
        from infra import kafka
        from schemas.catalog import TopicCatalog
        from schemas.serde import serialize

        now = time.time_ns() // 1000
        start = int(self.state.started_at * US)
        rule = f"canary_{action}" + (f":{verdict.rule}" if verdict else "")
        key = ("model", ",".join(self.lines) or f"share:{self.share}", "", f"{self.name}/{self.version}")
        a = Alert(alert_id(key, rule, start), "model", rule, "open" if action == "rollback" else "resolved",
                  key[1], "", key[3], start, now, float(verdict.value) if verdict and verdict.value is not None else 0.0,
                  verdict.center if verdict else None, verdict.lcl if verdict else None,
                  verdict.ucl if verdict else None, message, now, now, None if action == "rollback" else now,
                  "critical" if action == "rollback" else "info", 1, (), evidence)
        value, headers = serialize("alert", a.to_avro())
        p = kafka.producer(self.settings, client_id=f"canary-{self.name}")
        p.produce(TopicCatalog(self.settings.topic_prefix).alerts, value=value, key=a.alert_id.encode(),
                  headers=headers)
        if p.flush(10):
            log.error("canary alert not delivered", extra={"model_name": self.name, "rule": rule})

    def _record(self, action: str, reason: str, evidence: dict[str, Any]) -> None:
        if self.dsn is None:
            return
        from infra.db import connect

        try:
            with connect(self.dsn, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO model_switches (switch_id, at, model_name, from_version, to_version, action, "
                    "reason, lines, share, evidence) VALUES (%s, now(), %s, %s, %s, %s, %s, %s, %s, %s)",
                    (uuid.uuid4().hex, self.name, self.production_version, self.version, action, reason,
                     self.lines, self.share, json.dumps(evidence, default=str)))
        except Exception as exc:  # evidence is also in MLflow and the alert: log and go on
            log.error("model switch not recorded in PostgreSQL", extra={"error": str(exc)})

    def _switch(self, action: str, reason: str, verdict: Verdict | None) -> None:
        evidence = self.state.evidence() | {"rule": verdict.rule if verdict else action,
                                            "production_version": self.production_version,
                                            "challenger_version": self.version}
        self._tags(action, reason, evidence)
        self._alert(action, verdict, f"{self.name} v{self.version}: {action} ({reason})", evidence)
        self._record(action, reason, evidence)
        log.info("canary switch", extra={"model_name": self.name, "model_version": self.version,
                                         "action": action, "reason": reason,
                                         "after_s": round(time.time() - self.state.started_at, 3)})

    # ---- the loop -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.state.started_at = time.time()
        self._route("canary", "started")
        self._switch("canary", f"canary on lines {self.lines} share {self.share}", None)

    def stop(self) -> None:
        self._stop.set()

    def on_inspection(self, rec: dict[str, Any]) -> None:
        if rec["model_name"] != self.name:
            return
        if str(rec["model_version"]) == self.version:
            st = self.state
            st.canary_n += 1
            fail = rec["verdict"] == "FAIL"
            st.canary_fail += fail
            line = str(rec["line_id"])
            st.by_line.setdefault(line, [0, 0])
            st.by_line[line][0] += 1
            st.by_line[line][1] += fail
            if self.lines and not self.share and line not in self.lines:
                st.outside_lines += 1
            st.latencies.append(float(rec["timings"]["total_ms"]))
        else:
            self.state.production_n += 1
            self.state.production_fail += rec["verdict"] == "FAIL"
            self.join.add_production(rec)

    def on_shadow(self, rec: dict[str, Any]) -> None:
        if rec["model_name"] == self.name and str(rec["model_version"]) == self.version:
            self.join.add_shadow(rec)

    def run(self, stop: threading.Event | None = None, max_s: float | None = None) -> Outcome:
        """Start the canary and watch it until it is rolled back or promoted (or stopped)."""
        if stop is not None:
            self._stop = stop
        c, insp, _shadow = open_from(self.settings, int(time.time() * 1000) - 1000)
        conn = None
        try:
            self.start()
            if self.dsn is not None:
                from infra.db import connect

                conn = connect(self.dsn, autocommit=True)
            next_judge = time.monotonic() + self.poll_s
            while not self._stop.is_set():
                for topic, rec in records(c):
                    if topic == insp:
                        self.on_inspection(rec)
                    else:
                        self.on_shadow(rec)
                if time.monotonic() < next_judge:
                    continue
                next_judge = time.monotonic() + self.poll_s
                self.state.shadow = self.join.total(challenger_version=self.version)
                if conn is not None:
                    try:
                        write_agreement(conn, self.join, self.sampler)
                    except Exception as exc:
                        log.error("shadow agreement not written", extra={"error": str(exc)})
                if self.lease_s > 0 and time.monotonic() - self._renewed > self.lease_s / 3:
                    try:  # renew the lease: a controller that died leaves a route that expires on its own
                        self._route("canary", "lease renewed")
                    except Exception as exc:
                        log.warning("canary lease not renewed", extra={"model_name": self.name, "error": str(exc)})
                v = judge(self.state, self.policy, time.time())
                if v is None and max_s is not None and time.time() - self.state.started_at > max_s:
                    break
                if v is not None:
                    return self._act(v)
            return self._finish(Outcome("stopped", "", "stopped before a decision", self.version,
                                        time.time() - self.state.started_at, self.state.evidence()))
        finally:
            c.close()
            if conn is not None:
                conn.close()

    def _act(self, v: Verdict) -> Outcome:
        decided_after = time.time() - self.state.started_at  # the decision, before the switch is carried out
        if v.action == "rollback":
            self._route("rolled_back", f"{v.rule}: {v.message}")
            try:
                self.client.delete_registered_model_alias(self.name, self.challenger_alias)
            except Exception as exc:
                log.warning("challenger alias not removed", extra={"error": str(exc)})
        else:
            self.client.set_registered_model_alias(self.name, self.production_alias, self.version)
            self._route("promoted", v.message)
            try:
                self.client.delete_registered_model_alias(self.name, self.challenger_alias)
            except Exception as exc:
                log.warning("challenger alias not removed", extra={"error": str(exc)})
        self._switch(v.action, f"{v.rule}: {v.message}", v)
        return self._finish(Outcome(v.action, v.rule, v.message, self.version, decided_after,
                                    self.state.evidence()))

    def _finish(self, o: Outcome) -> Outcome:
        self.outcome = o
        return o
