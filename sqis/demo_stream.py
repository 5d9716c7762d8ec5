"""The stream processors in `sqis demo`: the scenario, the child processes, the alert
lines of the summary (here, not in stream_processors/, which may not import the producers).

The demo's line is small (a few frames a second), so its windows are 10 s and the warm-up one
minute; the rules are the production defaults (docs/DESIGN.md, "Stream processors").
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

RISE_AFTER_S = 150.0  # line-1's defect rate rises after 2.5 minutes ...
RISE_RATE = 0.9
LIGHT_AFTER_S = 90.0  # ... and cam-02's lamp fades to 55 % over 20 s after 1.5 minutes
LIGHT_FACTOR = 0.55
LIGHT_RAMP_S = 20.0

STREAM_ARGS = ["--window-s", "10", "--grace-s", "5", "--warmup-points", "6", "--min-n", "20",
               "--drift-ref-points", "6", "--drift-min-n", "10", "--expected-views", "2", "--part-timeout-s", "20"]


def scenario(lines: int, cameras: int) -> Any:
    """Parts seen by 2 cameras (when a line has 2+), line-1's rate rising, cam-02's lighting fading."""
    from producers.run import Scenario

    views = 2 if cameras >= 2 * lines else 1
    return Scenario(views_per_part=views, rise_line="line-1", rise_after_s=RISE_AFTER_S, rise_rate=RISE_RATE,
                    light_camera="cam-02" if cameras >= 2 else None, light_after_s=LIGHT_AFTER_S,
                    light_factor=LIGHT_FACTOR, light_ramp_s=LIGHT_RAMP_S)


def children(state_dir: str, env: dict[str, str], logs_dir: Path, child_cls: Any) -> list[Any]:
    """`sqis stream run` (all four processors), `sqis sink stream-tables`, `sqis sink objects`, and a
    notifier per channel configured in the environment (SQIS_NOTIFY_WEBHOOK_URL, SQIS_SMTP_HOST)."""
    out = [child_cls("stream-processors", ["stream", "run", "--state-dir", state_dir, *STREAM_ARGS], env, logs_dir),
           child_cls("sink-stream-tables", ["sink", "stream-tables", "--state-dir", state_dir], env, logs_dir),
           child_cls("sink-objects", ["sink", "objects", "--state-dir", state_dir, "--flush-s", "30"], env, logs_dir)]
    for channel, var in (("webhook", "SQIS_NOTIFY_WEBHOOK_URL"), ("smtp", "SQIS_SMTP_HOST")):
        if env.get(var):
            out.append(child_cls(f"notify-{channel}", ["sink", "notify", "--channel", channel, "--state-dir", state_dir],
                                 env, logs_dir))
    return out


def intro() -> str:
    return (f"scenario: line-1's defect rate rises to {RISE_RATE:.0%} after {RISE_AFTER_S:g} s (SPC alert); "
            f"cam-02's lighting fades to {LIGHT_FACTOR:.0%} after {LIGHT_AFTER_S:g} s (drift alert)")


def alert_lines(settings: Any, since: datetime, limit: int = 10) -> list[str]:
    """The run's alerts, part verdicts and object-store outputs for the summary (errors as one line)."""
    from infra.db import connect

    dsn = settings.dsn()
    try:
        with connect(dsn, autocommit=True, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT opened_at, kind, rule, state, line_id, camera_id, message FROM alerts WHERE opened_at >= %s "
                "ORDER BY opened_at LIMIT %s", (since, limit)).fetchall()
            parts = dict(conn.execute("SELECT verdict, count(*) FROM part_verdicts WHERE first_seen_at >= %s "
                                      "GROUP BY 1", (since,)).fetchall())
    except Exception as exc:  # the summary must not fail on a database hiccup
        return [f"alerts: cannot read them ({type(exc).__name__}: {exc})"]
    out = [f"alerts ({len(rows)})" + ("" if rows else ": none fired (the rise needs "
                                                      f"{RISE_AFTER_S:g} s and the drift {LIGHT_AFTER_S:g} s)")]
    for at, kind, rule, state, line, cam, msg in rows:
        out.append(f"  {at:%H:%M:%S} {kind:<9} {state:<12} {line}{'/' + cam if cam else ''}  {rule}: {msg}")
    out.append("part verdicts: " + (", ".join(f"{k} {v}" for k, v in sorted(parts.items())) or "none"))
    try:
        from infra.objectstore import open_store

        store = open_store(settings)
        n_over, n_arch = len(store.list("overlays")), len(store.list("archive"))
        out.append(f"object store: {n_over} overlay images, {n_arch} Parquet archive file(s) in {store.url}")
    except Exception as exc:  # noqa: BLE001 - a summary line, not a failure
        out.append(f"object store: cannot list it ({type(exc).__name__})")
    return out
