"""The job statuses after which a run or an export changes no more: where a client stops
following it and a server ends its watch."""

from __future__ import annotations

from backpropagate_api.v1 import common_pb2

TERMINAL_STATUSES = (
    common_pb2.JOB_STATUS_SUCCEEDED,
    common_pb2.JOB_STATUS_FAILED,
    common_pb2.JOB_STATUS_CANCELLED,
    common_pb2.JOB_STATUS_INTERRUPTED,
)
