"""What `sqis demo` adds for issue #20: one more camera through the edge gateway and MQTT, beside the
others. ``bridge`` starts with the consumers (its persistent MQTT session must exist before the edge
gateway publishes); ``gateway`` starts with the cameras. Both are skipped when the stack has no
mosquitto or paho-mqtt is missing (the demo runs as before)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

CAMERA, LINE, DEVICE, STATION = "cam-edge", "line-1", "demo-edge", "station-edge"


def available(info: dict[str, Any]) -> bool:
    return "mqtt" in info and importlib.util.find_spec("paho") is not None


def bridge(state_dir: str, env: dict[str, str], logs_dir: Path, child_cls: Any, info: dict[str, Any]) -> Any:
    return child_cls("bridge-mqtt", ["bridge", "mqtt", "--state-dir", state_dir, "--stations", f"{CAMERA}={STATION}"],
                     env | {"SQIS_MQTT_URL": info["mqtt"]["url"]}, logs_dir)


def gateway(state_dir: str, env: dict[str, str], logs_dir: Path, child_cls: Any, info: dict[str, Any], *,
            fps: float, frames: int) -> Any:
    c = child_cls("edge", ["edge", "--state-dir", state_dir, "--device-id", DEVICE, "--camera-id", CAMERA,
                           "--line-id", LINE, "--fps", f"{fps:g}", "--frames", str(frames), "--gate", "stats",
                           "--gate-sample", "0.2"], env | {"SQIS_MQTT_URL": info["mqtt"]["url"]}, logs_dir)
    c.expected_exit = frames > 0  # with --frames it ends by itself
    return c


def intro() -> str:
    return (f"edge: {CAMERA} goes through `sqis edge` (stats gate, on-disk queue) -> mosquitto -> `sqis bridge mqtt`; "
            f"PLC verdicts on sqis/v1/{LINE}/{STATION}/verdict (retained)")
