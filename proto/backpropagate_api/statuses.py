"""Job statuses: those after which a run or an export changes no more (where a client stops
following it and a server ends its watch), and their short names (`succeeded`), as the CLI prints
them and metrics label them."""

from __future__ import annotations

from backpropagate_api.v1 import common_pb2

TERMINAL_STATUSES = (
    common_pb2.JOB_STATUS_SUCCEEDED,
    common_pb2.JOB_STATUS_FAILED,
    common_pb2.JOB_STATUS_CANCELLED,
    common_pb2.JOB_STATUS_INTERRUPTED,
)


def status_name(status: int) -> str:
    return common_pb2.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()  # type: ignore[arg-type]
