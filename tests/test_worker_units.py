"""Worker pieces without a broker: the shared per-class threshold syntax, per-worker metrics."""

from __future__ import annotations

import re

import pytest

from inference_workers.detector import Thresholds
from inference_workers.worker import PartitionState, WorkerMetrics


@pytest.mark.parametrize("values, expected", [
    (["scratch=0.4"], {"scratch": 0.4}),
    (["scratch=0.4,dent=0.5"], {"scratch": 0.4, "dent": 0.5}),
    (["scratch=0.4", "dent=0.5,spot=1"], {"scratch": 0.4, "dent": 0.5, "spot": 1.0}),
    (None, {}),
])
def test_worker_and_eval_take_the_same_per_class_syntax(values, expected) -> None:  # type: ignore[no-untyped-def]
    from inference_workers.cli import _parse_class_scores
    from training.cli import _parse_per_class

    assert _parse_class_scores(values) == expected == _parse_per_class(values)


@pytest.mark.parametrize("bad, why", [("scratch", "expected NAME=SCORE"), ("=0.3", "expected NAME=SCORE"),
                                      ("scratch=x", "expected NAME=SCORE"), ("scratch=1.5", "SCORE must be within [0, 1]")])
def test_bad_per_class_thresholds_name_the_flag(bad: str, why: str) -> None:
    from inference_workers.cli import _parse_class_scores
    from infra.cli_common import UserError
    from training.cli import _parse_per_class

    with pytest.raises(UserError, match=re.escape(f"--class-score {bad!r}: {why}")):
        _parse_class_scores([bad])
    with pytest.raises(UserError, match="--class-conf"):
        _parse_per_class([bad])
    with pytest.raises(ValueError):
        Thresholds.parse_per_class(bad)


def test_each_worker_has_its_own_metrics() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.frames.labels("inspected").inc(3)
    b.frames.labels("inspected").inc()
    assert a.registry.get_sample_value("sqis_worker_frames_total", {"outcome": "inspected"}) == 3
    assert b.registry.get_sample_value("sqis_worker_frames_total", {"outcome": "inspected"}) == 1


def test_partition_state_backoff_and_retry_counting() -> None:
    st = PartitionState(("frames", 3))
    assert [st.next_backoff(0.5, 4.0) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [st.count_retry(7), st.count_retry(7), st.count_retry(9)] == [1, 2, 1]
    assert st.label == "frames[3]" and not st.want_paused(0.0)
    st.resume_at = 10.0
    assert st.want_paused(5.0) and not st.want_paused(11.0)
    st.flow_paused = True
    assert st.want_paused(11.0)
