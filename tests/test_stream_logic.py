"""Stream processors' pure logic (no broker): windows, p-chart and rules, alert lifecycle, parts, drift."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_processors.alerts import AlertManager
from stream_processors.drift import Cusum, DriftMonitor
from stream_processors.parts import PartTracker
from stream_processors.processors import SpcConfig, SpcProcessor
from stream_processors.spc import (
    WESTERN_ELECTRIC,
    Baseline,
    PChart,
    laney_sigma_z,
    limits,
    parse_rules,
    sigma,
)
from stream_processors.windows import US, RateRecord, RateWindows

MIN = 60 * US


def insp(t_us: int, *, line: str = "L1", cam: str = "C1", fail: bool = False, cls: str = "scratch",
         fid: str = "f", part: str | None = None, stats: dict | None = None) -> dict:
    return {"frame_id": fid, "line_id": line, "camera_id": cam, "captured_at": t_us, "part_id": part,
            "verdict": "FAIL" if fail else "PASS", "timings": {"total_ms": 10.0},
            "detections": [{"class_name": cls, "score": 0.9}] if fail else [], "image_stats": stats}


# ---- windows -----------------------------------------------------------------------------------------

def _final(recs: list[RateRecord], window_s: int = 60) -> dict:
    out = {}
    for r in recs:
        if r.window_s == window_s:
            out[(r.key, r.window_start_us)] = r  # later records (late updates) replace earlier ones
    return out


def test_tumbling_windows_count_per_line_camera_and_class() -> None:
    w = RateWindows(window_s=60, grace_s=10)
    recs = []
    for i in range(10):
        recs += w.add(insp(i * US, cam=f"C{i % 2}", fail=i < 3, cls="dent" if i == 0 else "scratch", fid=f"f{i}"))
    assert recs == []  # nothing closes before the watermark passes end + grace
    recs += w.add(insp(71 * US, fid="next"))
    got = _final(recs)
    line = got[(("L1", "", ""), 0)]
    assert (line.frames, line.fails, line.defects, line.final) == (10, 3, 3, True)
    assert got[(("L1", "C0", ""), 0)].frames == 5
    assert got[(("L1", "", "scratch"), 0)].fails == 2
    assert got[(("L1", "", "dent"), 0)].frames == 10  # a class's denominator is the line's frames
    assert set(line.examples) == {"f0", "f1", "f2"}


def test_late_frame_within_retention_is_counted_and_window_reemitted() -> None:
    w = RateWindows(window_s=60, grace_s=0)
    w.add(insp(1 * US))
    closed = w.add(insp(61 * US))
    assert _final(closed)[(("L1", "", ""), 0)].frames == 1
    late = w.add(insp(2 * US, fail=True))
    upd = _final(late)[(("L1", "", ""), 0)]
    assert (upd.frames, upd.fails, upd.late, upd.final) == (2, 1, 1, False)
    assert w.late_frames == 1


def test_frame_older_than_retention_is_counted_not_lost_silently() -> None:
    w = RateWindows(window_s=60, grace_s=0, sliding_windows=2, retention_s=180)
    w.add(insp(0))
    w.add(insp(10 * MIN))
    assert w.add(insp(1 * US)) == []
    assert w.too_old == 1


def test_idle_tick_closes_open_windows() -> None:
    w = RateWindows(window_s=60, grace_s=30, idle_close_s=2)
    w.add(insp(5 * US), now=100.0)
    assert w.tick(101.0) == []
    out = w.tick(102.5)
    assert _final(out)[(("L1", "", ""), 0)].frames == 1


def test_sliding_view_sums_the_last_windows() -> None:
    w = RateWindows(window_s=60, grace_s=0, sliding_windows=3)
    out = []
    for m in range(5):
        for _ in range(m + 1):
            out += w.add(insp(m * MIN + US, fail=True))
    out += w.flush()
    sliding = [r for r in out if r.window_s == 180 and r.key == ("L1", "", "")]
    last = sliding[-1]
    assert last.window_start_us == 2 * MIN and (last.frames, last.fails) == (3 + 4 + 5, 12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 600), st.booleans(), st.sampled_from(["C1", "C2"])), min_size=1, max_size=80),
       st.integers(0, 90))
def test_every_frame_ends_up_in_its_window(frames: list, grace: int) -> None:
    """Whatever the arrival order and grace, the last record of each window counts all its frames."""
    w = RateWindows(window_s=60, grace_s=grace, retention_s=3600)
    out = []
    for i, (sec, fail, cam) in enumerate(frames):
        out += w.add(insp(sec * US, cam=cam, fail=fail, fid=f"f{i}"))
    out += w.flush()
    got = _final(out)
    expect = Counter((sec - sec % 60) * US for sec, _, _ in frames)
    fails = Counter((sec - sec % 60) * US for sec, f, _ in frames if f)
    for start, n in expect.items():
        r = got[(("L1", "", ""), start)]
        assert (r.frames, r.fails) == (n, fails[start])
    assert w.too_old == 0


# ---- p-chart and rules -------------------------------------------------------------------------------

def test_p_chart_limits_follow_the_formula() -> None:
    lcl, ucl = limits(0.02, 2400)
    s = math.sqrt(0.02 * 0.98 / 2400)
    assert ucl == pytest.approx(0.02 + 3 * s) and lcl == pytest.approx(0.02 - 3 * s)
    assert limits(0.02, 10)[0] == 0.0  # floored at 0


@given(st.floats(0.0, 1.0), st.integers(1, 10**6), st.floats(0.5, 4.0))
def test_limits_bracket_the_centre_and_shrink_with_n(p: float, n: int, k: float) -> None:
    lcl, ucl = limits(p, n, k)
    assert 0.0 <= lcl <= p <= ucl <= 1.0
    assert limits(p, n * 4, k)[1] <= ucl + 1e-12


def test_laney_sigma_z_is_one_for_binomial_and_grows_with_overdispersion() -> None:
    rng = random.Random(1)
    binom = [(2000, sum(rng.random() < 0.02 for _ in range(2000))) for _ in range(60)]
    over = [(2000, int(2000 * 0.02 * (2.0 if i % 2 else 0.2))) for i in range(60)]
    assert laney_sigma_z(binom, 0.02) < 1.3
    assert laney_sigma_z(over, 0.02) > 3


Z = {"we1": [0, 0, 0, 3.2], "we2": [0, 2.5, 0.1, 2.4], "we3": [1.2, 1.5, 0.2, 1.1, 1.3], "we4": [0.1] * 8}


@pytest.mark.parametrize("name", ["we1", "we2", "we3", "we4"])
def test_each_western_electric_rule_fires_on_its_pattern(name: str) -> None:
    rule = WESTERN_ELECTRIC[name]
    zs = Z[name]
    assert rule.check(zs, "upper") == 1
    assert rule.check([-z for z in zs], "lower") == -1
    assert rule.check([-z for z in zs], "upper") == 0  # a one-sided chart ignores the other side
    assert rule.check(zs[:-1] + [0.0], "both") == 0  # without the last point's contribution it does not fire


def test_rules_fire_exactly_when_they_should_not_before() -> None:
    we2 = WESTERN_ELECTRIC["we2"]
    assert we2.check([2.5, 0, 0, 2.1], "both") == 0  # 2 beyond 2σ but not within 3 points
    assert we2.check([-2.5, 0.0, 2.1], "both") == 0  # opposite sides
    we4 = WESTERN_ELECTRIC["we4"]
    assert we4.check([0.1] * 7, "upper") == 0
    assert we4.check([0.1] * 7 + [-0.1], "both") == 0


@settings(max_examples=100)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=12), st.integers(1, 5), st.integers(0, 4), st.floats(0, 3))
def test_custom_k_of_m_rule_matches_a_direct_count(zs: list[float], k: int, extra: int, zone: float) -> None:
    m = k + extra
    zone = round(zone, 2)
    rule = parse_rules(f"{k}/{m}>{zone:.2f}")[0]
    want = len(zs) >= m and zs[-1] > zone and sum(z > zone for z in zs[-m:]) >= k
    assert (rule.check(zs, "upper") == 1) == want


def test_parse_rules_errors_are_clear() -> None:
    assert [r.name for r in parse_rules("we1,we4")] == ["we1_beyond_3sigma", "we4_8_in_a_row_one_side"]
    assert len(parse_rules("all")) == 4
    with pytest.raises(ValueError, match="unknown SPC rule"):
        parse_rules("we9")
    with pytest.raises(ValueError, match="K <= M"):
        parse_rules("5/3>1")


def test_warm_up_estimates_the_centre_line_and_never_fires() -> None:
    chart = PChart(parse_rules("we1"), warmup_points=5, min_n=10)
    for i in range(5):
        pt, fired = chart.add(i, 1000, 100 if i == 0 else 20)  # a wild first point: still no alert
        assert pt is None and fired == []
    assert chart.baseline is not None and chart.baseline.source == "warmup"
    assert chart.baseline.p_bar == pytest.approx(180 / 5000)
    pt, fired = chart.add(6, 1000, 200)
    assert pt is not None and [f.rule for f in fired] == ["we1_beyond_3sigma"]


def test_small_subgroups_are_skipped_and_threshold_rule_fires() -> None:
    chart = PChart(parse_rules("we1"), baseline=Baseline(0.02, 10**5, 2000), min_n=50, threshold=0.05)
    assert chart.add(0, 10, 9) == (None, [])  # a stopped line: 10 frames are not a point
    pt, fired = chart.add(1, 1000, 60)
    assert {f.rule for f in fired} == {"threshold", "we1_beyond_3sigma"}
    assert pt is not None and pt.z == pytest.approx((0.06 - 0.02) / sigma(0.02, 1000))


def _window(line: str, minute: int, n: int, d: int) -> RateRecord:
    return RateRecord(line, "", "", minute * MIN, 60, n, d, d, 0, None, True, (f"{line}-{minute}",))


def test_spc_processor_opens_dedups_and_resolves_one_alert_per_line() -> None:
    cfg = SpcConfig(rules="2/2>3", resolve_after=3, cooldown_s=600)
    proc = SpcProcessor(cfg, baselines={("L1", ""): Baseline(0.02, 10**6, 20000)})
    states = []
    for m, d in enumerate([48, 48, 100, 100, 100, 48, 48, 48, 48]):
        states += [a for _, _, a in proc.on_window(_window("L1", m, 2400, d))]
    assert [a["state"] for a in states] == ["open", "open", "resolved"]
    assert len({a["alert_id"] for a in states}) == 1
    assert states[1]["fired"] == 2 and states[0]["window_start"] == 3 * MIN
    assert states[0]["example_frame_ids"] == ["L1-3"] and states[0]["ucl"] > states[0]["center"]
    # back out of control within the cooldown: suppressed
    later = [a for m in (9, 10) for _, _, a in proc.on_window(_window("L1", m, 2400, 100))]
    assert later == [] and proc.alerts.stats.suppressed_cooldown == 1


# ---- alert lifecycle ---------------------------------------------------------------------------------

def test_alert_lifecycle_ack_resolve_cooldown_and_stable_ids() -> None:
    key = ("spc", "L1", "", "")
    m = AlertManager(cooldown_s=300, resolve_after=2)
    a = m.fire(key, rule="r", window_start_us=0, window_end_us=MIN, value=0.1)[0]
    assert a.state == "open" and a.alert_id == AlertManager().fire(key, rule="r", window_start_us=0,
                                                                  window_end_us=MIN, value=0.1)[0].alert_id
    assert m.acknowledge(a.alert_id, 2 * MIN)[0].state == "acknowledged"
    assert m.in_control(key, 3 * MIN) == []
    r = m.in_control(key, 4 * MIN)[0]
    assert (r.state, r.resolved_at_us, r.alert_id) == ("resolved", 4 * MIN, a.alert_id)
    assert m.fire(key, rule="r", window_start_us=5 * MIN, window_end_us=6 * MIN, value=0.1) == []  # cooldown
    b = m.fire(key, rule="r", window_start_us=10 * MIN, window_end_us=11 * MIN, value=0.1)[0]
    assert b.alert_id != a.alert_id and b.state == "open"


def test_firing_again_resets_the_resolve_count() -> None:
    key = ("drift", "L1", "C1", "brightness")
    m = AlertManager(resolve_after=2)
    m.fire(key, rule="cusum_brightness", window_start_us=0, window_end_us=MIN, value=1)
    m.in_control(key, 2 * MIN)
    m.fire(key, rule="cusum_brightness", window_start_us=2 * MIN, window_end_us=3 * MIN, value=1)
    assert m.in_control(key, 4 * MIN) == []
    assert m.open_alerts()[0].class_name == ""  # a drift key's statistic is in the rule, not the class


# ---- part verdicts -----------------------------------------------------------------------------------

def test_part_with_all_views_gets_ok_or_ng_with_the_worst_view() -> None:
    t = PartTracker(expected_views=2, timeout_s=5)
    assert t.add(insp(1, cam="C1", part="P1", fid="a"), 0.0) == []
    ok = t.add(insp(2, cam="C2", part="P1", fid="b"), 0.1)[0]
    assert (ok.verdict, ok.missing_cameras) == ("OK", ())
    t.add(insp(3, cam="C1", part="P2", fid="c", fail=True, cls="dent"), 0.2)
    ng = t.add(insp(4, cam="C2", part="P2", fid="d"), 0.3)[0]
    assert (ng.verdict, ng.worst_class, ng.worst_camera) == ("NG", "dent", "C1")
    assert [v["frame_id"] for v in ng.views] == ["c", "d"]


def test_missing_view_gives_incomplete_never_ok_and_late_view_is_counted() -> None:
    t = PartTracker(cameras_by_line={"L1": {"C1", "C2", "C3"}}, timeout_s=5)
    t.add(insp(1, cam="C1", part="P1"), 0.0)
    t.add(insp(2, cam="C2", part="P1"), 1.0)
    assert t.tick(4.9) == []
    v = t.tick(5.0)[0]
    assert (v.verdict, v.missing_cameras) == ("INCOMPLETE", ("C3",))
    assert t.add(insp(3, cam="C3", part="P1"), 6.0) == []
    assert t.stats.late_views == 1


def test_part_state_is_bounded() -> None:
    t = PartTracker(expected_views=2, timeout_s=60, max_parts=3)
    out = []
    for i in range(5):
        out += t.add(insp(i, part=f"P{i}"), float(i))
    assert len(t.parts) == 3 and [v.part_id for v in out] == ["P0", "P1"]
    assert all(v.verdict == "INCOMPLETE" for v in out) and t.stats.evicted == 2


# ---- drift -------------------------------------------------------------------------------------------

def test_cusum_quiet_on_a_stable_series_and_fires_on_a_shift() -> None:
    rng = random.Random(3)
    c = Cusum(ref_points=30, k=1.0, h=10.0, rel_floor=0.04)
    fired = [c.add(120 + rng.gauss(0, 0.5))[1] for _ in range(2000)]
    assert not any(fired)
    shifted = [c.add(108 + rng.gauss(0, 0.5))[1] for _ in range(10)]
    # -12 levels = -2.5 units of 4 % of 120: the CUSUM gains 1.5 a point and crosses h=10 on the 7th
    assert -1 in shifted and shifted.index(-1) == 6


def test_drift_monitor_builds_minute_means_per_camera() -> None:
    mon = DriftMonitor(window_s=60, min_n=2, ref_points=3, k=1.0, h=4.0, stats=("brightness",))
    pts = []
    for minute in range(8):
        level = 120.0 if minute < 4 else 100.0
        for s in range(3):
            pts += mon.add(insp(minute * MIN + s * US, stats={"brightness": level, "contrast": 1, "sharpness": 1,
                                                              "max_score": 0.1}))
    assert [p.n for p in pts] == [3] * 7
    assert pts[0].reference is None and pts[3].reference == pytest.approx(120.0)
    assert any(p.direction == -1 for p in pts)
    assert mon.add(insp(0, stats={"brightness": 1.0})) == [] and mon.late == 1


def test_watermark_waits_for_the_slowest_source_until_it_goes_idle() -> None:
    """Partitions deliver skewed event times: one camera's backlog must not make the other's frames late."""
    w = RateWindows(window_s=60, grace_s=0, source_idle_s=10, wall_clock=lambda: 7 * 60 + 30)  # live
    w.register_source(0, 0.0)
    w.register_source(1, 0.0)
    out = []
    for m in range(5):  # partition 0 delivers five minutes first
        out += w.add(insp(m * MIN + US, cam="C0", fid=f"a{m}"), now=1.0, source=0)
    assert out == []  # partition 1 has not been heard from: nothing closes
    for m in range(5):
        out += w.add(insp(m * MIN + 2 * US, cam="C1", fid=f"b{m}"), now=2.0, source=1)
    got = _final(out)
    assert [got[(("L1", "", ""), m * MIN)].frames for m in range(4)] == [2] * 4 and w.late_frames == 0
    # partition 1 stops; after source_idle_s partition 0 alone moves the watermark
    assert w.add(insp(6 * MIN + US, cam="C0"), now=5.0, source=0) == []
    assert w.tick(6.0) == []  # window 4 still waits for partition 1 (heard from 4 s ago)
    later = _final(w.add(insp(7 * MIN + US, cam="C0"), now=13.0, source=0))
    assert later[(("L1", "", ""), 4 * MIN)].frames == 2 and (("L1", "", ""), 6 * MIN) in later


def test_drift_closes_a_silent_cameras_window() -> None:
    mon = DriftMonitor(window_s=60, min_n=1, ref_points=2, stats=("brightness",), idle_close_s=30)
    st = {"brightness": 100.0}
    mon.add(insp(0, stats=st), now=0.0)
    assert mon.close_idle(29.0) == [] and "C1" in mon.windows
    pts = mon.close_idle(30.0)
    assert [p.n for p in pts] == [1] and mon.windows == {}


def test_spc_processor_charts_each_window_once() -> None:
    proc = SpcProcessor(SpcConfig(window_s=60, grace_s=0, warmup_points=100, min_n=1))
    for m in range(4):
        for k in range(3):
            proc.handle(insp(m * MIN + k * US, fail=k == 0), 0.0)
    proc.flush()
    chart = proc.charts[("L1", "")]
    assert proc.points == 4 and len(chart._warmup) == 4 and chart._warmup[0] == (3, 1)


def test_processor_counters_are_prometheus_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from stream_processors.app import ProcessorMetrics
    from stream_processors.processors import RatesProcessor

    class FakeRunner:  # the collector reads only these attributes
        def __init__(self, p: RatesProcessor) -> None:
            self.processor, self.published, self.undecodable = p, 7, 1

    p = RatesProcessor(window_s=60, grace_s=0)
    p.handle(insp(0), 0.0)
    p.handle(insp(61 * US), 0.0)
    p.handle(insp(1 * US), 0.0)  # late
    reg = CollectorRegistry()
    reg.register(ProcessorMetrics([FakeRunner(p)]))  # type: ignore[list-item]
    text = generate_latest(reg).decode()
    assert 'sqis_stream_late_frames{processor="rates"} 1.0' in text
    assert 'sqis_stream_published{processor="rates"} 7.0' in text


def test_spc_baselines_are_reloaded_live() -> None:
    calls = []

    def loader() -> dict:
        calls.append(1)
        return {("L1", ""): Baseline(0.05, 10**5, 5000)}

    proc = SpcProcessor(SpcConfig(), baseline_loader=loader, reload_s=60)
    proc.chart("L1", "")
    proc.tick(0.0)
    proc.tick(30.0)
    assert len(calls) == 1 and proc.charts[("L1", "")].baseline.p_bar == 0.05
    proc.tick(61.0)
    assert len(calls) == 2


def test_while_catching_up_an_unread_partition_holds_the_watermark() -> None:
    """A backlog (events far behind the wall clock) is read partition after partition: a partition
    not read yet is not idle, so none of its frames become late."""
    w = RateWindows(window_s=60, grace_s=0, source_idle_s=10, idle_close_s=1000, wall_clock=lambda: 10**9)
    for src in (0, 1):
        w.register_source(src, 0.0)
    out = []
    for m in range(5):
        out += w.add(insp(m * MIN + US, cam="C0"), now=1.0 + m * 10, source=0)  # 40 s of partition 0 alone
    assert out == [] and w.tick(60.0) == []
    for m in range(5):
        out += w.add(insp(m * MIN + 2 * US, cam="C1"), now=61.0, source=1)
    assert w.late_frames == 0 and [_final(out)[(("L1", "", ""), m * MIN)].frames for m in range(4)] == [2] * 4
