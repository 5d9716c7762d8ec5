"""Errors as RFC 9457 problem details (``application/problem+json``); the package's exception root."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://sqis.dev/problems/"  # stable identifiers, documented in docs/readme-api.md


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(description="URI identifying the problem type")
    title: str
    status: int
    detail: str = ""
    instance: str | None = Field(None, description="the request path")
    errors: list[dict[str, Any]] | None = Field(None, description="validation errors, one per field")


class ApiError(Exception):
    """Raised by handlers; rendered as a problem (the root of the api package's exceptions)."""

    def __init__(self, status: int, kind: str, detail: str = "", *, headers: dict[str, str] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail or kind)
        self.status, self.kind, self.detail = status, kind, detail
        self.headers = headers or {}
        self.errors = errors

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        return problem(self.status, self.kind, self.detail, instance, self.errors)


def problem(status: int, kind: str, detail: str = "", instance: str | None = None,
            errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    out: dict[str, Any] = {"type": TYPE_BASE + kind, "title": title, "status": status, "detail": detail,
                           "instance": instance}
    if errors is not None:
        out["errors"] = errors
    return out


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error codes, each a Problem."""
    return {c: {"model": Problem, "description": HTTPStatus(c).phrase,
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for c in codes}
