"""Alert notifiers: a Slack-compatible incoming webhook and e-mail over SMTP, each its own consumer
group on ``alerts`` (``notify-webhook``, ``notify-smtp``).

Best-effort outputs (they never hold the line: the processors do not wait for them): a message is
sent when an alert opens and when it resolves, de-duplicated by (alert id, state); retries are
bounded with exponential backoff; a token bucket limits each channel; a notification that finally
fails, or is dropped by the rate limit, is logged with the alert id and counted.
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Protocol
from urllib.parse import quote

from infra.consume_loop import ConsumeLoop
from infra.kafka import Message
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import source_label
from schemas.serde import SchemaError, deserialize
from sinks.errors import NotifyError

log = logging.getLogger(__name__)

ALERT_PAGE = "/alerts?alert_id={id}"


def alert_link(dashboard_url: str, alert_id: str) -> str:
    return dashboard_url.rstrip("/") + ALERT_PAGE.format(id=quote(alert_id, safe=""))


def _t(us: int | None) -> str:
    return "-" if us is None else datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(alert: dict[str, Any], dashboard_url: str) -> tuple[str, str]:
    """(subject, body): what fired, where, the values, and the link to the alert's page."""
    where = f"line {alert['line_id']}" + (f" camera {alert['camera_id']}" if alert["camera_id"] else "") + (
        f" class {alert['class_name']}" if alert["class_name"] else "")
    state = alert["state"].upper()
    subject = f"[SQIS {state}] {alert['kind']} alert on {where}: {alert['rule']}"
    lines = [
        f"{state}: {alert['message'] or alert['rule']}",
        f"Rule: {alert['rule']} ({alert['kind']}), severity {alert['severity']}",
        f"Where: {where}",
        f"Window: {_t(alert['window_start'])} - {_t(alert['window_end'])}",
        f"Value: {alert['value']:.4g}" + (f" (centre {alert['center']:.4g}" if alert.get("center") is not None else "")
        + (f", UCL {alert['ucl']:.4g})" if alert.get("ucl") is not None else (")" if alert.get("center") is not None else "")),
    ]
    if alert["example_frame_ids"]:
        lines.append("Example frames: " + ", ".join(alert["example_frame_ids"][:5]))
    if alert["state"] == "resolved":
        lines.append(f"Resolved at {_t(alert['resolved_at'])}")
    lines.append(f"Alert {alert['alert_id']}: {alert_link(dashboard_url, alert['alert_id'])}")
    return subject, "\n".join(lines)


class Channel(Protocol):
    name: str

    def send(self, subject: str, body: str, alert: dict[str, Any]) -> None: ...


class WebhookChannel:
    """POST ``{"text": ...}`` (Slack incoming-webhook format, also understood by Mattermost/Teams relays)."""

    name = "webhook"

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def send(self, subject: str, body: str, alert: dict[str, Any]) -> None:
        payload = json.dumps({"text": f"*{subject}*\n{body}"}).encode()
        req = urllib.request.Request(self.url, data=payload, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - configured URL
                if not 200 <= resp.status < 300:
                    raise NotifyError(f"webhook answered HTTP {resp.status}")
        except urllib.error.HTTPError as exc:
            raise NotifyError(f"webhook answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise NotifyError(f"webhook unreachable: {exc}") from None


class SmtpChannel:
    """E-mail over SMTP: STARTTLS (default) or implicit TLS, optional AUTH login."""

    name = "smtp"

    def __init__(self, host: str, port: int, *, sender: str, recipients: list[str], starttls: bool = True,
                 use_ssl: bool = False, username: str | None = None, password: str | None = None,
                 timeout_s: float = 10.0) -> None:
        if not recipients:
            raise ValueError("SMTP notifier needs at least one recipient (SQIS_SMTP_TO)")
        self.host, self.port = host, port
        self.sender, self.recipients = sender, recipients
        self.starttls, self.use_ssl = starttls, use_ssl
        self.username, self.password = username, password
        self.timeout_s = timeout_s

    def send(self, subject: str, body: str, alert: dict[str, Any]) -> None:
        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = subject, self.sender, ", ".join(self.recipients)
        msg["X-SQIS-Alert-Id"] = alert["alert_id"]
        msg.set_content(body)
        ctx = ssl.create_default_context()
        try:
            if self.use_ssl:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout_s, context=ctx)
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
            with smtp:
                smtp.ehlo()
                if self.starttls and not self.use_ssl:
                    smtp.starttls(context=ctx)
                    smtp.ehlo()
                if self.username:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(msg)
        except (smtplib.SMTPException, OSError) as exc:
            raise NotifyError(f"smtp {self.host}:{self.port}: {exc}") from None


class TokenBucket:
    def __init__(self, rate_per_min: float, burst: float | None = None) -> None:
        self.rate = rate_per_min / 60.0
        self.capacity = burst if burst is not None else max(1.0, 2 * rate_per_min)
        self.tokens = self.capacity
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class NotifyStats:
    received: int = 0
    sent: int = 0
    retries: int = 0
    failed: int = 0
    duplicates: int = 0
    rate_limited: int = 0
    skipped_state: int = 0


class Notifier:
    """One channel on its own consumer group of ``alerts``."""

    def __init__(self, settings: Settings, channel: Channel, *, group_id: str | None = None,
                 states: tuple[str, ...] = ("open", "resolved"), attempts: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, rate_per_min: float | None = None, burst: float | None = None,
                 remember: int = 10_000) -> None:
        self.settings = settings
        self.channel = channel
        self.states = states
        self.attempts, self.backoff_s, self.max_backoff_s = max(1, attempts), backoff_s, max_backoff_s
        self.bucket = TokenBucket(rate_per_min or settings.notify_rate_per_min, burst)
        self.seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.remember = remember
        self.stats = NotifyStats()
        self.stop_event = threading.Event()
        group = group_id or f"notify-{channel.name}"
        self.loop = ConsumeLoop(settings, topics=[TopicCatalog(settings.topic_prefix).alerts], group_id=group,
                                client_id=f"{group}-{uuid.uuid4().hex[:6]}", on_batch=self._batch,
                                with_producer=False, batch_size=50, stop_event=self.stop_event)

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, max_idle_s: float | None = None) -> NotifyStats:
        self.loop.run(max_idle_s=max_idle_s)
        log.info("notifier stopped", extra={"channel": self.channel.name, **self.stats.__dict__})
        return self.stats

    def _batch(self, msgs: list[Message], _loop: Any) -> None:
        for m in msgs:
            try:
                alert = deserialize("alert", m.value(), m.headers())
            except SchemaError as exc:
                log.warning("undecodable alert skipped", extra={
                    "at": source_label(m.topic(), m.partition(), m.offset()), "error": str(exc)})
                continue
            self.handle(alert)

    def handle(self, alert: dict[str, Any]) -> bool:
        """Send one alert state if it is new and allowed; True when delivered."""
        self.stats.received += 1
        if alert["state"] not in self.states:
            self.stats.skipped_state += 1
            return False
        key = (alert["alert_id"], alert["state"])
        if key in self.seen:
            self.stats.duplicates += 1
            return False
        self.seen[key] = None
        while len(self.seen) > self.remember:
            self.seen.popitem(last=False)
        ids = {"alert_id": alert["alert_id"], "state": alert["state"], "channel": self.channel.name}
        if not self.bucket.take():
            self.stats.rate_limited += 1
            log.warning("notification dropped by the channel's rate limit", extra=ids)
            return False
        subject, body = render(alert, self.settings.dashboard_url)
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                self.channel.send(subject, body, alert)
                self.stats.sent += 1
                log.info("notification sent", extra={**ids, "attempt": attempt})
                return True
            except NotifyError as exc:
                if attempt == self.attempts or self.stop_event.is_set():
                    self.stats.failed += 1
                    log.error("notification failed", extra={**ids, "attempts": attempt, "error": str(exc)})
                    return False
                self.stats.retries += 1
                log.warning("notification attempt failed, retrying", extra={**ids, "attempt": attempt,
                                                                            "error": str(exc), "retry_in_s": delay})
                self.stop_event.wait(delay)
                delay = min(self.max_backoff_s, delay * 2)
        return False


def channel_from_settings(settings: Settings, kind: str) -> Channel:
    """The configured channel ``webhook`` or ``smtp``; ValueError naming the missing setting."""
    if kind == "webhook":
        if settings.notify_webhook_url is None:
            raise ValueError("no webhook: set SQIS_NOTIFY_WEBHOOK_URL")
        return WebhookChannel(settings.notify_webhook_url.get_secret_value())
    if kind == "smtp":
        if not settings.smtp_host:
            raise ValueError("no SMTP server: set SQIS_SMTP_HOST (and SQIS_SMTP_TO)")
        to = [x.strip() for x in (settings.smtp_to or "").split(",") if x.strip()]
        return SmtpChannel(settings.smtp_host, settings.smtp_port, sender=settings.smtp_from, recipients=to,
                           starttls=settings.smtp_starttls, use_ssl=settings.smtp_ssl, username=settings.smtp_username,
                           password=settings.smtp_password.get_secret_value() if settings.smtp_password else None)
    raise ValueError(f"unknown channel {kind!r}: use webhook or smtp")
