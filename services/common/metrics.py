"""Prometheus metrics every service process shares: its gRPC calls, its job queues and jobs.

Each server process serves its metrics over HTTP (`serve_metrics`, MetricsSettings.port); the
services add their own next to their code (the trainer's runs, the safety sidecar's readings,
the export's stages), all in prometheus_client's default registry, so `backprop serve all` has
one endpoint for the four. docs/observability.md lists every metric. Every label takes a
bounded set of values (methods, codes, queues, statuses), but the run id of a running run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from backpropagate_api.errors import ConfigError, DependencyError
from backpropagate_api.statuses import status_name
from backpropagate_services.common.grpc_guards import Handler, behaviour_of, rebuilt
from backpropagate_services.common.queue import JobQueue

log = logging.getLogger(__name__)

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "gRPC calls the server completed, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "How long the server took to complete a gRPC call (a stream: its whole length).",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
JOBS_ENDED = Counter(
    "backpropagate_jobs_ended_total",
    "Jobs this process ended, by queue (train: runs, export: exports) and final status.",
    ["queue", "status"],
)
JOBS_RUNNING = Gauge(
    "backpropagate_jobs_running", "Jobs this process is working on, by queue.", ["queue"]
)
JOB_REDELIVERIES = Counter(
    "backpropagate_job_redeliveries_total",
    "Jobs this process claimed that an earlier worker had claimed and not finished.",
    ["queue"],
)


class CallMetrics(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts every call by method and status code and times it; the outermost interceptor,
    so a call refused by a guard (no token, server busy) is counted with its code too."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        service, method = details.method.lstrip("/").split("/", 1)
        kind = "server_stream" if handler.response_streaming else "unary"
        if handler.request_streaming:
            kind = "bidi_stream" if handler.response_streaming else "client_stream"
        labels = (service, method, kind)
        behaviour = behaviour_of(handler)

        def observe(started: float, code: grpc.StatusCode) -> None:
            GRPC_HANDLED.labels(*labels, code.name).inc()
            GRPC_SECONDS.labels(*labels).observe(time.monotonic() - started)

        if handler.response_streaming:

            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started, code = time.monotonic(), grpc.StatusCode.UNKNOWN
                try:
                    yield from behaviour(request, context)
                    code = context.code() or grpc.StatusCode.OK
                except GeneratorExit:  # the client left before the stream ended
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    observe(started, code)

        else:

            def call(request: Any, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
                started, code = time.monotonic(), grpc.StatusCode.UNKNOWN
                try:
                    response = behaviour(request, context)
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    observe(started, code)

        return rebuilt(handler, call)


class QueueCollector(Collector):
    """The depth of job queues, read from the queue at each scrape: jobs waiting for a worker,
    jobs a worker holds, jobs dead-lettered. Every process that runs workers of a queue reports
    it (the same numbers, from the shared queue: aggregate with max, not sum)."""

    def __init__(self, queue: JobQueue, names: Iterable[str]) -> None:
        self.queue = queue
        self.names = sorted(names)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            field: GaugeMetricFamily(
                f"backpropagate_queue_{field}_jobs", help_text, labels=["queue"]
            )
            for field, help_text in (
                ("waiting", "Jobs in the queue that no worker holds yet."),
                ("pending", "Jobs a worker has claimed and not acknowledged yet."),
                ("dead_letter", "Jobs taken out of the queue after too many deliveries."),
            )
        }
        for name in self.names:
            try:
                depth = self.queue.depth(name)
            except DependencyError as error:  # the queue is away: say so, scrape the rest
                log.warning("queue %s depth not read for metrics: %s", name, error)
                continue
            families["waiting"].add_metric([name], depth.waiting)
            families["pending"].add_metric([name], depth.pending)
            families["dead_letter"].add_metric([name], depth.dead_letters)
        yield from families.values()


def count_job_end(queue: str, status: int) -> None:
    """A job of `queue` ended with `status` (a JobStatus)."""
    JOBS_ENDED.labels(queue, status_name(status)).inc()


def serve_metrics(port: int, host: str) -> WSGIServer:
    """Serve /metrics on `host:port` from a daemon thread (until the server returned is shut
    down); ConfigError if the port is taken."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise ConfigError(
            f"Cannot serve metrics on {host}:{port}: {exc.strerror}.",
            hint="Set BACKPROPAGATE_METRICS__PORT to a free port, or unset it.",
            port=str(port),
        ) from None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    return server
