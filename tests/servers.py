"""Start real server processes for tests: Redis, moto's S3, and whatever a test needs next.

Tests talk to the same servers the stack uses, on free loopback ports, so nothing they do can
reach another machine or a developer's own Redis. `running` is the one way to start a process,
wait until it answers and always stop it; the named helpers only say how to start each server and
how to know it is ready. Drills take a dependency away mid-test with `Restartable` (a server
stopped and started again on its port) and `tcp_forwarder` (a cut network path to a server that
keeps its state).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO, Any

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A test server could not be started; the message says which and why."""


def free_port() -> int:
    """A loopback port nothing listens on right now (also usable as a known-closed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def free_address() -> str:
    """host:port for a server of the test's own on a free loopback port."""
    return f"{LOOPBACK}:{free_port()}"


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    interval: float = 0.05,
) -> None:
    """Poll `ready` every `interval` seconds until it is true; fail early if `process` exits,
    else after `timeout`."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"{what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(interval)


def _log_file(path: Path | None) -> IO[bytes]:
    return path.open("w+b") if path else tempfile.TemporaryFile()


@contextmanager
def running(
    argv: Sequence[str],
    *,
    ready: Callable[[], bool],
    what: str,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` until the block ends, once `ready` says it answers.

    Its output goes to a file, not a pipe: a chatty server (moto logs every request) would
    block once nobody reads a full pipe. The file's tail is in the error when it fails to start.
    With `log_path` the file is kept there, for a test that reads what the process said.
    """
    with _log_file(log_path) as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            try:
                wait_until(ready, what=what, timeout=timeout, process=process)
            except ServerStartError as error:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise ServerStartError(f"{error}; its output:\n{tail}") from None
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def redis_answers(port: int) -> bool:
    """True once Redis on `port` answers PING (inline command: no client, no retries)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_answers(url: str) -> bool:
    """True once anything answers HTTP at `url`, even with an error status."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:  # refused, reset, timed out: not up yet
        return False


@contextmanager
def redis_server(port: int | None = None, data_dir: Path | None = None) -> Iterator[str]:
    """A throwaway Redis, with no persistence unless `data_dir` is given: then its append-only
    file there keeps the streams across a restart on the same `port`. Yields its URL.

    Stopping it (SIGTERM) is a clean shutdown, which writes the append-only file out.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerStartError(
            "redis-server is not installed: the Redis contract and integration tests need a "
            "real one (apt-get install redis-server)."
        )
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", ""]
    if data_dir is None:
        argv += ["--appendonly", "no"]
    else:
        argv += ["--appendonly", "yes", "--dir", str(data_dir)]
    with running(argv, ready=lambda: redis_answers(port), what="redis-server"):
        yield f"redis://{LOOPBACK}:{port}/0"


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 (accepts any credentials); yields its endpoint as host:port."""
    # Next to the interpreter, so the venv's moto is used even when the venv is not activated.
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        raise ServerStartError(f"moto_server not found at {binary}: install moto[server].")
    port = free_port()
    argv = [str(binary), "-H", LOOPBACK, "-p", str(port)]
    with running(argv, ready=lambda: http_answers(f"http://{LOOPBACK}:{port}/"), what="moto"):
        yield f"{LOOPBACK}:{port}"


@contextmanager
def tcp_forwarder(port: int, target: str) -> Iterator[str]:
    """Forward connections to loopback `port` to `target` (host:port) until the block ends;
    yields the forwarder's own host:port.

    When the block ends the port refuses connections and the open ones are cut, while the server
    behind keeps running with its state (moto keeps its objects in memory): to that server's
    clients, an outage of it. Starting a forwarder again on the same port ends the outage.
    """
    host, target_port = target.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebound after an outage
    listener.bind((LOOPBACK, port))
    listener.listen()
    listener.settimeout(0.1)  # so the accept loop sees `stopped` soon
    stopped = threading.Event()
    connections: list[socket.socket] = []

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)  # pass the end of the stream on
        except OSError:  # cut by the outage, or by the other side
            pass

    def accept() -> None:
        while not stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                upstream = socket.create_connection((host, int(target_port)), timeout=5)
            except OSError:  # the server itself is away: so is the forwarded port
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                connections.append(sock)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(source, sink), daemon=True).start()

    acceptor = threading.Thread(target=accept, name=f"forwarder-{port}", daemon=True)
    acceptor.start()
    try:
        yield f"{LOOPBACK}:{port}"
    finally:
        stopped.set()
        acceptor.join()
        listener.close()
        for sock in connections:
            with suppress(OSError):  # already closed by its peer
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Restartable:
    """A server a test takes down and brings back mid-test: `start` enters the context manager
    `server()` makes (same port, same data directory every time), `stop` leaves it, and the
    server is stopped when the `with` block ends, whatever state the test left it in."""

    def __init__(self, server: Callable[[], AbstractContextManager[Any]]) -> None:
        self._server = server
        self._running: ExitStack | None = None
        self.address: Any = None  # what the server's context manager yields (its URL)

    def __enter__(self) -> Restartable:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._running is not None:
            self.stop()

    def start(self) -> None:
        running = ExitStack()
        self.address = running.enter_context(self._server())
        self._running = running

    def stop(self) -> None:
        assert self._running is not None, "stopped twice"
        running, self._running = self._running, None
        running.close()

    @contextmanager
    def down(self) -> Iterator[None]:
        """An outage for the length of the block."""
        self.stop()
        try:
            yield
        finally:
            self.start()
