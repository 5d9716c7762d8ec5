"""Micro-batcher and offset tracker: pure logic, no broker, an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_workers.batching import Batch, MicroBatcher, OffsetTracker


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# One step: wait dt seconds (capped by the batcher's deadline, as the worker's poll timeout is),
# then maybe add an item of some byte size.
steps = st.lists(
    st.tuples(st.floats(min_value=0, max_value=0.2, allow_nan=False), st.one_of(st.none(), st.integers(0, 5000))),
    max_size=200,
)


def _drive(batcher: MicroBatcher[int], clock: FakeClock, plan: list[tuple[float, int | None]]) -> tuple[list[Batch[int]], list[int]]:
    """Run the worker's loop against the batcher; returns the closed batches and the items added."""
    out: list[Batch[int]] = []
    added: list[int] = []
    for dt, nbytes in plan:
        left = batcher.time_left()
        clock.t += dt if left is None else min(dt, left)  # a poll never blocks past the deadline
        if nbytes is not None:  # what the consume returned joins first, then the due batch closes
            item = len(added)
            added.append(item)
            out += batcher.add(item, nbytes)
        due = batcher.poll()
        if due is not None:
            out.append(due)
    last = batcher.flush()
    if last is not None:
        out.append(last)
    return out, added


@settings(max_examples=300, deadline=None)
@given(plan=steps, max_size=st.integers(1, 16), max_wait_ms=st.floats(0, 100, allow_nan=False),
       max_bytes=st.one_of(st.none(), st.integers(1, 8000)))
def test_batches_respect_size_wait_order_and_lose_nothing(plan, max_size, max_wait_ms, max_bytes):
    clock = FakeClock()
    b: MicroBatcher[int] = MicroBatcher(max_size, max_wait_ms, max_bytes=max_bytes, clock=clock)
    batches, added = _drive(b, clock, plan)
    sizes = dict(zip(added, [n for _, n in plan if n is not None], strict=True))

    flat = [i for batch in batches for i in batch.items]
    assert flat == added  # order preserved, nothing lost, nothing duplicated
    for batch in batches:
        assert 1 <= len(batch) <= max_size
        assert batch.closed_at - batch.opened_at <= max_wait_ms / 1000.0 + 1e-9
        assert batch.nbytes == sum(sizes[i] for i in batch.items)
        if max_bytes is not None and len(batch) > 1:
            assert batch.nbytes <= max_bytes  # only a lone oversized item may exceed it
    assert len(b) == 0


def test_closes_on_size_then_on_wait():
    clock = FakeClock()
    b: MicroBatcher[str] = MicroBatcher(3, 50, clock=clock)
    assert b.add("a") == [] and b.add("b") == []
    full = b.add("c")
    assert [x.items for x in full] == [["a", "b", "c"]] and full[0].reason == "size"
    assert b.time_left() is None
    b.add("d")
    clock.t += 0.049
    assert b.poll() is None
    assert b.time_left() == pytest.approx(0.001)
    clock.t += 0.001
    due = b.poll()
    assert due is not None and due.items == ["d"] and due.reason == "wait"


def test_item_that_arrived_before_the_close_joins_the_batch():
    # the worker's consume returns at the deadline with what arrived meanwhile: it joins, then poll() closes
    clock = FakeClock()
    b: MicroBatcher[str] = MicroBatcher(8, 50, clock=clock)
    assert b.add("m1") == []
    clock.t += 0.0501
    assert b.add("m2") == []
    due = b.poll()
    assert due is not None and due.items == ["m1", "m2"] and due.reason == "wait"
    assert len(b) == 0 and b.time_left() is None


def test_bytes_limit_and_oversized_item():
    b: MicroBatcher[str] = MicroBatcher(10, 1000, max_bytes=100, clock=FakeClock())
    assert b.add("a", 60) == []
    out = b.add("b", 60)  # would exceed: "a" leaves alone
    assert [x.items for x in out] == [["a"]] and out[0].reason == "bytes"
    out = b.add("huge", 500)  # "b" leaves, then "huge" alone is already over the limit
    assert [x.items for x in out] == [["b"], ["huge"]]


def test_drop_removes_only_matching_items():
    clock = FakeClock()
    b: MicroBatcher[tuple[int, int]] = MicroBatcher(10, 100, clock=clock)
    for p, o in [(0, 1), (1, 1), (0, 2), (1, 2)]:
        b.add((p, o))
    assert b.drop(lambda m: m[0] == 1) == [(1, 1), (1, 2)]
    assert b.pending == [(0, 1), (0, 2)]
    b.drop(lambda m: True)
    assert len(b) == 0 and b.time_left() is None


def test_rejects_bad_limits():
    with pytest.raises(ValueError):
        MicroBatcher(0, 10)
    with pytest.raises(ValueError):
        MicroBatcher(1, -1)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_offset_tracker_stores_only_contiguous_acked(n, data):
    offsets = sorted(data.draw(st.sets(st.integers(0, 1000), min_size=n, max_size=n)))
    order = data.draw(st.permutations(offsets))
    t: OffsetTracker[int] = OffsetTracker()
    for o in offsets:
        t.track(0, o)
    acked: set[int] = set()
    last = None
    for o in order:
        t.ack(0, o)
        acked.add(o)
        ready = t.ready()
        # expected: one past the longest acknowledged prefix of the consumed offsets
        prefix = 0
        while prefix < len(offsets) and offsets[prefix] in acked:
            prefix += 1
        expect = offsets[prefix - 1] + 1 if prefix else None
        assert t.committable(0) == expect
        if expect is not None and expect != last:
            assert ready == {0: expect}
            last = expect
        else:
            assert ready == {}
    assert t.in_flight() == 0
    assert last == offsets[-1] + 1


def test_offset_tracker_partitions_untrack_and_forget():
    t: OffsetTracker[tuple[str, int]] = OffsetTracker()
    a, b = ("f", 0), ("f", 1)
    for o in (10, 11, 12):
        t.track(a, o)
    t.track(b, 5)
    t.ack(a, 11)
    assert t.ready() == {} and t.in_flight() == 3
    t.ack(a, 10)
    assert t.ready() == {a: 12}
    assert t.untrack_from(a, 12) == [12]
    assert t.in_flight([a]) == 0 and t.in_flight([b]) == 1
    t.forget([b])
    t.ack(b, 5)  # a late ack after revocation is ignored
    assert t.ready() == {} and t.partitions() == [a]
    with pytest.raises(ValueError):
        t.track(a, 3)
