"""Notifiers against real local receivers on real HTTP and SMTP: fail first, then accept; retries,
de-duplication by alert id, rate limit, and the message content (what fired, where, link)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from infra.kafka import producer
from schemas.catalog import TopicCatalog
from schemas.serde import serialize
from sinks.notify import Notifier, SmtpChannel, WebhookChannel, alert_link
from stream_processors.alerts import AlertManager


def _alerts(n: int, line: str = "line-1") -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        m = AlertManager()
        out.append(m.fire(("spc", line, "", ""), rule="run_2of2_beyond_3sigma", window_start_us=i * 60_000_000,
                          window_end_us=(i + 1) * 60_000_000, value=0.08, center=0.02, lcl=0.0, ucl=0.05,
                          message=f"line {line}: defect rate 8.00 %", examples=("frame-a", "frame-b"))[0].to_avro())
    return out


def _produce(s: Any, alerts: list[dict[str, Any]]) -> None:
    p = producer(s, client_id="test-alerts", idempotent=False)
    for a in alerts:
        value, headers = serialize("alert", a)
        p.produce(TopicCatalog(s.topic_prefix).alerts, value=value, key=a["alert_id"].encode(), headers=headers)
    assert p.flush(30) == 0


class FlakyReceiver:
    """An HTTP server answering 503 to the first ``fail`` requests, then 200; records the bodies."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls = 0
        self.accepted: list[dict[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls += 1
                if outer.calls <= outer.fail:
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.accepted.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_retries_until_the_receiver_accepts_and_dedups(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory(dashboard_url="http://dash.example:8050/")
    recv = FlakyReceiver(fail=2)
    try:
        a = _alerts(1)[0]
        _produce(s, [a, a])  # a redelivery of the same alert state
        n = Notifier(s, WebhookChannel(recv.url), group_id=f"n-{unique_id}", backoff_s=0.05)
        stats = n.run(max_idle_s=4)
    finally:
        recv.close()
    assert (stats.sent, stats.retries, stats.duplicates, stats.failed) == (1, 2, 1, 0)
    assert recv.calls == 3 and len(recv.accepted) == 1
    text = recv.accepted[0]["text"]
    assert "run_2of2_beyond_3sigma" in text and "line line-1" in text and "frame-a" in text
    assert f"http://dash.example:8050/alerts?alert_id={a['alert_id']}" in text


def test_a_receiver_that_stays_down_is_counted_and_does_not_block(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory()
    recv = FlakyReceiver(fail=10**6)
    try:
        _produce(s, _alerts(2))
        n = Notifier(s, WebhookChannel(recv.url), group_id=f"n-{unique_id}", attempts=3, backoff_s=0.01)
        stats = n.run(max_idle_s=4)
    finally:
        recv.close()
    assert (stats.sent, stats.failed, stats.retries) == (0, 2, 4)
    assert n.loop.consumed == 2  # both alerts consumed (and committed): the group moved on


def test_rate_limit_per_channel_drops_and_counts(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory()
    recv = FlakyReceiver(fail=0)
    try:
        _produce(s, _alerts(4))
        n = Notifier(s, WebhookChannel(recv.url), group_id=f"n-{unique_id}", rate_per_min=1, burst=2)
        stats = n.run(max_idle_s=4)
    finally:
        recv.close()
    assert (stats.sent, stats.rate_limited) == (2, 2) and len(recv.accepted) == 2


def test_smtp_with_auth_retries_after_a_temporary_refusal(settings_factory: Any, unique_id: str) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    got: list[Any] = []
    calls = {"n": 0}

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            calls["n"] += 1
            if calls["n"] == 1:
                return "451 4.3.0 try again later"
            got.append((session.authenticated, envelope.rcpt_tos, envelope.content.decode()))
            return "250 OK"

    def auth(_server: Any, _session: Any, _envelope: Any, mechanism: str, data: Any) -> AuthResult:
        return AuthResult(success=data.login == b"sqis" and data.password == b"secret")

    from infra.stack import free_port

    port = free_port()
    ctl = Controller(Handler(), hostname="127.0.0.1", port=port, authenticator=auth, auth_require_tls=False)
    ctl.start()
    try:
        s = settings_factory()
        a = _alerts(1, line="line-7")[0]
        _produce(s, [a])
        ch = SmtpChannel("127.0.0.1", port, sender="sqis@plant", recipients=["qa@plant"], starttls=False,
                         username="sqis", password="secret")
        stats = Notifier(s, ch, group_id=f"n-{unique_id}", backoff_s=0.05).run(max_idle_s=4)
    finally:
        ctl.stop()
    assert (stats.sent, stats.retries) == (1, 1) and calls["n"] == 2
    authed, rcpts, content = got[0]
    assert authed and rcpts == ["qa@plant"]
    import email
    from email import policy

    msg = email.message_from_string(content, policy=policy.default)
    assert msg["Subject"].startswith("[SQIS OPEN] spc alert on line line-7")
    assert msg["X-SQIS-Alert-Id"] == a["alert_id"]
    assert alert_link("http://127.0.0.1:8050", a["alert_id"]) in msg.get_content()


def test_channel_settings_errors_name_the_setting(settings_factory: Any) -> None:
    from sinks.notify import channel_from_settings

    s = settings_factory(create_topics=False)
    with pytest.raises(ValueError, match="SQIS_NOTIFY_WEBHOOK_URL"):
        channel_from_settings(s, "webhook")
    with pytest.raises(ValueError, match="SQIS_SMTP_HOST"):
        channel_from_settings(s, "smtp")
