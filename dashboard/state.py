"""What the page callbacks share in one dashboard process: the connection pool, the object store and
the settings. Set once by ``dashboard.app.create_app``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from psycopg import Connection
from psycopg_pool import ConnectionPool

from dashboard.settings import DashboardSettings
from infra.objectstore import FileStore, S3Store
from infra.settings import Settings


@dataclass
class Services:
    settings: Settings
    dash_settings: DashboardSettings
    pool: ConnectionPool
    store: FileStore | S3Store


_services: Services | None = None


def install(services: Services) -> None:
    global _services
    _services = services


def services() -> Services:
    if _services is None:
        raise RuntimeError("the dashboard is not set up (dashboard.app.create_app)")
    return _services


@contextmanager
def db() -> Iterator[Connection[Any]]:
    """A pooled autocommit connection (writes open their own transaction)."""
    with services().pool.connection() as conn:
        yield conn


def make_pool(dsn: str, size: int) -> ConnectionPool:
    def configure(conn: Connection[Any]) -> None:
        conn.autocommit = True
        conn.prepare_threshold = None  # each filter combination planned with its values
        conn.execute("SET statement_timeout = '10s'")

    return ConnectionPool(dsn, min_size=1, max_size=size, configure=configure, open=True, timeout=10,
                          kwargs={"connect_timeout": 10, "application_name": "sqis-dashboard"})
