"""Settings of the dashboard (env SQIS_DASHBOARD_*), next to the project's Settings (database, store)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DashboardSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SQIS_DASHBOARD_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes it to the network")
    port: int = Field(8050, ge=1, le=65535)
    refresh_s: float = Field(2.0, ge=0.5, le=3600, description="live refresh interval of the panels")
    rate_window_s: int = Field(60, ge=1, le=3600,
                               description="the stream processors' window (sqis stream --window-s) the pages read")
    # {"alice": "scrypt:32768:8:1$..."}: werkzeug password hashes (`sqis dashboard hash-password`).
    # Empty = no login (fine on 127.0.0.1; set users before binding to the network).
    users: dict[str, SecretStr] = Field(default_factory=dict)
    secret_key: SecretStr | None = Field(None, description="signs the login cookie; random per process if unset")
    gallery_size: int = Field(24, ge=1, le=200)
    pool_size: int = Field(4, ge=1, le=64, description="PostgreSQL connections held by the dashboard")

    @field_validator("users")
    @classmethod
    def _hashes_only(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, h in v.items():
            method = h.get_secret_value().split("$", 1)[0]
            if not method.startswith(("scrypt", "pbkdf2")):
                raise ValueError(f"user {name!r}: not a password hash (use `sqis dashboard hash-password`)")
        return v
