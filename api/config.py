"""Settings of the HTTP API (env ``SQIS_API_*``), kept apart from the pipeline's ``infra.settings``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SQIS_API_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="listen address (0.0.0.0 in a container)")
    port: int = Field(8080, ge=0, le=65535)
    max_request_bytes: int = Field(33 * 1024 * 1024, ge=1024, description="whole request body; above: 413")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="one image; above: 413")
    rate_per_s: float = Field(50.0, gt=0, description="requests per second per API key (token bucket)")
    burst: int = Field(100, ge=1, description="bucket size per API key")
    inspect_timeout_s: float = Field(10.0, gt=0, le=120, description="POST /v1/inspect: model + publish budget")
    inspect_queue: int = Field(8, ge=1, description="inspections waiting for the model; more: 503")
    publish_timeout_s: float = Field(10.0, gt=0, le=120, description="wait for the broker's acknowledgement")
    max_wait_s: float = Field(30.0, ge=0, le=300, description="longest ?wait= of GET /v1/inspections/{id}")
    key_cache_s: float = Field(10.0, ge=0, description="a verified key is trusted this long (revocation delay)")
    idempotency_stale_s: float = Field(60.0, gt=0, description="a 'pending' idempotency key older than this "
                                       "belongs to a request that died: the next retry takes it over")
    db_pool_size: int = Field(8, ge=1, le=100)
    load_model: bool = Field(True, description="load the detector at start (POST /v1/inspect); off: 503 there")
