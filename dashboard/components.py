"""Small building blocks shared by the pages: number formats, KPI cards, tables, the chart theme.

Every user-visible value goes into a component as a plain string child, which React renders as
text: a comment such as ``<b>x</b>`` shows its angle brackets, it never becomes markup."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dash import dcc, html

from dashboard.queries import Filters

GRAPH_CONFIG = {"displaylogo": False, "responsive": True}
COLORS = {"p": "#1f5fa8", "limit": "#c0392b", "center": "#2e7d32", "rule": "#d35400"}


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100.0 * x:.{digits}f} %"


def ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f} ms"


def when(t: datetime | None) -> str:
    return "—" if t is None else t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def num(x: float | int | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def kpi(label: str, value: str, sub: str | None = None, tone: str = "", id_: str | None = None) -> html.Div:
    kw: dict[str, Any] = {"id": id_} if id_ else {}
    return html.Div([html.Div(label, className="kpi-label"), html.Div(value, className="kpi-value"),
                     html.Div(sub or "", className="kpi-sub")], className=f"kpi {tone}".strip(), **kw)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None,
          id_: str | None = None) -> html.Table:
    kw: dict[str, Any] = {"id": id_} if id_ else {}
    body = [html.Tr([html.Td(c) for c in r], className=(row_classes[i] if row_classes else None) or None)
            for i, r in enumerate(rows)]
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in headers])), html.Tbody(body)],
                      className="grid", **kw)


def link(text: str, path: str, f: Filters, **extra: str) -> dcc.Link:
    """A link to another view that keeps the filters (and adds page parameters such as frame=ID)."""
    from urllib.parse import urlencode

    q = f.to_query()
    if extra:
        q = (q + "&" if q else "?") + urlencode(extra)
    return dcc.Link(text, href=path + q)


def empty(text: str) -> html.Div:
    return html.Div(text, className="empty")


def base_layout(title: str) -> dict[str, Any]:
    return {"title": {"text": title, "font": {"size": 14}}, "margin": {"l": 50, "r": 20, "t": 36, "b": 40},
            "paper_bgcolor": "#ffffff", "plot_bgcolor": "#fafbfc", "height": 320,
            "legend": {"orientation": "h", "y": -0.2}, "uirevision": "keep"}
