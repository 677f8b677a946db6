"""Prometheus gauges of the safety sidecar's readings (docs/observability.md), as of its last
reading: the trainer's watch takes one every interval_seconds, so they stay fresh while a
trainer follows the sidecar; `backpropagate_safety_reading_timestamp_seconds` says how fresh.
"""

from __future__ import annotations

import time

from prometheus_client import Gauge

from backpropagate_services.safety.levels import Assessment, Readings

MIB = 2**20

LEVEL = Gauge(
    "backpropagate_safety_level",
    "The safety level, as SafetyLevel numbers it: 1 safe, 2 warm, 3 warning, 4 critical (a "
    "trainer pauses), 5 emergency (it stops).",
)
READING_TIMESTAMP = Gauge(
    "backpropagate_safety_reading_timestamp_seconds", "When the last reading was taken (Unix time)."
)
GPU_TEMPERATURE = Gauge(
    "backpropagate_gpu_temperature_celsius", "GPU temperature.", ["gpu", "name"]
)
GPU_MEMORY_USED = Gauge(
    "backpropagate_gpu_memory_used_bytes", "GPU memory in use (VRAM).", ["gpu", "name"]
)
GPU_MEMORY_TOTAL = Gauge(
    "backpropagate_gpu_memory_total_bytes", "GPU memory in all (VRAM).", ["gpu", "name"]
)
HOST_MEMORY_USED = Gauge(
    "backpropagate_host_memory_used_bytes", "Host memory in use (total minus available)."
)
HOST_MEMORY_TOTAL = Gauge("backpropagate_host_memory_total_bytes", "Host memory in all.")


def record_reading(readings: Readings, assessment: Assessment) -> None:
    """Set the gauges from one reading and the level it was assessed at."""
    LEVEL.set(int(assessment.level))
    READING_TIMESTAMP.set(time.time())
    HOST_MEMORY_USED.set(readings.host.memory_used_mb * MIB)
    HOST_MEMORY_TOTAL.set(readings.host.memory_total_mb * MIB)
    for gpu in readings.gpus:
        labels = (str(gpu.index), gpu.name)
        if gpu.temperature_c is not None:
            GPU_TEMPERATURE.labels(*labels).set(gpu.temperature_c)
        GPU_MEMORY_USED.labels(*labels).set(gpu.memory_used_mb * MIB)
        GPU_MEMORY_TOTAL.labels(*labels).set(gpu.memory_total_mb * MIB)
