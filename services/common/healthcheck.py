"""Ask a server's standard gRPC health service whether it is SERVING; exit 0 if so, else 1.

The container healthcheck of every service (docker-compose.yml and deploy/*/Dockerfile):

    python -m backpropagate_services.common.healthcheck HOST:PORT [--service NAME] [--timeout S]
        [--ca FILE]

It prints one line either way, so `docker inspect` shows why a container is unhealthy. The
default service name, the empty string, asks about the server as a whole (the gRPC convention).
Health checks need no token (grpc_guards); `--ca` probes a server that serves TLS.
Only grpcio and grpcio-health-checking are imported: the check runs every few seconds and must
stay cheap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 3.0


def check(
    target: str,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ca_file: Path | None = None,
) -> tuple[bool, str]:
    """Return (serving, one-line message) for `service` on the server at `target` (host:port);
    over TLS trusting `ca_file` when one is given."""
    label = f"{target} {service or '(server)'}"
    request = health_pb2.HealthCheckRequest(service=service)
    try:
        with (
            grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_file.read_bytes()))
            if ca_file
            else grpc.insecure_channel(target)
        ) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
    except grpc.RpcError as error:
        # UNAVAILABLE: nothing listens; NOT_FOUND: the server does not know `service`.
        reason = f"{error.code().name} {error.details()}" if isinstance(error, grpc.Call) else error
        return False, f"{label}: {reason}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{label}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backpropagate_services.common.healthcheck",
        description="Exit 0 when the gRPC server at HOST:PORT reports SERVING, 1 otherwise.",
    )
    parser.add_argument("target", metavar="HOST:PORT", help="address of the gRPC server")
    parser.add_argument(
        "--service", default="", help="health service name; default: the whole server"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="S",
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    parser.add_argument(
        "--ca", type=Path, default=None, metavar="FILE", help="PEM CA of a server that uses TLS"
    )
    args = parser.parse_args(argv)
    serving, message = check(args.target, args.service, args.timeout, args.ca)
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
