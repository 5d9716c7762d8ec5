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

Restart (with a database): the canary's state is a ``canary_runs`` row (infra/migrations/009_canary_state.sql:
version, lines/share, policy, started_at, lease, the latest evidence), open until the decision. A controller
started for NAME while a row is open:
    lease still running  -> resumes that canary: same version, route, policy and started_at (the command line's
                            are ignored), counters rebuilt by re-reading the topics from started_at, no new
                            ``canary`` switch row; the decision is taken once (the row is closed first);
    lease expired        -> the workers stopped routing on their own; it writes the rollback the dead controller
                            did not (rule ``controller_lost``: route rolled_back, challenger alias removed,
                            MLflow tags, alert, ``model_switches`` row, with the last persisted evidence) and
                            returns that rollback; a new canary needs the challenger alias set again.
A PostgreSQL session lock per model name keeps a second controller of a live canary out.
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

from sqis.errors import AppError
from stream_processors.alerts import Alert, alert_id
from stream_processors.shadow import Agreement, ShadowJoin, open_from, records, write_agreement
from stream_processors.spc import limits

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger(__name__)

ROUTE_TAG = "sqis.canary"  # the same tag inference_workers/challenger.py reads
US = 1_000_000
LOCK_NS = 0x5A15_CA9A  # advisory lock namespace: one controller per model name


class CanaryBusy(ValueError):
    """Another controller is watching this model's canary (it holds the model's lock)."""


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CanaryPolicy:
        """The persisted policy; unknown keys (a newer writer) are ignored, missing ones take the defaults."""
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in d.items() if k in cls.__dataclass_fields__})


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


def on_restart(open_row: dict[str, Any] | None, now: float) -> str:
    """What a starting controller does with NAME's canary_runs row: ``start`` (none open), ``resume`` (its
    lease still runs, or it has none) or ``lost`` (its lease expired while no controller renewed it)."""
    if open_row is None:
        return "start"
    expires = open_row.get("expires_at")
    if expires is None:
        return "resume"
    return "resume" if (expires.timestamp() if hasattr(expires, "timestamp") else float(expires)) > now else "lost"


_OPEN_ROW = ("SELECT canary_id, version, production_version, lines, share, policy, lease_s, started_at, expires_at,"
             " evidence FROM canary_runs WHERE model_name = %s AND status = 'open'")


def open_canary(conn: Any, name: str) -> dict[str, Any] | None:
    """NAME's open canary_runs row (a dict), or None."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_OPEN_ROW, (name,))
        return cur.fetchone()


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
        self._open = self._read_open(dsn, name)
        if self._open is not None:  # a canary in progress: run() resumes it (or writes its rollback)
            if version is not None and str(version) != self._open["version"]:
                raise ValueError(f"{name} has a canary of v{self._open['version']} in progress (started "
                                 f"{self._open['started_at']:%Y-%m-%d %H:%M:%S %Z}); `sqis model canary {name}` "
                                 f"resumes it; a canary of v{version} can start once it is decided")
            version = self._open["version"]
            aliases[self.challenger_alias] = str(version)  # keep the alias as the canary left it
        self.version = str(version or aliases.get(self.challenger_alias) or "")
        if not self.version:
            raise ValueError(f"model {name!r} has no @{self.challenger_alias} version to canary")
        if aliases.get(self.challenger_alias) != self.version:
            self.client.set_registered_model_alias(name, self.challenger_alias, self.version)
        self.production_version = aliases.get(production_alias)
        self.dsn = dsn
        self.canary_id = uuid.uuid4().hex
        self.resumed = False
        self.join = ShadowJoin(window_s)
        self.state = CanaryState(started_at=time.time())
        self.state.latencies = deque(maxlen=self.policy.latency_window)
        self._stop = threading.Event()
        self.outcome: Outcome | None = None
        self._conn: Any = None  # the controller's connection (holds the lock), while run() runs

    # ---- persisted state (canary_runs) ----------------------------------------------------------------
    @staticmethod
    def _read_open(dsn: str | None, name: str) -> dict[str, Any] | None:
        if dsn is None:
            return None
        from infra.db import connect

        with connect(dsn, autocommit=True) as conn:
            return open_canary(conn, name)

    def _lock(self, conn: Any) -> None:
        """Hold NAME's controller lock for this connection's life (released when the process dies)."""
        got = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_NS, self.name)).fetchone()[0]
        if not got:
            raise CanaryBusy(f"another controller is watching the canary of {self.name} (it holds its lock)")

    def _adopt(self, row: dict[str, Any]) -> None:
        """Take over an open canary: its id, version, route, policy and start time."""
        self.canary_id = row["canary_id"]
        self.version = str(row["version"])
        self.production_version = row["production_version"] or self.production_version
        lines, share = sorted(row["lines"] or ()), float(row["share"])
        if (lines, share) != (self.lines, self.share):
            log.warning("resuming the canary's own route, not the one asked for",
                        extra={"model_name": self.name, "lines": lines, "share": share})
        self.lines, self.share = lines, share
        self.policy = CanaryPolicy.from_dict(dict(row["policy"] or {}))
        self.lease_s = float(row["lease_s"])
        self.state = CanaryState(started_at=row["started_at"].timestamp())
        self.state.latencies = deque(maxlen=self.policy.latency_window)

    def _persist_start(self, conn: Any) -> None:
        expires = self.state.started_at + self.lease_s if self.lease_s > 0 else None
        conn.execute(
            "INSERT INTO canary_runs (canary_id, model_name, version, production_version, lines, share, policy,"
            " lease_s, started_at, renewed_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
            " to_timestamp(%s), now(), to_timestamp(%s))",
            (self.canary_id, self.name, self.version, self.production_version, self.lines, self.share,
             json.dumps(self.policy.to_dict()), self.lease_s, self.state.started_at, expires))

    def _persist_renewal(self, expires: float) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute(
                "UPDATE canary_runs SET renewed_at = now(), expires_at = to_timestamp(%s), evidence = %s"
                " WHERE canary_id = %s AND status = 'open'",
                (expires or None, json.dumps(self.state.evidence(), default=str), self.canary_id))
        except Exception as exc:  # the lease in the route tag still holds; the next renewal tries again
            log.warning("canary state not persisted", extra={"model_name": self.name, "error": str(exc)})

    def _reconnect(self) -> bool:
        """A new connection (and the model's lock again) after PostgreSQL went away; False while it is still
        unreachable. CanaryBusy when another controller took the lock meanwhile."""
        from infra.db import connect

        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
        try:
            conn = connect(self.dsn, autocommit=True)
        except Exception as exc:
            log.warning("canary database unreachable", extra={"model_name": self.name, "error": str(exc)})
            return False
        try:
            self._lock(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        log.info("canary database reconnected", extra={"model_name": self.name, "canary_id": self.canary_id})
        return True

    def _db_ok(self) -> bool:
        """The connection is usable (reconnected when PostgreSQL restarted under it)."""
        if self.dsn is None:
            return False
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            return True
        return self._reconnect()

    def _close(self, action: str, reason: str, evidence: dict[str, Any] | None = None) -> bool:
        """Close the open row; False when it was closed already (another controller decided): act only once.
        With PostgreSQL away, tried for ~10 s; then a rollback goes ahead unrecorded (safety first, said in
        the log) and a promotion is not made (raises: the next controller resumes the canary)."""
        if self.dsn is None:
            return True
        import psycopg

        for attempt in range(5):
            if self._db_ok():
                try:
                    n = self._conn.execute(
                        "UPDATE canary_runs SET status = %s, closed_at = now(), reason = %s, evidence = %s"
                        " WHERE canary_id = %s AND status = 'open'",
                        (action, reason[:4000], json.dumps(evidence or self.state.evidence(), default=str),
                         self.canary_id)).rowcount
                    return n == 1
                except psycopg.OperationalError as exc:
                    log.warning("canary state not closed; retrying", extra={"model_name": self.name, "error": str(exc)})
            time.sleep(0.5 * (attempt + 1))
        if action == "rollback":
            log.error("canary rollback not recorded in canary_runs (database unreachable); rolling back anyway",
                      extra={"model_name": self.name, "canary_id": self.canary_id})
            return True
        raise AppError(f"canary of {self.name}: PostgreSQL unreachable at the decision; nothing promoted "
                           "(start the controller again: it resumes the canary)")

    # ---- registry, alerts, table --------------------------------------------------------------------
    def _route(self, state: str, reason: str = "") -> None:
        from inference_workers.challenger import Route

        expires = time.time() + self.lease_s if state == "canary" and self.lease_s > 0 else 0.0
        r = Route(self.version, frozenset(self.lines), self.share, state, self.state.started_at, reason, expires)
        self.client.set_registered_model_tag(self.name, ROUTE_TAG, r.to_json())
        self._renewed = time.monotonic()
        if state == "canary":
            self._persist_renewal(expires)

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

    def _switch(self, action: str, reason: str, verdict: Verdict | None,
                evidence: dict[str, Any] | None = None) -> None:
        evidence = (evidence or self.state.evidence()) | {
            "rule": verdict.rule if verdict else action, "production_version": self.production_version,
            "challenger_version": self.version, "canary_id": self.canary_id}
        self._tags(action, reason, evidence)
        self._alert(action, verdict, f"{self.name} v{self.version}: {action} ({reason})", evidence)
        self._record(action, reason, evidence)
        log.info("canary switch", extra={"model_name": self.name, "model_version": self.version,
                                         "action": action, "reason": reason,
                                         "after_s": round(time.time() - self.state.started_at, 3)})

    # ---- the loop -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.state.started_at = round(time.time(), 6)  # what a timestamptz keeps (µs)
        if self._conn is not None:
            self._persist_start(self._conn)
        self._route("canary", "started")
        self._switch("canary", f"canary on lines {self.lines} share {self.share}", None)

    def resume(self, row: dict[str, Any]) -> None:
        """Carry on with an open canary whose lease still runs: renew its route; no new ``canary`` switch."""
        self._adopt(row)
        self.resumed = True
        self._route("canary", "resumed after a controller restart")
        log.info("canary resumed", extra={"model_name": self.name, "model_version": self.version,
                                          "canary_id": self.canary_id,
                                          "started_s_ago": round(time.time() - self.state.started_at, 3)})

    def lost(self, row: dict[str, Any]) -> Outcome:
        """An open canary whose lease expired with no controller: write the rollback it never got."""
        self._adopt(row)
        self.resumed = True
        expired = row["expires_at"]
        v = Verdict("rollback", "controller_lost", f"controller lost: the route's lease expired at "
                    f"{expired:%Y-%m-%d %H:%M:%S %Z} with no controller renewing it; the workers stopped routing then")
        return self._act(v, evidence=dict(row["evidence"] or {}))

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
        """Start the canary (or resume / close the one in progress, see the module docstring) and watch it
        until it is rolled back or promoted (or stopped: it then stays open for the next controller)."""
        if stop is not None:
            self._stop = stop
        c = None
        try:
            row = None
            if self.dsn is not None:
                from infra.db import connect

                self._conn = connect(self.dsn, autocommit=True)
                self._lock(self._conn)
                row = open_canary(self._conn, self.name)
            what = on_restart(row, time.time())
            if what == "lost":
                return self.lost(row)  # type: ignore[arg-type]
            since_ms = int(row["started_at"].timestamp() * 1000) if row else int(time.time() * 1000)
            c, insp, _shadow = open_from(self.settings, since_ms - 1000)
            if what == "resume":
                self.resume(row)  # type: ignore[arg-type]
            else:
                self.start()
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
                if self.dsn is not None and self._db_ok():
                    try:
                        write_agreement(self._conn, self.join, self.sampler)
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
            if c is not None:
                c.close()
            if self._conn is not None:
                self._conn.close()  # releases the lock
                self._conn = None

    def _act(self, v: Verdict, evidence: dict[str, Any] | None = None) -> Outcome:
        decided_after = time.time() - self.state.started_at  # the decision, before the switch is carried out
        if not self._close(v.action, f"{v.rule}: {v.message}", evidence):
            log.warning("canary decided elsewhere already; nothing done", extra={"model_name": self.name,
                                                                               "canary_id": self.canary_id})
            return self._finish(Outcome("stopped", "", "decided by another controller", self.version,
                                        decided_after, evidence or self.state.evidence()))
        if v.action == "rollback":
            self._route("rolled_back", f"{v.rule}: {v.message}")
            self._drop_challenger_alias()
        else:
            self.client.set_registered_model_alias(self.name, self.production_alias, self.version)
            self._route("promoted", v.message)
            self._drop_challenger_alias()
        self._switch(v.action, f"{v.rule}: {v.message}", v, evidence)
        return self._finish(Outcome(v.action, v.rule, v.message, self.version, decided_after,
                                    evidence or self.state.evidence()))

    def _drop_challenger_alias(self) -> None:
        """Remove @challenger if it still names this canary's version: a retrain may have moved it to a newer
        version meanwhile, and that one's pass must not be lost with this one's decision."""
        try:
            current = self.client.get_model_version_by_alias(self.name, self.challenger_alias)
        except Exception:  # no such alias any more
            return
        if str(current.version) != self.version:
            log.info("challenger alias moved on; kept", extra={"model_name": self.name, "canary_version": self.version,
                                                               "challenger_version": str(current.version)})
            return
        try:
            self.client.delete_registered_model_alias(self.name, self.challenger_alias)
        except Exception as exc:
            log.warning("challenger alias not removed", extra={"error": str(exc)})

    def _finish(self, o: Outcome) -> Outcome:
        self.outcome = o
        return o
