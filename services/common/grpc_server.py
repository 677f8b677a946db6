"""Building a gRPC server: bind (with its metrics, tracing, token check and call limits), then our
services, then standard health and reflection."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import filters, server_interceptor

from backpropagate_api.channels import is_loopback, server_credentials
from backpropagate_api.errors import AuthRequiredError, ConfigError
from backpropagate_api.settings import Settings
from backpropagate_services.common.grpc_guards import (
    STACK_STREAMS,
    CallLimits,
    IdleClientStreams,
    ReadableRequests,
    TokenAuth,
)
from backpropagate_services.common.metrics import CallMetrics

# Threads beyond the call limit and the stack's kept streams: for health checks and for
# refusing calls over the limit.
SPARE_THREADS = 8


def bind_server(address: str, settings: Settings) -> tuple[grpc.Server, int]:
    """A server listening on `address` (port 0 picks a free one), not started yet, with the
    token check, the call limits and the idle timeout of `settings` in front of every service.

    Binding comes first so the chosen port is known before services are created: the embedded
    stack points its trainer at its own safety service through it.
    """
    token = settings.token.get_secret_value() if settings.token else ""
    if not token and not is_loopback(address):
        raise AuthRequiredError(
            f"Refusing to listen on {address} without a token: anyone who can reach it could "
            "train, read datasets and download models.",
            address=address,
        )
    limits = settings.server
    interceptors: list[grpc.ServerInterceptor] = [
        CallLimits(limits.max_concurrent_calls, limits.max_concurrent_streams),
        ReadableRequests(),
        IdleClientStreams(limits.watch_idle_seconds),
    ]
    if token:
        interceptors.insert(0, TokenAuth(token))
    # Outermost: a call refused by a guard is counted, and traced in its caller's trace. Health
    # checks (every few seconds from an orchestrator) start no trace.
    interceptors[:0] = [
        CallMetrics(),
        server_interceptor(filter_=filters.negate(filters.health_check())),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=limits.max_concurrent_calls + STACK_STREAMS + SPARE_THREADS
        ),
        interceptors=interceptors,
    )
    try:
        port = (
            server.add_secure_port(address, server_credentials(settings.tls))
            if settings.tls.serves
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise ConfigError(f"Cannot listen on {address}: {exc}", address=address) from exc
    if port == 0:
        raise ConfigError(f"Cannot listen on {address}: the port is in use.", address=address)
    return server, port


def add_standard_services(server: grpc.Server, service_names: Iterable[str]) -> None:
    """Health (per service and overall) and reflection, so grpcurl and orchestrators can probe
    the server without our protos."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
