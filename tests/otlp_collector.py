"""An OpenTelemetry collector for tests: a real OTLP/gRPC trace receiver on a loopback port that
keeps every span it is sent, so a test sees what each process exported, as a collector would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from servers import LOOPBACK


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name: which process sent it
    name: str
    trace_id: str  # hex, as logs print them
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, object] = field(default_factory=dict)


def _value(any_value: object) -> object:
    kind = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(any_value, kind) if kind else None


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []

    def Export(  # the OTLP method's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class Collector:
    def __init__(self, endpoint: str, receiver: _Receiver) -> None:
        self.endpoint = endpoint  # what OTEL_EXPORTER_OTLP_ENDPOINT takes
        self._receiver = receiver

    def spans(self) -> list[ReceivedSpan]:
        with self._receiver.lock:
            return list(self._receiver.spans)


@contextmanager
def otlp_collector() -> Iterator[Collector]:
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    try:
        yield Collector(f"http://{LOOPBACK}:{port}", receiver)
    finally:
        server.stop(0)
