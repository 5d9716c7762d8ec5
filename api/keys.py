"""API keys: ``sqis_<key_id>_<secret>``, scoped, hashed at rest in PostgreSQL (table ``api_keys``).

The secret is 32 random bytes, so an unsalted SHA-256 of it is as good as a slow hash (nothing to
brute-force) and cheap enough to check on every request. Only the key id ever reaches a log.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SCOPES = ("ingest", "inspect", "read")
_KEY = re.compile(r"^sqis_([a-z0-9]{8,32})_([A-Za-z0-9_-]{20,100})$")


class KeyRequestError(ValueError):
    """A key that cannot be minted (unknown scope, bad name)."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    scopes: frozenset[str]
    rate_per_s: float | None = None
    burst: int | None = None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    m = _KEY.match(presented.strip())
    return (m.group(1), m.group(2)) if m else None


def check_scopes(scopes: Iterable[str]) -> list[str]:
    out = sorted({s.strip() for s in scopes if s.strip()})
    bad = [s for s in out if s not in SCOPES]
    if bad or not out:
        raise KeyRequestError(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(out) or 'none'}")
    return out


def create_key(conn: Any, name: str, scopes: Sequence[str], *, rate_per_s: float | None = None,
               burst: int | None = None) -> tuple[ApiKey, str]:
    """Mint a key; returns it and the full secret string (shown once, never stored)."""
    sc = check_scopes(scopes)
    if not name.strip():
        raise KeyRequestError("a key needs a name (who or what uses it)")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    conn.execute("INSERT INTO api_keys (key_id, name, scopes, key_hash, rate_per_s, burst) VALUES (%s, %s, %s, %s, %s, %s)",
                 (key_id, name, sc, hash_secret(secret), rate_per_s, burst))
    return ApiKey(key_id, name, frozenset(sc), rate_per_s, burst), f"sqis_{key_id}_{secret}"


def revoke_key(conn: Any, key_id: str) -> bool:
    cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL", (key_id,))
    return bool(cur.rowcount)


def list_keys(conn: Any) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT key_id, name, scopes, rate_per_s, burst, created_at, revoked_at FROM api_keys "
                        "ORDER BY created_at").fetchall()
    cols = ("key_id", "name", "scopes", "rate_per_s", "burst", "created_at", "revoked_at")
    return [dict(zip(cols, r, strict=True)) for r in rows]


class KeyStore:
    """Verifies presented keys against PostgreSQL, remembering each answer for ``cache_s`` seconds."""

    def __init__(self, pool: Any, cache_s: float = 10.0) -> None:
        self.pool = pool
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}  # key hash -> (until, key or None)
        self._lock = threading.Lock()

    def verify(self, presented: str) -> ApiKey | None:
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        digest = hash_secret(secret)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        with self.pool.connection() as conn:
            row = conn.execute("SELECT name, scopes, key_hash, rate_per_s, burst FROM api_keys "
                               "WHERE key_id = %s AND revoked_at IS NULL", (key_id,)).fetchone()
        key = None
        if row is not None and hmac.compare_digest(row[2], digest):
            key = ApiKey(key_id, row[0], frozenset(row[1]), row[3], row[4])
        with self._lock:
            if len(self._cache) > 10_000:  # wrong keys must not grow it without bound
                self._cache.clear()
            self._cache[digest] = (now + self.cache_s, key)
        return key
