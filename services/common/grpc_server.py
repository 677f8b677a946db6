"""Building a gRPC server: bind, then our services, then standard health and reflection."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from backpropagate_services.common.errors import ConfigError


def bind_server(address: str, max_workers: int = 32) -> tuple[grpc.Server, int]:
    """A server listening on `address` (port 0 picks a free one), not started yet.

    Binding comes first so the chosen port is known before services are created: the embedded
    stack points its trainer at its own safety service through it.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    try:
        port = server.add_insecure_port(address)
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
