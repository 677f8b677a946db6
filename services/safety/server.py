"""SafetyService: snapshots and a watch stream of the machine's safety level."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict

import grpc

from backpropagate.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from backpropagate_services.common.grpc_errors import translate_errors
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.common.service import ServiceHandle
from backpropagate_services.safety.levels import Thresholds, assess
from backpropagate_services.safety.sources import ReadingSource, make_source

SERVICE_NAME = safety_pb2.DESCRIPTOR.services_by_name["SafetyService"].full_name
MIN_INTERVAL_SECONDS = 0.05


def snapshot_of(source: ReadingSource, thresholds: Thresholds) -> safety_pb2.SafetySnapshot:
    readings = source.read()
    assessment = assess(readings, thresholds)
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
        interval = max(request.interval_seconds or self.default_interval, MIN_INTERVAL_SECONDS)
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
