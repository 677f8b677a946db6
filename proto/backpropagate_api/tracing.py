"""OpenTelemetry traces, for the client and the services alike: one trace per run.

A run's trace starts where the client starts it (`backprop train`, `Trainer.train`), follows its
calls into the services (the W3C `traceparent` in each call's metadata), crosses the queue in
the job's payload, and ends with the export's stages; every span of it carries the run id.

OpenTelemetry is optional in this package: the services install it, a client-only install
traces once `backpropagate[tracing]` is installed, and without it every function here does
nothing. Spans are recorded and sent (OTLP over gRPC) only when an endpoint is configured:
TracingSettings.otlp_endpoint, else OpenTelemetry's own OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT. Its other standard variables apply as usual (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_SCHEDULE_DELAY, OTEL_EXPORTER_OTLP_HEADERS ...).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpc

from backpropagate_api.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

try:
    from opentelemetry import propagate, trace
except ImportError:  # a client-only install without the tracing extra
    trace = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# The attribute every span of a run carries, whichever process records it.
RUN_ID_ATTRIBUTE = "backpropagate.run_id"
# The W3C Trace Context field that carries a span's identity between processes.
TRACEPARENT = "traceparent"
TRACER_NAME = "backpropagate"

_lock = threading.Lock()
_provider: TracerProvider | None = None


def otlp_endpoint(settings: Settings) -> str | None:
    """Where this process sends its spans; None: it records none."""
    return (
        settings.tracing.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def start_tracing(settings: Settings, service_name: str) -> bool:
    """Record this process's spans as `service_name` (OTEL_SERVICE_NAME wins) and send them to
    the configured collector. Once per process (OpenTelemetry's provider is global); False when
    no endpoint is configured or OpenTelemetry is not installed."""
    global _provider
    endpoint = otlp_endpoint(settings)
    if endpoint is None:
        return False
    with _lock:
        if _provider is not None:
            return True
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning(
                "Traces are configured (%s) but OpenTelemetry is not installed here: "
                "pip install 'backpropagate[tracing]'.",
                endpoint,
            )
            return False
        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        _provider = provider
    log.info("sending traces to %s as %s", endpoint, name)
    return True


def recording() -> bool:
    """Whether this process records and sends spans (`start_tracing` found a collector)."""
    return _provider is not None


def flush_tracing() -> None:
    """Send the spans still buffered (a server stopping; its provider also flushes at exit)."""
    if _provider is not None:
        _provider.force_flush()


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """`channel`, passing the current trace on with each call made inside one (a span per
    call); calls made outside any trace (the trainer's safety watch, `runs list`) start none."""
    try:
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
    except ImportError:
        return channel
    interceptor = client_interceptor(filter_=lambda _call: _in_a_trace())
    traced: grpc.Channel = intercept_channel(channel, interceptor)
    return traced


def _in_a_trace() -> bool:
    return trace is not None and trace.get_current_span().get_span_context().is_valid


@contextmanager
def span(name: str, *, run_id: str = "", parent: str = "", **attributes: Any) -> Iterator[None]:
    """A span around the block: a child of `parent` (a traceparent from another process) when
    given, else of the current span; `run_id` tags it, and every span below it with
    `tag_run`. Nothing without OpenTelemetry, and a span nobody records without a collector."""
    if trace is None:
        yield
        return
    context = propagate.extract({TRACEPARENT: parent}) if parent else None
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, context=context, attributes=attributes):
        if run_id:
            tag_run(run_id)
        yield


def tag_run(run_id: str) -> None:
    """Say on the current span which run it works for."""
    if trace is not None:
        trace.get_current_span().set_attribute(RUN_ID_ATTRIBUTE, run_id)


def current_traceparent() -> str:
    """The current span as a W3C traceparent, for work that goes on in another process (a job
    through the queue); "" outside a recorded trace."""
    if trace is None:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def trace_ids() -> tuple[str, str]:
    """The current trace and span ids in hex, as log lines carry them; ("", "") outside one."""
    if trace is None:
        return "", ""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)
