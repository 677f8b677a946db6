"""Reaching the services: a remote stack at BACKPROPAGATE_ENDPOINT, or the embedded default.

With no endpoint configured, the first connection starts every service in this process (one
gRPC server on a free loopback port, the in-process queue, artifacts under ~/.backpropagate) and
talks to it over gRPC like to any remote stack, so both deployments share every line of client
code. Calls made through `Connection.call` / `Connection.stream` raise BackpropagateError
subclasses, never raw grpc.RpcError.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from pydantic import SecretStr

from backpropagate.in_process import STACK_EXTRAS, services_needed
from backpropagate.local_reads import local_stubs
from backpropagate_api.channels import check_token_destination, open_channel
from backpropagate_api.grpc_errors import error_from_rpc
from backpropagate_api.private_files import private_home
from backpropagate_api.settings import Settings, get_settings
from backpropagate_api.tracing import start_tracing
from backpropagate_api.v1 import (
    dataprep_pb2_grpc,
    export_pb2_grpc,
    safety_pb2_grpc,
    trainer_pb2_grpc,
)

if TYPE_CHECKING:
    from backpropagate_services.stack import RunningStack

T = TypeVar("T")

SERVICES = ("dataprep", "trainer", "safety", "export")
# What traces call a client process; with the embedded default it is the stack's process too.
CLIENT_SERVICE_NAME = "backpropagate-client"
EMBEDDED_SERVICE_NAME = "backpropagate"


def start_client_tracing(settings: Settings) -> None:
    """Send this process's spans where the settings say (backpropagate_api.tracing), before
    its first span: one started earlier would be recorded by nobody."""
    embedded = any(settings.endpoint_of(name) is None for name in SERVICES)
    start_tracing(settings, EMBEDDED_SERVICE_NAME if embedded else CLIENT_SERVICE_NAME)


# Set by `backprop --verbose` (or by hand): full tracebacks, and the embedded stack's log lines
# on the terminal too. An environment variable, so a worker process this one starts inherits it.
VERBOSE_VARIABLE = "BACKPROPAGATE_DEBUG"


def verbose() -> bool:
    return bool(os.environ.get(VERBOSE_VARIABLE))


_embedded_lock = threading.Lock()
# One all-in-one stack per home directory: a process that opens Trainers on two homes must
# write each one's runs under its own home, never into the first stack it started.
_embedded_stacks: dict[Path, RunningStack] = {}


def embedded_stack(settings: Settings, workers: bool = True) -> RunningStack:
    """Start the all-in-one stack for `settings.home` in this process once, and return it.

    Its queue and records live in files under the home directory, shared by every process on
    the machine; only a process that does jobs (train, resume, export) runs workers, so that
    `runs list` in another terminal never takes a job it would drop on exit. It listens on
    loopback with a token of its own (random, unless BACKPROPAGATE_TOKEN sets one): other
    users of this machine can reach the port but not call it, nor read the home directory
    (0700; the store's, queue's and logs' files 0600).
    """
    home = settings.home.resolve()
    with _embedded_lock:
        stack = _embedded_stacks.get(home)
        if stack is None:
            with services_needed(
                "With no endpoint set, Backpropagate", STACK_EXTRAS, or_endpoint=True
            ):
                from backpropagate_services.common.logs import configure_from_settings
                from backpropagate_services.stack import SERVICES, start_stack

                private_home(settings.home)
                configure_from_settings(
                    settings, settings.home / "logs" / "embedded.log", mirror_stderr=verbose()
                )
                # A run this process trains is left interrupted on exit, not handed to whatever
                # `backprop` command runs next: `backprop runs resume` goes on with it.
                interrupt = settings.trainer.model_copy(update={"release_on_shutdown": False})
                token = settings.token or SecretStr(secrets.token_urlsafe(32))
                stack = start_stack(
                    settings.model_copy(update={"trainer": interrupt, "token": token}),
                    list(SERVICES),
                    "127.0.0.1:0",
                    start_workers=False,
                )
            _embedded_stacks[home] = stack
            # At exit, concurrent.futures joins the gRPC server's threads before atexit
            # handlers run, and the trainer's own safety Watch stream keeps one of them busy
            # for ever: stop the stack from threading's exit hook, which runs first. A worker
            # mid-run checkpoints and releases its job there (`backprop runs resume` goes on).
            threading._register_atexit(stack.stop)  # type: ignore[attr-defined]
        if workers:
            stack.start_workers()
        return stack


@dataclass
class Connection:
    addresses: dict[str, str]
    embedded: bool
    settings: Settings | None = None  # TLS and the token; None: the process's settings
    token: str | None = None  # overrides the settings' token (the embedded stack's own)
    # Read-only stand-ins for services with no endpoint (`for_reading`), by service name.
    local: dict[str, Any] = field(default_factory=dict)
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings | None = None, *, workers: bool = True) -> Connection:
        """`workers=False`: a connection that only reads (records, events) and submits; with
        the embedded default, this process then takes no jobs."""
        settings = settings or get_settings()
        configured = {name: settings.endpoint_of(name) for name in SERVICES}
        check_token_destination(settings, [name for name, address in configured.items() if address])
        embedded = any(address is None for address in configured.values())
        start_client_tracing(settings)
        if not embedded:
            remote = {name: str(address) for name, address in configured.items()}
            return cls(remote, False, settings)
        stack = embedded_stack(settings, workers)
        addresses = {name: configured[name] or stack.address for name in SERVICES}
        return cls(addresses, embedded, stack.runtime.settings, stack.token)

    @classmethod
    def for_reading(cls, settings: Settings | None = None) -> Connection:
        """A connection for read-only calls (run and export records, downloads, safety
        snapshots). A service with no endpoint is read from this machine's files without
        starting the embedded stack (local_reads); one with an endpoint is dialled."""
        settings = settings or get_settings()
        configured = {name: settings.endpoint_of(name) for name in SERVICES}
        check_token_destination(settings, [name for name, address in configured.items() if address])
        start_client_tracing(settings)
        remote = {name: str(address) for name, address in configured.items() if address}
        embedded = len(remote) < len(SERVICES)
        local = local_stubs(settings) if embedded else {}
        return cls(
            remote, embedded, settings, local={n: local[n] for n in local if n not in remote}
        )

    def _stub(self, service: str, stub: Callable[[grpc.Channel], T]) -> T:
        if service in self.local:
            local: T = self.local[service]
            return local
        return stub(self.channel(service))

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(
                self.addresses[service],
                self.settings or get_settings(),
                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
                token=self.token,
            )
        return self._channels[service]

    @property
    def dataprep(self) -> dataprep_pb2_grpc.DataprepServiceStub:
        return self._stub("dataprep", dataprep_pb2_grpc.DataprepServiceStub)

    @property
    def trainer(self) -> trainer_pb2_grpc.TrainerServiceStub:
        return self._stub("trainer", trainer_pb2_grpc.TrainerServiceStub)

    @property
    def safety(self) -> safety_pb2_grpc.SafetyServiceStub:
        return self._stub("safety", safety_pb2_grpc.SafetyServiceStub)

    @property
    def export(self) -> export_pb2_grpc.ExportServiceStub:
        return self._stub("export", export_pb2_grpc.ExportServiceStub)

    def call(self, service: str, method: Callable[..., T], request: Any, **kwargs: Any) -> T:
        try:
            return method(request, **kwargs)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.addresses[service]) from None

    def stream(self, service: str, method: Callable[..., Iterator[T]], request: Any) -> Iterator[T]:
        try:
            yield from method(request)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.addresses[service]) from None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
