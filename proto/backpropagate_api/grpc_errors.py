"""BackpropagateError <-> gRPC status, both directions.

Servicers raise domain errors; `translate_errors` turns them into a status whose details carry
an `ErrorDetail` (code, message, hint, retryable, context). The client turns a failed call back
into the same error class with `error_from_rpc`, so `except DatasetSchemaError` works across the
wire exactly as it does in-process.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from backpropagate_api.disk_full import disk_full_error, is_disk_full
from backpropagate_api.errors import (
    BackpropagateError,
    DependencyError,
    JobCancelledError,
    ServiceUnavailableError,
    rebuild_error,
)
from backpropagate_api.v1 import common_pb2

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def error_to_detail(error: BackpropagateError) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(
        code=error.code,
        message=error.message,
        hint=error.hint,
        retryable=error.retryable,
        context=error.context,
    )


def detail_to_error(detail: common_pb2.ErrorDetail) -> BackpropagateError:
    return rebuild_error(detail.code, detail.message, detail.hint, dict(detail.context))


# What a status may take of each text, in UTF-8 bytes. It travels in trailers, which gRPC
# clients cap at 8 KiB (and refuse whole beyond), with the message twice: percent-encoded in
# grpc-message and base64-encoded in the details. Messages quote inputs short (`quoted`); these
# bounds hold for any error, so a refusal always arrives as itself.
STATUS_TEXT_BYTES = {"grpc-message": 1000, "message": 1500, "hint": 600, "context": 200}


def _within(text: str, what: str) -> str:
    """`text`, cut to the bytes `what` may take on the wire, and marked where it was cut."""
    limit = STATUS_TEXT_BYTES[what]
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 10].decode(errors="ignore") + " [...cut]"


def error_to_status(error: BackpropagateError) -> grpc.Status:
    detail = error_to_detail(error)
    detail.message = _within(detail.message, "message")
    detail.hint = _within(detail.hint, "hint")
    for key in list(detail.context):
        detail.context[key] = _within(detail.context[key], "context")
    packed = any_pb2.Any()
    packed.Pack(detail)
    status = status_pb2.Status(
        code=getattr(grpc.StatusCode, error.grpc_status).value[0],
        message=_within(str(error), "grpc-message"),
        details=[packed],
    )
    return rpc_status.to_status(status)


def as_backpropagate_error(exc: BaseException) -> BackpropagateError:
    """Any exception as one of ours. A full disk met outside a staged write (a temporary file)
    is RUNTIME_DISK_FULL all the same. An unexpected one becomes INTERNAL with a reference to
    the log line that holds it in full (redacted): its text, which may quote a request, a path
    or a credential, never reaches the client."""
    if isinstance(exc, BackpropagateError):
        return exc
    if is_disk_full(exc):
        return disk_full_error(exc)
    reference = f"ref-{secrets.token_hex(4)}"
    log.error("unexpected error %s", reference, exc_info=exc)
    return BackpropagateError(
        f"Unexpected {type(exc).__name__} in the service (log reference {reference}).",
        reference=reference,
    )


def translate_errors(method: F) -> F:
    """Decorate a servicer method (unary or server-streaming) to report errors as statuses."""

    def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
        context.abort_with_status(error_to_status(as_backpropagate_error(exc)))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                abort(context, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def unary_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            abort(context, exc)

    return unary_wrapper  # type: ignore[return-value]


def error_from_rpc(exc: grpc.RpcError, target: str = "") -> BackpropagateError:
    """Re-create the server's error from a failed call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        for packed in status.details:
            detail = common_pb2.ErrorDetail()
            if packed.Unpack(detail):
                return detail_to_error(detail)
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServiceUnavailableError(
            f"Cannot reach the Backpropagate service at {target or 'its endpoint'}: {details}",
            endpoint=target,
        )
    if code == grpc.StatusCode.CANCELLED:
        return JobCancelledError(f"The call was cancelled: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DependencyError(f"The service at {target} did not answer in time: {details}")
    return BackpropagateError(f"gRPC call failed ({code}): {details}")
