"""Start real server processes for tests: Redis, moto's S3, and whatever a test needs next.

Tests talk to the same servers the stack uses, on free loopback ports, so nothing they do can
reach another machine or a developer's own Redis. `running` is the one way to start a process,
wait until it answers and always stop it; the named helpers only say how to start each server and
how to know it is ready.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A test server could not be started; the message says which and why."""


def free_port() -> int:
    """A loopback port nothing listens on right now (also usable as a known-closed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll `ready` until it is true; fail early if `process` exits, else after `timeout`."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"{what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.05)


@contextmanager
def running(
    argv: Sequence[str],
    *,
    ready: Callable[[], bool],
    what: str,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` until the block ends, once `ready` says it answers.

    Its output goes to a file, not a pipe: a chatty server (moto logs every request) would
    block once nobody reads a full pipe. The file's tail is in the error when it fails to start.
    """
    with tempfile.TemporaryFile() as log:
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
def redis_server() -> Iterator[str]:
    """A throwaway Redis with no persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerStartError(
            "redis-server is not installed: the Redis contract and integration tests need a "
            "real one (apt-get install redis-server)."
        )
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
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
