"""Readings -> one safety level, with the reasons a person would want to see.

The thresholds come from `SafetySettings` (docs/safety.md has the defaults and why). Each
reading's level is the highest threshold it has reached; the machine's level is the worst of
them. Reasons list every reading above safe, worst first, so the first one explains the level:
the trainer names the error of a safety stop after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

from backpropagate_api.settings import SafetySettings


class Level(IntEnum):
    """Mirrors common_pb2.SafetyLevel."""

    SAFE = 1
    WARM = 2
    WARNING = 3
    CRITICAL = 4
    EMERGENCY = 5


class Bands(NamedTuple):
    """Where one reading becomes warm, warning, critical and emergency (settings keep them
    rising)."""

    warm: float
    warning: float
    critical: float
    emergency: float


@dataclass(frozen=True)
class Thresholds:
    gpu_temperature_c: Bands
    vram_percent: Bands
    host_memory_percent: Bands

    @classmethod
    def from_settings(cls, settings: SafetySettings) -> Thresholds:
        bands = settings.thresholds()
        return cls(
            gpu_temperature_c=Bands(*bands["gpu_temperature"]),
            vram_percent=Bands(*bands["vram"]),
            host_memory_percent=Bands(*bands["host_memory"]),
        )


@dataclass(frozen=True)
class GpuReading:
    """One GPU. None: a reading this GPU does not report (NVML answers NotSupported for power
    and utilisation on many consumer and virtualised GPUs, for temperature on some of them)."""

    index: int
    name: str
    temperature_c: float | None
    memory_used_mb: float
    memory_total_mb: float
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization_percent: float | None = None

    @property
    def memory_percent(self) -> float:
        return 100.0 * self.memory_used_mb / self.memory_total_mb if self.memory_total_mb else 0.0


@dataclass(frozen=True)
class HostReading:
    memory_used_mb: float
    memory_total_mb: float
    memory_percent: float
    cpu_percent: float = 0.0


@dataclass(frozen=True)
class Readings:
    source: str  # nvml | host | replay
    host: HostReading
    gpus: list[GpuReading] = field(default_factory=list)


@dataclass(frozen=True)
class Assessment:
    level: Level
    reasons: list[str]


def level_for(value: float, bands: Bands) -> Level:
    """SAFE below `bands.warm`, else the level of the highest threshold reached."""
    for level, bound in zip(Level, bands, strict=False):
        if value < bound:
            return level
    return Level.EMERGENCY


def _check(what: str, value: float, unit: str, bands: Bands) -> tuple[Level, str]:
    """The reading's level, and its reason, e.g. "GPU 0 at 91 C (critical at 90 C)"."""
    level = level_for(value, bands)
    if level == Level.SAFE:
        return level, ""
    bound = bands[level - Level.WARM]
    return level, f"{what} {value:.0f}{unit} ({level.name.lower()} at {bound:g}{unit})"


def assess(readings: Readings, thresholds: Thresholds) -> Assessment:
    checks = [
        _check("host memory", readings.host.memory_percent, "%", thresholds.host_memory_percent)
    ]
    for gpu in readings.gpus:
        if gpu.temperature_c is not None:  # a GPU without a sensor is judged on its VRAM alone
            checks.append(
                _check(f"GPU {gpu.index} at", gpu.temperature_c, " C", thresholds.gpu_temperature_c)
            )
        checks.append(
            _check(f"GPU {gpu.index} VRAM", gpu.memory_percent, "%", thresholds.vram_percent)
        )
    worst_first = sorted(checks, key=lambda checked: checked[0], reverse=True)
    return Assessment(
        level=worst_first[0][0],
        reasons=[reason for level, reason in worst_first if level > Level.SAFE],
    )
