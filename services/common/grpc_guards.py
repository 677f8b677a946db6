"""What every server checks before a call reaches a servicer: the caller's token, that the
server has room for one more call, that the request's bytes are a message of its type, and that
a client stream keeps sending.

Health checks pass the first two: orchestrators probe without credentials, and a server full of
watches must still say it is alive. The checks are interceptors, so no servicer can forget them.
"""

from __future__ import annotations

import hmac
import queue
import threading
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterator
from typing import Any

import grpc

from backpropagate_api.channels import AUTHORIZATION, STACK_CALL, bearer
from backpropagate_api.errors import (
    AuthFailedError,
    BackpropagateError,
    ServerBusyError,
    StreamIdleError,
    UserError,
)
from backpropagate_api.grpc_errors import error_to_status

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
# Streaming calls kept for the stack's own (the trainer's watch of its safety sidecar), beyond
# the limit others share: callers holding every other slot must not leave a trainer training
# without safety levels. A trainer holds one; the rest cover a restarted trainer whose old
# stream the server has not yet seen go, and a few trainers sharing one sidecar.
STACK_STREAMS = 4

Handler = Any  # grpc.RpcMethodHandler: grpc ships no type hints


def _shape(handler: Handler) -> str:
    """unary_unary, unary_stream, stream_unary or stream_stream: gRPC's name for the call's
    shape, in its handler's fields and its handler factories."""
    streams_in = "stream" if handler.request_streaming else "unary"
    streams_out = "stream" if handler.response_streaming else "unary"
    return f"{streams_in}_{streams_out}"


def behaviour_of(handler: Handler) -> Callable[..., Any]:
    """The servicer function `handler` calls."""
    return getattr(handler, _shape(handler))  # type: ignore[no-any-return]


def rebuilt(
    handler: Handler,
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """A handler of `handler`'s shape that calls `behaviour` instead."""
    make = getattr(grpc, f"{_shape(handler)}_rpc_method_handler")
    return make(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _rejecting(handler: Handler, error: BackpropagateError) -> Handler:
    """A handler of `handler`'s shape that answers every call with `error`."""

    def reject(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(error_to_status(error))

    return rebuilt(handler, reject)


class _AllButHealth(grpc.ServerInterceptor):  # type: ignore[misc]
    """An interceptor that guards every method of the server but the health checks."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler
        return self.guarded(handler, details)

    @abstractmethod
    def guarded(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        """`handler`, or a handler of its shape that checks first."""


class TokenAuth(_AllButHealth):
    """Every call but a health check carries `authorization: Bearer <token>`, or is refused
    with INPUT_AUTH_FAILED (UNAUTHENTICATED) before any servicer code runs."""

    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()

    def guarded(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        given = dict(details.invocation_metadata or ()).get(AUTHORIZATION, "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        reason = "carries no token" if not given else "carries a token that is not this stack's"
        return _rejecting(handler, AuthFailedError(f"The call to {details.method} {reason}."))


class CallLimits(_AllButHealth):
    """At most `calls` calls at once, of them at most `streams` server-streaming ones (watches,
    downloads); beyond that a call is refused at once with RUNTIME_SERVER_BUSY
    (RESOURCE_EXHAUSTED). A streaming call marked as the stack's own (`channels.STACK_CALL`)
    takes one of `STACK_STREAMS` slots kept for such calls first, so callers who fill the
    others cannot keep the trainer from its safety sidecar.

    The mark is no credential: a caller that may call the server at all could send it too, and
    would then hold those slots as well. It keeps them from callers that fill the others by
    accident or by plain abuse; one that impersonates the stack holds its token, and could do
    worse than that.

    A call takes its slots when it starts running and gives them back when it returns, or for
    a streaming call when its stream ends or the client leaves. The server's thread pool is
    larger than `calls` plus the kept slots (see `grpc_server`), so threads stay free for
    health checks and for refusing: a hundred watches cannot wedge a server."""

    def __init__(self, calls: int, streams: int, stack_streams: int = STACK_STREAMS) -> None:
        self.limits = (calls, min(streams, calls))
        self.calls = threading.BoundedSemaphore(self.limits[0])
        self.streams = threading.BoundedSemaphore(self.limits[1])
        self.stack_streams = threading.BoundedSemaphore(stack_streams)

    def guarded(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        behaviour = behaviour_of(handler)
        metadata = dict(details.invocation_metadata or ())
        stack_call = metadata.get(STACK_CALL[0]) == STACK_CALL[1]

        if handler.response_streaming:

            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                taken = self._take(True, details.method, context, stack_call)
                try:
                    yield from behaviour(request, context)
                finally:
                    _release(taken)

        else:

            def call(request: Any, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
                taken = self._take(False, details.method, context)
                try:
                    return behaviour(request, context)
                finally:
                    _release(taken)

        return rebuilt(handler, call)

    def _take(
        self,
        streaming: bool,
        method: str,
        context: grpc.ServicerContext,
        stack_call: bool = False,
    ) -> list[threading.BoundedSemaphore]:
        """This call's slots, or the call aborted as RUNTIME_SERVER_BUSY."""
        if streaming and stack_call and self.stack_streams.acquire(blocking=False):
            return [self.stack_streams]
        slots = [self.calls, self.streams] if streaming else [self.calls]
        taken = [slot for slot in slots if slot.acquire(blocking=False)]
        if len(taken) < len(slots):
            _release(taken)
            limit = self.limits[1] if streaming else self.limits[0]
            what = "streaming calls" if streaming else "calls"
            error = ServerBusyError(
                f"The server already runs {limit} {what}; {method} was refused.", limit=limit
            )
            context.abort_with_status(error_to_status(error))  # raises
        return taken


def _release(taken: list[threading.BoundedSemaphore]) -> None:
    for slot in taken:
        slot.release()


class _Unreadable:
    """What a request that is not its method's message deserialises to (see ReadableRequests)."""

    def __init__(self, method: str, error: Exception) -> None:
        self.error = UserError(
            f"The request to {method} is not a valid message of its type: {error}.",
            hint="Send the request the method's proto defines (proto/backpropagate_api/v1).",
        )


class ReadableRequests(grpc.ServerInterceptor):  # type: ignore[misc]
    """A request whose bytes are no message of its type is INPUT_INVALID (INVALID_ARGUMENT)
    from the servicer's own error path, not gRPC's bare INTERNAL: a unary call is refused
    before the servicer runs; a client stream raises the error where the servicer reads the
    bad message, so what it did before is undone as for any other bad input."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        behaviour = behaviour_of(handler)

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # protobuf's DecodeError, or any parser's
                return _Unreadable(details.method, exc)

        def checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                if isinstance(request, _Unreadable):
                    raise request.error
                yield request

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if handler.request_streaming:
                return behaviour(checked_stream(request), context)
            if isinstance(request, _Unreadable):
                context.abort_with_status(error_to_status(request.error))
            return behaviour(request, context)

        return rebuilt(handler, call, deserialize)


class IdleClientStreams(_AllButHealth):
    """A client stream (an upload, an adapter import) that sends nothing for `idle_seconds` is
    ended with INPUT_STREAM_IDLE, as a watch without events ends: a client that sends a header
    and then stays silent would otherwise hold a call slot and a thread while it stays connected.

    gRPC's request iterator waits without a timeout, so the messages are read on a daemon
    thread of the call's own and the servicer waits for each at most `idle_seconds`; the error
    is raised where the servicer reads, so what it did before is undone as for any bad input.
    Once the call has ended, gRPC ends that thread's read too, and the thread goes."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds

    def guarded(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        if not handler.request_streaming:
            return handler
        behaviour = behaviour_of(handler)

        if handler.response_streaming:

            def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                stream = self._paced(requests, details.method)
                try:
                    yield from behaviour(stream, context)
                finally:
                    stream.close()

        else:

            def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
                stream = self._paced(requests, details.method)
                try:
                    return behaviour(stream, context)
                finally:
                    stream.close()

        return rebuilt(handler, call)

    def _paced(self, requests: Iterator[Any], method: str) -> Generator[Any, None, None]:
        """`requests`, each read on the reader thread when asked for and waited for at most
        `idle_seconds`; closing it lets the thread go once its read returns."""
        wanted: queue.SimpleQueue[bool] = queue.SimpleQueue()
        read: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
        end = object()

        def reader() -> None:
            while wanted.get():
                try:
                    read.put((next(requests, end), None))
                except BaseException as exc:  # the client left: the servicer sees it as before
                    read.put((end, exc))
                    return

        threading.Thread(target=reader, name="client-stream", daemon=True).start()
        try:
            while True:
                wanted.put(True)
                try:
                    request, error = read.get(timeout=self.idle_seconds)
                except queue.Empty:
                    raise StreamIdleError(
                        f"{method.rsplit('/', 1)[-1]} received no message for "
                        f"{self.idle_seconds:g} s, so the call was ended."
                    ) from None
                if error is not None:
                    raise error
                if request is end:
                    return
                yield request
        finally:
            wanted.put(False)
