"""Pure micro-batching and in-order offset tracking; no Kafka, no clock of their own.

The worker feeds messages into a :class:`MicroBatcher` and asks it how long it may still block;
a batch closes when it is full (items or bytes) or when ``max_wait_ms`` has passed since its first
item. :class:`OffsetTracker` turns out-of-order acknowledgements into the contiguous offsets
that are safe to store (offset ``o`` only once every consumed offset ``<= o`` is acknowledged).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

Clock = Callable[[], float]  # seconds, monotonic


@dataclass
class Batch(Generic[T]):
    """A closed batch with when it opened and closed (by the batcher's clock) and why."""

    items: list[T]
    nbytes: int
    opened_at: float
    closed_at: float
    reason: str  # "size" | "bytes" | "wait" | "flush"

    def __len__(self) -> int:
        return len(self.items)


class MicroBatcher(Generic[T]):
    """Groups items into batches of at most ``max_size`` items and ``max_bytes`` bytes.

    A single item larger than ``max_bytes`` forms a batch of its own (it is never dropped).
    ``max_wait_ms`` is measured from the first item of the batch; call :meth:`poll` at or
    before :meth:`time_left` runs out (after adding what arrived meanwhile) so that no batch
    waits longer.
    """

    def __init__(self, max_size: int, max_wait_ms: float, max_bytes: int | None = None,
                 clock: Clock = time.monotonic) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1 or None")
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_bytes = max_bytes
        self.clock = clock
        self._items: list[T] = []
        self._sizes: list[int] = []
        self._nbytes = 0
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def pending(self) -> list[T]:
        """The items of the open batch (a copy)."""
        return list(self._items)

    @property
    def room(self) -> int:
        """How many more items the open batch takes before it is full."""
        return self.max_size - len(self._items)

    def time_left(self) -> float | None:
        """Seconds until the open batch is due; None when no batch is open."""
        if self._opened_at is None:
            return None
        return max(0.0, self._opened_at + self.max_wait_s - self.clock())

    def add(self, item: T, nbytes: int = 0) -> list[Batch[T]]:
        """Add one item; returns the batches this closed on size or bytes (0, 1 or 2), oldest first.

        The wait is not checked here: an item that arrived before the batch was closed joins it.
        Add everything one consume returned, then call :meth:`poll` to close the batch if it is due.
        """
        out: list[Batch[T]] = []
        if self.max_bytes is not None and self._items and self._nbytes + nbytes > self.max_bytes:
            out.append(self._close("bytes"))
        if not self._items:
            self._opened_at = self.clock()
        self._items.append(item)
        self._sizes.append(nbytes)
        self._nbytes += nbytes
        if len(self._items) >= self.max_size:
            out.append(self._close("size"))
        elif self.max_bytes is not None and self._nbytes >= self.max_bytes:
            out.append(self._close("bytes"))
        return out

    def poll(self) -> Batch[T] | None:
        """The open batch if its wait is over, else None."""
        if self._opened_at is not None and self.clock() >= self._opened_at + self.max_wait_s:
            return self._close("wait")
        return None

    def flush(self) -> Batch[T] | None:
        """Close the open batch now (shutdown); None when empty."""
        return self._close("flush") if self._items else None

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the pending items matching ``predicate`` (e.g. revoked partitions)."""
        keep = [(i, s) for i, s in zip(self._items, self._sizes, strict=True) if not predicate(i)]
        dropped = [i for i in self._items if predicate(i)]
        if dropped:
            self._items = [i for i, _ in keep]
            self._sizes = [s for _, s in keep]
            self._nbytes = sum(self._sizes)
            if not self._items:
                self._opened_at = None
        return dropped

    def _close(self, reason: str) -> Batch[T]:
        assert self._opened_at is not None
        b = Batch(self._items, self._nbytes, self._opened_at, self.clock(), reason)
        self._items, self._sizes, self._nbytes, self._opened_at = [], [], 0, None
        return b


@dataclass
class _PartitionOffsets:
    consumed: dict[int, bool] = field(default_factory=dict)  # offset -> acknowledged, insertion order
    committable: int | None = None  # next offset to consume (last contiguous acked + 1)
    last: int = -1  # highest offset tracked


class OffsetTracker(Generic[K]):
    """Per-partition bookkeeping: consumed offsets in order, acknowledged ones, the safe offset.

    ``track`` each message when consumed, ``ack`` it when its result is delivered; ``ready``
    returns, per partition, the next offset to consume (``last contiguous acked + 1``) when it
    advanced since the last call.
    """

    def __init__(self) -> None:
        self._parts: dict[K, _PartitionOffsets] = {}
        self._reported: dict[K, int] = {}

    def track(self, part: K, offset: int) -> None:
        p = self._parts.setdefault(part, _PartitionOffsets())
        if offset in p.consumed:
            return
        if offset < p.last:
            raise ValueError(f"offset {offset} of {part} tracked out of order")
        p.consumed[offset] = False
        p.last = offset

    def ack(self, part: K, offset: int) -> None:
        p = self._parts.get(part)
        if p is None or offset not in p.consumed:
            return  # partition revoked/forgotten meanwhile: ignore
        p.consumed[offset] = True
        while p.consumed:
            first = next(iter(p.consumed))
            if not p.consumed[first]:
                break
            del p.consumed[first]
            p.committable = first + 1

    def untrack_from(self, part: K, offset: int) -> list[int]:
        """Forget consumed offsets >= ``offset`` (they will be consumed again after a seek)."""
        p = self._parts.get(part)
        if p is None:
            return []
        gone = [o for o in p.consumed if o >= offset]
        for o in gone:
            del p.consumed[o]
        p.last = min(p.last, offset - 1)
        return gone

    def ready(self) -> dict[K, int]:
        """Partitions whose committable offset advanced since the last call -> that offset."""
        out = {}
        for part, p in self._parts.items():
            if p.committable is not None and self._reported.get(part) != p.committable:
                out[part] = p.committable
                self._reported[part] = p.committable
        return out

    def last(self, part: K) -> int | None:
        """The highest offset tracked for ``part`` (None when nothing is)."""
        p = self._parts.get(part)
        return p.last if p is not None and p.last >= 0 else None

    def first_unacked(self, part: K) -> int | None:
        """The lowest consumed offset of ``part`` whose result is not acknowledged yet."""
        p = self._parts.get(part)
        if p is None:
            return None
        return next((o for o, acked in p.consumed.items() if not acked), None)

    def committable(self, part: K) -> int | None:
        p = self._parts.get(part)
        return p.committable if p else None

    def in_flight(self, parts: Iterable[K] | None = None) -> int:
        """Consumed but not yet acknowledged messages (of ``parts``, or of all partitions)."""
        keys = self._parts.keys() if parts is None else [k for k in parts if k in self._parts]
        return sum(1 for k in keys for acked in self._parts[k].consumed.values() if not acked)

    def forget(self, parts: Iterable[K]) -> None:
        """Drop the state of revoked or lost partitions."""
        for part in parts:
            self._parts.pop(part, None)
            self._reported.pop(part, None)

    def partitions(self) -> list[K]:
        return list(self._parts)
