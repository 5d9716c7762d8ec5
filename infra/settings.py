"""Typed settings: flags > environment (SQIS_*) > .env > defaults; the running local stack only when local.

Built once in the entry point and passed down; nothing reads os.environ at import time. Endpoints are
strict: a missing Kafka, PostgreSQL or object-store URL is a ConfigError naming the setting, unless
``local`` is on (`sqis stack|demo|bench`, `sqis --local`, SQIS_LOCAL=1), which lets the local stack's
stack.json and a file:// directory under the state dir stand in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.errors import ConfigError

STACK_FILE = "stack.json"
__all__ = ["STACK_FILE", "ConfigError", "Settings", "redact_dsn"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SQIS_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    state_dir: Path = Field(Path(".sqis"), description="where the local stack keeps its state")
    local: bool = Field(False, description=(
        "let the local stack (stack.json, file:// under the state dir) stand in for missing endpoints; "
        "on under `sqis stack|demo|bench` and `sqis --local`"))

    # Kafka
    kafka_bootstrap: str | None = Field(None, description="host:port[,host:port]; required unless local")
    topic_prefix: str = Field("", description="prefix of every topic name (isolates deployments/tests)")
    kafka_session_timeout_ms: int = Field(6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(1000, ge=100)
    kafka_rejoin_timeout_s: float = Field(20.0, gt=0, le=3600, description=(
        "a consumer out of its group this long while the broker answers is closed and made anew "
        "(librdkafka can be left without a usable broker after a one-node broker restarts)"))
    kafka_max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_ssl_ca_location: str | None = Field(None, description="CA bundle to verify the brokers (SSL, SASL_SSL)")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_replication_factor: int = Field(1, ge=1, description="replication of topics created by `sqis topics create`")

    # Schema registry (#19): Confluent wire format; "none" writes the legacy sqis-schema header framing
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible registry (.../apis/ccompat/v7); none = legacy framing; default: the local stack's")

    # PostgreSQL
    postgres_dsn: SecretStr | None = Field(None, description="postgresql://...; required unless local")
    pg_statement_timeout_ms: int = Field(30_000, ge=0, description="writers: statement_timeout (0 = none)")
    pg_lock_timeout_ms: int = Field(5_000, ge=0, description="writers: lock_timeout (0 = none)")

    # Object store
    object_store_url: str | None = Field(None, description="file:///dir or s3://bucket/prefix; required unless local")
    mqtt_url: SecretStr | None = Field(None, description="mqtt://user:password@host:port (edge devices, "
                                       "PLC verdicts); default: the local stack's mosquitto")
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None

    # MLflow / model
    mlflow_tracking_uri: str | None = Field(None, description="default: sqlite under the state dir")
    model_uri: str | None = Field(None, description="path to an .onnx file or models:/NAME@alias")
    onnx_providers: str = Field("auto", description="auto | cpu | cuda | tensorrt (comma list allowed) | openvino (the OpenVINO runtime, `openvino` extra)")
    onnx_threads: int = Field(0, ge=0, description="intra-op threads; 0 = ONNX Runtime default")
    onnx_fp16: bool = Field(False, description="TensorRT: build fp16 engines")
    onnx_engine_cache_dir: Path | None = Field(None, description="TensorRT engine cache (default <state>/trt-cache)")
    onnx_device_id: int = Field(0, ge=0, description="CUDA/TensorRT device index")

    # Worker batching and pipeline (#18): frames per detector batch, how long a batch waits to fill,
    # fetch threads, and how many batches may be in flight between the stages
    worker_max_batch: int = Field(8, ge=1, le=256, description="frames per detector batch")
    worker_max_wait_ms: float = Field(10.0, ge=0, description="longest wait for a batch to fill (ms)")
    worker_fetch_threads: int = Field(4, ge=1, le=64, description="object-store fetch + decode threads")
    worker_pipeline_depth: int = Field(2, ge=1, le=16, description="batches in flight between the stages")
    # Worker input limits (#8): image bombs are refused from the image header, before decoding
    worker_max_pixels: int = Field(50_000_000, ge=1, le=64 * 1024 * 1024,
                                   description="pixel budget per frame (width*height, real, from the header)")
    worker_image_encodings: str = Field("jpeg,png,bmp", description="comma list of accepted image formats")
    # Worker object-store budgets (#8): one retry layer (the fetcher's) bounded per batch; then the
    # partition is rewound and paused with exponential backoff for as long as the store is down.
    worker_fetch_retries: int = Field(3, ge=0, le=20, description="object-store read retries per frame")
    worker_fetch_deadline_s: float = Field(20.0, gt=0, le=240, description="per-batch fetch deadline (s)")
    worker_rewind_backoff_min_s: float = Field(0.5, gt=0, description="first pause after a rewind (s)")
    worker_rewind_backoff_max_s: float = Field(10.0, gt=0, description="longest pause after a rewind (s)")
    # Delivery guarantee (#17): exactly_once runs consume-transform-produce in Kafka transactions
    # (results and consumed offsets commit together; readers use read_committed); at_least_once
    # stores offsets after the broker acknowledged a result (a crash may publish a result twice).
    worker_delivery: Literal["exactly_once", "at_least_once"] = "exactly_once"
    worker_delivery_stall_s: float = Field(10.0, gt=0, description=(
        "results unacknowledged this long: one warning, /readyz turns unready until deliveries resume"))

    # Shadow and canary (issue #21 section 4; inference_workers/challenger.py, sqis/canary.py)
    challenger_alias: str = Field("challenger", description="alias of the model run in shadow / on canary lines")
    shadow_share: float = Field(0.0, ge=0, le=1, description="share of frames the challenger also runs on (shadow)")
    challenger_poll_s: float = Field(10.0, gt=0, description="how often workers read the challenger alias and route")

    # Segmentation and defect size (issue #11; inference_workers/segment.py, inference.py)
    segmenter: Literal["none", "sam", "yolo-seg"] = Field("none", description="mask per detection: none | sam | yolo-seg")
    sam_model: str | None = Field(None, description="segmenter=sam: a directory from `sqis sam export`")
    segment_model: str | None = Field(
        None, description="segmenter=yolo-seg: a YOLOv8-seg .onnx or models:/ URI; default: the detector's model")
    pixel_mm: float | None = Field(None, gt=0, description="mm per pixel of every camera (area_mm2, length_mm)")
    camera_pixel_mm: dict[str, float] = Field(
        default_factory=dict, description='mm per pixel by camera id, JSON: {"cam-1": 0.02}; overrides pixel_mm')
    verdict_rules: str = Field(
        "", description="comma list of METRIC OP VALUE[:CLASS], e.g. 'length_mm>2:scratch,area_mm2>=0.5'")

    # Active learning (issue #21 section 2; inference_workers/review.py marks, infra/review_queue.py samples)
    review_band: float = Field(0.1, ge=0, le=0.5, description=(
        "a frame is 'uncertain' when its top score lies within this absolute score band around its class's "
        "operating threshold (|score - threshold| <= band); 0 = no uncertainty marks"))
    review_candidates: int = Field(5, ge=0, le=20, description=(
        "sub-threshold candidate boxes (top k) an uncertain frame carries for the reviewer and the export"))
    review_min_mask_frac: float = Field(0.05, ge=0, le=1, description=(
        "'seg_disagree' when a detection's mask covers less than this share of its box (0 = off)"))
    review_rate: float = Field(1.0, ge=0, le=1, description="share of marked frames queued for review (per line)")
    review_per_hour: int = Field(20, ge=0, le=100_000, description="most frames queued automatically per line per hour")
    review_spread: bool = Field(True, description=(
        "release the hourly cap evenly over the hour (cap 20: one slot per 3 min), not all at its start"))
    review_line_rate: dict[str, float] = Field(
        default_factory=dict, description='review_rate by line id, JSON: {"line-1": 0.5}')
    review_line_per_hour: dict[str, int] = Field(
        default_factory=dict, description='review_per_hour by line id, JSON: {"line-1": 60}')

    # Alerts and notifiers (#9)
    dashboard_url: str = Field("http://127.0.0.1:8050", description="base URL of the dashboard, for alert links")
    notify_webhook_url: SecretStr | None = Field(None, description="Slack-compatible incoming webhook URL")
    smtp_host: str | None = None
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_starttls: bool = Field(True, description="upgrade with STARTTLS (port 587); off only for a local relay")
    smtp_ssl: bool = Field(False, description="implicit TLS (port 465)")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "sqis@localhost"
    smtp_to: str | None = Field(None, description="comma-separated recipients")
    notify_rate_per_min: float = Field(6.0, gt=0, description="notifications per minute per channel (burst = 2x)")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "console"
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve /metrics on this port")
    consumer_groups: str = Field("inference-workers:frames,sink-postgres:inspections",
                                 description="lag exporter: group:topic[+topic] pairs, comma separated")
    lag_interval_s: float = Field(10.0, gt=0, description="how often a consumer process samples its own lag")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, v: str | None) -> str | None:
        if v is None:
            return v
        for part in v.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{part!r} is not host:port")
        return v

    @field_validator("postgres_dsn")
    @classmethod
    def _check_dsn(cls, v: SecretStr | None) -> SecretStr | None:
        """A DSN psycopg cannot parse is a typo, refused here (exit 2), not retried as an outage."""
        if v is None:
            return v
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(v.get_secret_value())
        except psycopg.Error:
            raise ValueError("not a PostgreSQL DSN (postgresql://user:password@host:port/db or "
                             "'host=... dbname=...')") from None
        return v

    @field_validator("verdict_rules")
    @classmethod
    def _check_rules(cls, v: str) -> str:
        from schemas.verdict_rules import parse_rules

        parse_rules(v)  # ValueError names the bad rule
        return v

    @field_validator("camera_pixel_mm")
    @classmethod
    def _check_pixel_mm(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, mm in v.items() if not mm > 0]
        if bad:
            raise ValueError(f"pixel size must be > 0 mm for cameras {bad}")
        return v

    @field_validator("review_line_rate")
    @classmethod
    def _check_review_rate(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, r in v.items() if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"review rate must be within [0, 1] for lines {bad}")
        return v

    @field_validator("review_line_per_hour")
    @classmethod
    def _check_review_cap(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, n in v.items() if not 0 <= n <= 100_000]
        if bad:
            raise ValueError(f"review per-hour cap must be within [0, 100000] for lines {bad}")
        return v

    @field_validator("object_store_url")
    @classmethod
    def _check_store(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("file://") or v.startswith("s3://")):
            raise ValueError("must start with file:// or s3://")
        return v

    # ---- values resolved against the running local stack -------------------------------------
    def stack_info(self) -> dict[str, Any]:
        p = self.state_dir / STACK_FILE
        if p.exists():
            try:
                return json.loads(p.read_text())
            except ValueError:
                return {}
        return {}

    def _missing(self, setting: str, flag: str, what: str) -> ConfigError:
        if self.local:
            return ConfigError(f"no {what}: set SQIS_{setting.upper()}{flag} or start the local stack with "
                               "`sqis stack up`")
        return ConfigError(f"{setting} is not set (env SQIS_{setting.upper()}{flag}); the local stack stands "
                           "in only under `sqis stack|demo|bench` or with `sqis --local` / SQIS_LOCAL=1")

    def bootstrap(self) -> str:
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        info = self.stack_info().get("kafka") if self.local else None
        if info:
            return str(info["bootstrap"])
        raise self._missing("kafka_bootstrap", " or --bootstrap", "Kafka")

    def registry_url(self) -> str | None:
        """The schema registry's Confluent-compatible base URL, or None for the legacy framing."""
        if self.schema_registry_url:
            return None if self.schema_registry_url.strip().lower() == "none" else self.schema_registry_url.rstrip("/")
        info = self.stack_info().get("registry")
        return str(info["url"]) if info else None

    def dsn(self) -> str:
        if self.postgres_dsn is not None:
            return self.postgres_dsn.get_secret_value()
        info = self.stack_info().get("postgres") if self.local else None
        if info:
            return str(info["dsn"])
        raise self._missing("postgres_dsn", "", "PostgreSQL")

    def store_url(self) -> str:
        if self.object_store_url:
            return self.object_store_url
        if not self.local:
            raise self._missing("object_store_url", "", "object store")
        info = self.stack_info().get("object_store")
        if info:
            return str(info["url"])
        return (self.state_dir / "objects").resolve().as_uri()

    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    def artifact_root(self) -> str:
        return (self.state_dir / "mlartifacts").resolve().as_uri()

    def redacted(self) -> dict[str, Any]:
        """For logs: secrets shown as '**********'."""
        out = self.model_dump()
        for k, v in out.items():
            if isinstance(v, SecretStr):
                out[k] = "**********"
            elif isinstance(v, Path):
                out[k] = str(v)
        if self.postgres_dsn is not None or (self.local and "postgres" in self.stack_info()):
            out["postgres_dsn"] = redact_dsn(self.dsn())
        return out


def redact_dsn(dsn: str) -> str:
    """A PostgreSQL DSN (URL or `key=value` form) safe to show: keyword form, password as ***."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "***"  # unparseable: show nothing rather than risk the password
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)
