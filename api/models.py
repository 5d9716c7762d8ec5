"""Response bodies of the API (the committed OpenAPI spec, docs/openapi.json, is generated from them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FrameAccepted(BaseModel):
    frame_id: str = Field(description="UUID of the frame; GET /v1/inspections/{frame_id} once the line inspected it")
    replayed: bool = Field(description="true: an earlier request with this Idempotency-Key was accepted; nothing new published")
    inspection_url: str


class Detection(_Open):
    class_id: int
    class_name: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


class InspectionOut(_Open):
    """An Inspection (schemas/avro/inspection.avsc) as JSON, plus where it came from."""

    frame_id: str
    line_id: str
    camera_id: str
    part_id: str | None = None
    verdict: Literal["PASS", "FAIL"]
    detections: list[Detection]
    model_name: str
    model_version: str
    image_uri: str
    width: int
    height: int
    thresholds: dict[str, Any]
    timings: dict[str, Any]
    verdict_rules: list[str] = []
    worker_id: str | None = None
    source: Literal["api", "line"]


class PartOut(_Open):
    part_id: str
    line_id: str
    verdict: Literal["OK", "NG", "INCOMPLETE"]
    expected_views: int
    views: list[dict[str, Any]]
    missing_cameras: list[str]
    reason: str
    decided_at: str


class RateWindow(_Open):
    window_start: str
    window_s: int
    frames: int
    fails: int
    rate: float


class RatesOut(BaseModel):
    line_id: str
    window_s: float = Field(description="the look-back asked for, in seconds")
    bucket_s: int = Field(description="length of each window (the stream processors' tumbling windows)")
    frames: int
    fails: int
    rate: float = Field(description="fails / frames over the look-back (0 without frames)")
    windows: list[RateWindow]


class AlertOut(_Open):
    alert_id: str
    kind: str
    rule: str
    severity: str
    state: Literal["open", "acknowledged", "resolved"]
    line_id: str
    message: str
    opened_at: str


class AlertsOut(BaseModel):
    alerts: list[AlertOut]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready", "unready"]
    checks: dict[str, str] = Field(description="broker, database, store, model: 'ok' or why not")
