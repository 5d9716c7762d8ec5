"""The grammar of the size/score verdict rules an Inspection records in ``verdict_rules``.

``METRIC OP VALUE[:CLASS]``, e.g. ``length_mm>2:scratch``; a contract shared by the settings that
configure the rules (validated at start) and the worker stage that applies them.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["METRICS", "SizeRule", "parse_rules"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
METRICS = ("score", "area_mm2", "length_mm", "area_px", "length_px")
_RULE = re.compile(r"^\s*(?P<metric>[a-z0-9_]+)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>[-+0-9.eE]+)\s*(?::\s*(?P<cls>.+?))?\s*$")


@dataclass(frozen=True)
class SizeRule:
    metric: str
    op: str
    value: float
    class_name: str | None = None  # None: every class

    @classmethod
    def parse(cls, text: str) -> SizeRule:
        m = _RULE.match(text)
        if not m or m["metric"] not in METRICS:
            raise ValueError(f"verdict rule {text!r}: expected METRIC OP VALUE[:CLASS], METRIC one of {', '.join(METRICS)}")
        try:
            value = float(m["value"])
        except ValueError:
            raise ValueError(f"verdict rule {text!r}: {m['value']!r} is not a number") from None
        return cls(m["metric"], m["op"], value, m["cls"] or None)

    def applies_to(self, class_name: str) -> bool:
        return self.class_name is None or self.class_name == class_name

    def holds(self, det: Mapping[str, Any]) -> bool | None:
        """True/False, or None when the metric is unknown for this detection (no pixel size)."""
        v = det.get(self.metric)
        if v is None:
            return None
        return _OPS[self.op](float(v), self.value)

    def __str__(self) -> str:
        v = f"{self.value:g}"
        return f"{self.metric}{self.op}{v}" + (f":{self.class_name}" if self.class_name else "")


def parse_rules(rules: Sequence[str] | str | None) -> list[SizeRule]:
    if not rules:
        return []
    items = [r for r in rules.split(",")] if isinstance(rules, str) else list(rules)
    return [SizeRule.parse(r) for r in items if r.strip()]
