"""The pure helper of ``sqis bench lifecycle`` (the loop itself is a benchmark, not a test)."""

from __future__ import annotations

from sqis.bench.lifecycle import simulated_reviews


def test_the_simulated_operator_reviews_fail_frames_from_the_ground_truth() -> None:
    cands = [{"frame_id": f"f{i}", "verdict": "FAIL" if i % 2 else "PASS"} for i in range(20)]
    truth = {f"f{i}": ([("scratch", 1, 1, 5, 5)] if i % 4 == 1 else []) for i in range(20)}
    truth["f19"] = None  # not a synthetic frame: no ground truth, never reviewed
    everything = simulated_reviews(cands, truth, 1.0, seed=0)
    assert [f for f, _ in everything] == sorted(f"f{i}" for i in range(1, 19, 2))  # the FAIL frames only
    assert dict(everything)["f1"] == "confirmed" and dict(everything)["f3"] == "false_reject"
    half = simulated_reviews(cands, truth, 0.5, seed=7)
    assert len(half) == round(9 * 0.5) and set(half) <= set(everything)
    assert half == simulated_reviews(cands, truth, 0.5, seed=7)  # deterministic by seed
    assert simulated_reviews(cands, truth, 0.0, seed=7) == []
