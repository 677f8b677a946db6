"""Where readings come from: NVML on a GPU machine, host memory otherwise, or a replay file.

The replay source exists for drills (what does the trainer do at CRITICAL?) and is named as such
everywhere it appears: in settings, in every snapshot's `source`, in the logs.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from pydantic import BaseModel, ConfigDict, ValidationError

from backpropagate_api.errors import ConfigError, MissingDependencyError
from backpropagate_services.safety.levels import GpuReading, HostReading, Readings

log = logging.getLogger(__name__)

T = TypeVar("T")


def read_host() -> HostReading:
    memory = psutil.virtual_memory()
    return HostReading(
        memory_used_mb=(memory.total - memory.available) / 2**20,
        memory_total_mb=memory.total / 2**20,
        memory_percent=float(memory.percent),
        cpu_percent=float(psutil.cpu_percent(interval=None)),
    )


class ReadingSource(ABC):
    name: str

    @abstractmethod
    def read(self) -> Readings: ...


class HostSource(ReadingSource):
    name = "host"

    def read(self) -> Readings:
        return Readings(source=self.name, host=read_host())


class NvmlSource(ReadingSource):
    """NVIDIA GPUs through NVML; construction fails where no driver answers.

    Only memory is read from every GPU: temperature, power and utilisation are left out of the
    readings of a GPU that answers NotSupported for them (consumer and virtualised GPUs often
    do), and the levels go on from what it does report.
    """

    name = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        self._unsupported: set[tuple[int, str]] = set()
        try:
            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise MissingDependencyError(f"NVML is not available: {exc}") from exc

    def _supported(self, index: int, reading: str, query: Callable[..., T], *args: Any) -> T | None:
        """`query(*args)`, or None where GPU `index` does not support it (logged once)."""
        try:
            return query(*args)
        except self._nvml.NVMLError_NotSupported:
            if (index, reading) not in self._unsupported:
                self._unsupported.add((index, reading))
                log.info("GPU %d does not report its %s (NVML: Not Supported)", index, reading)
            return None

    def read(self) -> Readings:
        nvml = self._nvml
        gpus = []
        for index in range(self._count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            temperature = self._supported(
                index,
                "temperature",
                nvml.nvmlDeviceGetTemperature,
                handle,
                nvml.NVML_TEMPERATURE_GPU,
            )
            power_mw = self._supported(index, "power", nvml.nvmlDeviceGetPowerUsage, handle)
            limit_mw = self._supported(
                index, "power limit", nvml.nvmlDeviceGetEnforcedPowerLimit, handle
            )
            rates = self._supported(
                index, "utilisation", nvml.nvmlDeviceGetUtilizationRates, handle
            )
            gpus.append(
                GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    temperature_c=_as_float(temperature),
                    memory_used_mb=memory.used / 2**20,
                    memory_total_mb=memory.total / 2**20,
                    power_w=_as_float(power_mw, 1000.0),
                    power_limit_w=_as_float(limit_mw, 1000.0),
                    utilization_percent=None if rates is None else float(rates.gpu),
                )
            )
        return Readings(source=self.name, host=read_host(), gpus=gpus)


def _as_float(value: float | None, divisor: float = 1.0) -> float | None:
    """`value / divisor` as a float (NVML's milliwatts to watts), None staying None: a reading
    the GPU does not report."""
    return None if value is None else float(value) / divisor


class ReplayLine(BaseModel):
    """One line of a replay file: {"host": {...HostReading}, "gpus": [{...GpuReading}]}."""

    model_config = ConfigDict(extra="forbid")  # a misspelt "gpu" must not read as no GPUs

    host: HostReading
    gpus: list[GpuReading] = []


class ReplaySource(ReadingSource):
    """Replays a recorded or scripted run of readings (say a temperature ramp), for drills.

    One reading per line of a JSONL file; each read advances one line, and the last line holds,
    so a drill can end in the state it tests. Blank lines are skipped. The whole file is checked
    when the sidecar starts: a bad line fails it then, naming the file and the line.
    """

    name = "replay"

    def __init__(self, path: Path) -> None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the safety replay file {path}: {exc}", path=str(path)
            ) from exc
        self._readings = [
            self._parse(path, number, line)
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
        if not self._readings:
            raise ConfigError(f"The safety replay file {path} has no readings.", path=str(path))
        self._position = 0
        self._lock = threading.Lock()

    def _parse(self, path: Path, number: int, line: str) -> Readings:
        try:
            parsed = ReplayLine.model_validate_json(line)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
                if error["loc"]
                else error["msg"]
                for error in exc.errors()
            )
            raise ConfigError(
                f"{path}, line {number}: {problems}",
                hint='Each line of a replay file is one reading: {"host": {"memory_used_mb": '
                '..., "memory_total_mb": ..., "memory_percent": ...}, "gpus": [{"index": 0, '
                '"name": ..., "temperature_c": ..., "memory_used_mb": ..., '
                '"memory_total_mb": ...}]} (docs/safety.md).',
                path=str(path),
                line=number,
            ) from None
        return Readings(source=self.name, host=parsed.host, gpus=parsed.gpus)

    def read(self) -> Readings:
        with self._lock:
            readings = self._readings[min(self._position, len(self._readings) - 1)]
            self._position += 1
            return readings


def make_source(kind: str, replay_file: Path | None = None) -> ReadingSource:
    if kind == "replay":
        if replay_file is None:
            raise ConfigError(
                "The replay source needs BACKPROPAGATE_SAFETY__REPLAY_FILE.",
                hint="Point it at a JSONL file of readings, one a line (docs/safety.md).",
            )
        log.warning(
            "safety readings are REPLAYED from %s (a drill), not read from this machine",
            replay_file,
        )
        return ReplaySource(replay_file)
    if kind == "host":
        return HostSource()
    try:
        return NvmlSource()
    except (MissingDependencyError, ImportError) as exc:
        if kind == "nvml":
            raise
        log.info("no GPU readings (%s); reporting host memory", exc)
        return HostSource()
