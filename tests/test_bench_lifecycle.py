"""The pure helpers of ``sqis bench lifecycle`` (the loop itself is a benchmark, not a test)."""

from __future__ import annotations

from sqis.bench.lifecycle import operator_decision, simulated_reviews


def _box(c: str, x: float) -> dict[str, object]:
    return {"class_name": c, "x1": x, "y1": 0.0, "x2": x + 10, "y2": 10.0}


def test_the_operator_confirms_only_frames_whose_defects_are_all_boxed() -> None:
    assert operator_decision([_box("dent", 0)], []) == "false_reject"  # no defect on the part
    assert operator_decision([_box("dent", 1)], [_box("dent", 0)]) == "confirmed"
    assert operator_decision([_box("dent", 1)], [_box("dent", 0), _box("scratch", 50)]) is None  # one missed
    assert operator_decision([_box("spot", 0)], [_box("dent", 0)]) is None  # the wrong class
    assert operator_decision([_box("dent", 9)], [_box("dent", 0)]) is None  # not on it (IoU 1/19)
    assert operator_decision([_box("dent", 0)], None) is None  # no ground truth: not a synthetic frame


def test_simulated_reviews_are_a_seeded_share_of_the_fail_frames() -> None:
    cands = [{"frame_id": f"f{i}", "verdict": "FAIL" if i % 2 else "PASS", "boxes": [_box("dent", 0)]}
             for i in range(20)]
    truth = {f"f{i}": ([_box("dent", 0)] if i % 4 == 1 else []) for i in range(20)}
    truth["f19"] = None
    everything = simulated_reviews(cands, truth, 1.0, seed=0)
    assert [f for f, _ in everything] == sorted(f"f{i}" for i in range(1, 19, 2))  # FAIL frames with a truth
    assert dict(everything)["f1"] == "confirmed" and dict(everything)["f3"] == "false_reject"
    half = simulated_reviews(cands, truth, 0.5, seed=7)
    assert set(half) <= set(everything) and 3 <= len(half) <= 5
    assert half == simulated_reviews(cands, truth, 0.5, seed=7)  # deterministic by seed
    assert simulated_reviews(cands, truth, 0.0, seed=7) == []
