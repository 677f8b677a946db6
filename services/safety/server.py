"""SafetyService: snapshots and a watch stream of the machine's safety level."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import grpc

from backpropagate_api.errors import ConfigError
from backpropagate_api.grpc_errors import translate_errors
from backpropagate_api.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.common.service import ServiceHandle
from backpropagate_services.safety.levels import Thresholds, assess
from backpropagate_services.safety.metrics import record_reading
from backpropagate_services.safety.sources import ReadingSource, make_source

SERVICE_NAME = safety_pb2.DESCRIPTOR.services_by_name["SafetyService"].full_name
MIN_INTERVAL_SECONDS = 0.05
MAX_INTERVAL_SECONDS = 60.0


def watch_interval(requested: float, default: float) -> float:
    """The period of a Watch stream: 0 asks for the default, shorter than the floor gets the
    floor. A negative, infinite, NaN or longer-than-a-minute one is refused: the stream's thread
    would otherwise fail mid-stream or sleep for good, and enough such watchers wedge a server."""
    interval = requested or default
    if not math.isfinite(interval) or not 0 < interval <= MAX_INTERVAL_SECONDS:
        raise ConfigError(
            f"interval_seconds must be 0 (the default) or in (0, {MAX_INTERVAL_SECONDS:g}], "
            f"got {requested!r}.",
            fields="interval_seconds",
        )
    return max(interval, MIN_INTERVAL_SECONDS)


def snapshot_of(source: ReadingSource, thresholds: Thresholds) -> safety_pb2.SafetySnapshot:
    readings = source.read()
    assessment = assess(readings, thresholds)
    record_reading(readings, assessment)
    return safety_pb2.SafetySnapshot(
        level=common_pb2.SafetyLevel.Value(f"SAFETY_LEVEL_{assessment.level.name}"),
        source=readings.source,
        # The reading dataclasses mirror the proto messages field for field.
        gpus=[safety_pb2.GpuReading(**asdict(gpu)) for gpu in readings.gpus],
        host=safety_pb2.HostReading(**asdict(readings.host)),
        reasons=assessment.reasons,
        timestamp=time.time(),
    )


class SafetyServicer(safety_pb2_grpc.SafetyServiceServicer):
    def __init__(
        self, source: ReadingSource, thresholds: Thresholds, default_interval: float
    ) -> None:
        self.source = source
        self.thresholds = thresholds
        self.default_interval = default_interval

    @translate_errors
    def Snapshot(
        self, request: safety_pb2.SnapshotRequest, context: grpc.ServicerContext
    ) -> safety_pb2.SafetySnapshot:
        return snapshot_of(self.source, self.thresholds)

    @translate_errors
    def Watch(
        self, request: safety_pb2.WatchSafetyRequest, context: grpc.ServicerContext
    ) -> Iterator[safety_pb2.SafetySnapshot]:
        interval = watch_interval(request.interval_seconds, self.default_interval)
        while context.is_active():
            yield snapshot_of(self.source, self.thresholds)
            time.sleep(interval)


def create(runtime: Runtime) -> ServiceHandle:
    settings = runtime.settings.safety
    servicer = SafetyServicer(
        make_source(settings.source, settings.replay_file),
        Thresholds.from_settings(settings),
        settings.interval_seconds,
    )
    return ServiceHandle(
        name="safety",
        grpc_service_name=SERVICE_NAME,
        register=lambda server: safety_pb2_grpc.add_SafetyServiceServicer_to_server(
            servicer, server
        ),
    )
