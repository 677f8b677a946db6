"""Start our services as separate `backprop serve` processes against a real Redis and S3."""

from __future__ import annotations

import os
import sys
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen

import grpc
import servers
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serving(address: str) -> bool:
    """True once the server at `address` answers the standard health check with SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def stack_env(
    redis_url: str, s3_endpoint: str, model_cache: Path, home: Path, **settings: str
) -> dict[str, str]:
    """Environment of a stack with its own Redis namespace and bucket; `settings` are extra
    BACKPROPAGATE_ variables without the prefix (e.g. QUEUE__VISIBILITY_TIMEOUT_SECONDS)."""
    return {
        **os.environ,
        "BACKPROPAGATE_HOME": str(home),
        "BACKPROPAGATE_MODEL_CACHE": str(model_cache),
        "BACKPROPAGATE_QUEUE__BACKEND": "redis",
        "BACKPROPAGATE_QUEUE__REDIS_URL": redis_url,
        "BACKPROPAGATE_QUEUE__NAMESPACE": f"it-{uuid.uuid4().hex[:8]}",
        "BACKPROPAGATE_STORE__BACKEND": "s3",
        "BACKPROPAGATE_STORE__S3_ENDPOINT": s3_endpoint,
        "BACKPROPAGATE_STORE__S3_BUCKET": f"it-{uuid.uuid4().hex[:8]}",
        **{f"BACKPROPAGATE_{name}": value for name, value in settings.items()},
    }


def serve(service: str, address: str, env: dict[str, str]) -> AbstractContextManager[Popen[bytes]]:
    """`backprop serve <service>` on `address`, ready once its health check says SERVING."""
    backprop = str(Path(sys.executable).parent / "backprop")
    return servers.running(
        [backprop, "serve", service, "--listen", address],
        ready=lambda: serving(address),
        what=f"backprop serve {service}",
        timeout=120,
        env=env,
    )
