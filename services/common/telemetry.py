"""What a server process tells about itself while it runs: its Prometheus endpoint, the depth of
the queues its workers take jobs from, and its spans (docs/observability.md).

`start_stack` starts it with the services, so `backprop serve` and the embedded default report
the same way; the embedded default serves no metrics unless BACKPROPAGATE_METRICS__PORT is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY

from backpropagate_api.settings import Settings
from backpropagate_api.tracing import flush_tracing, start_tracing
from backpropagate_services.common.jobs import JobWorker
from backpropagate_services.common.metrics import QueueCollector, serve_metrics
from backpropagate_services.common.queue import JobQueue
from backpropagate_services.common.service import ServiceHandle


@dataclass
class Telemetry:
    metrics_server: WSGIServer | None
    queue_collector: QueueCollector | None

    def stop(self) -> None:
        """Stop serving metrics and send the spans still buffered."""
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.queue_collector is not None:
            REGISTRY.unregister(self.queue_collector)
        flush_tracing()


def start_telemetry(
    settings: Settings, name: str, handles: Sequence[ServiceHandle], queue: JobQueue, host: str
) -> Telemetry:
    """Traces as `name` when a collector is configured; with a metrics port, /metrics on `host`
    (the interface gRPC is served on) with the depth of the queues this process works on."""
    start_tracing(settings, name)
    port = settings.metrics.port
    if port is None:
        return Telemetry(None, None)
    queues = {
        worker.queue_name
        for handle in handles
        for worker in handle.workers
        if isinstance(worker, JobWorker)
    }
    server = serve_metrics(port, host)
    collector = QueueCollector(queue, queues) if queues else None
    if collector is not None:
        REGISTRY.register(collector)
    return Telemetry(server, collector)
