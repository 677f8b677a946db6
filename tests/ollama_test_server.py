"""A loopback stand-in for the part of Ollama's HTTP API that registering a GGUF uses.

It implements exactly `HEAD /api/blobs/:digest`, `POST /api/blobs/:digest` and `POST /api/create`
as Ollama's docs/api.md describes them, and is stricter than Ollama about what it is sent: an
upload must hash to the digest it is sent under, and a create must name blobs it holds, carry a
template string and the parameters, and ask for one answer rather than a stream. It records every
request, so a test can say what the client did, and answers queued statuses first where a test
needs a daemon that fails. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOOPBACK = "127.0.0.1"
_BLOB_PATH = re.compile(r"/api/blobs/sha256[:-](?P<digest>[0-9a-f]{64})")
# The documented fields of /api/create; anything else is a client bug.
_CREATE_FIELDS = {
    "model",
    "from",
    "files",
    "adapters",
    "template",
    "license",
    "system",
    "parameters",
    "messages",
    "stream",
    "quantize",
}


@dataclass
class OllamaTestServer:
    """What the server holds and has seen; `url` is what OLLAMA_HOST would name."""

    url: str
    blobs: dict[str, bytes] = field(default_factory=dict)  # hex sha256 -> content
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> create request
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path), in order
    _queued: dict[str, deque[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, route: str, *statuses: int) -> None:
        """Answer the next requests to `route` ("POST /api/create", "HEAD /api/blobs", ...)
        with these statuses, in order, before handling that route again."""
        with self._lock:
            self._queued.setdefault(route, deque()).extend(statuses)

    def calls(self, method: str, path_prefix: str) -> int:
        """How many requests came in with this method for paths starting with `path_prefix`."""
        return sum(1 for m, path in self.requests if m == method and path.startswith(path_prefix))

    def _queued_status(self, route: str) -> int | None:
        with self._lock:
            queue = self._queued.get(route)
            return queue.popleft() if queue else None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `requests`, not a log."""

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        state = self.server.state
        body = self._read_body()
        with state._lock:
            state.requests.append((self.command, self.path))
        blob = _BLOB_PATH.fullmatch(self.path)
        route = f"{self.command} {'/api/blobs' if blob else self.path}"
        status = state._queued_status(route)
        if status is not None:
            self._answer(status, {"error": f"test server answers {status} to {route}"})
        elif blob and self.command == "HEAD":
            self._answer(200 if blob["digest"] in state.blobs else 404, None)
        elif blob and self.command == "POST":
            self._take_blob(blob["digest"], body)
        elif route == "POST /api/create":
            self._create(body)
        else:
            self._answer(404, {"error": f"no route {route}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _take_blob(self, digest: str, body: bytes) -> None:
        actual = hashlib.sha256(body).hexdigest()
        if actual != digest:
            self._answer(400, {"error": f"digest mismatch, expected sha256:{digest}, got {actual}"})
            return
        state = self.server.state
        with state._lock:
            known = digest in state.blobs
            state.blobs[digest] = body
        self._answer(200 if known else 201, None)

    def _create(self, body: bytes) -> None:
        try:
            request = json.loads(body)
        except ValueError:
            self._answer(400, {"error": "the body is not JSON"})
            return
        problem = _create_problem(request, self.server.state.blobs)
        if problem:
            self._answer(400, {"error": problem})
            return
        with self.server.state._lock:
            self.server.state.models[request["model"]] = request
        self._answer(200, {"status": "success"})

    def _answer(self, status: int, payload: dict[str, Any] | None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _create_problem(request: object, blobs: dict[str, bytes]) -> str | None:
    """Why Ollama would refuse (or this client should not send) a GGUF create request."""
    if not isinstance(request, dict):
        return "the body is not a JSON object"
    unknown = set(request) - _CREATE_FIELDS
    if unknown:
        return f"unknown fields {sorted(unknown)}"
    if not isinstance(request.get("model"), str) or not request["model"]:
        return "model must be a non-empty name"
    files = request.get("files")
    if not isinstance(files, dict) or not files:
        return "files must map file names to blob digests"
    for name, digest in files.items():
        if not name.endswith(".gguf"):
            return f"{name!r} is not a GGUF file name"
        if not isinstance(digest, str) or digest.removeprefix("sha256:") not in blobs:
            return f"no blob {digest!r} for {name!r}"
    if not isinstance(request.get("template"), str) or not request["template"]:
        return "template must be a non-empty string"
    if "system" in request and not isinstance(request["system"], str):
        return "system must be a string"
    parameters = request.get("parameters")
    if not isinstance(parameters, dict):
        return "parameters must be an object"
    stop = parameters.get("stop")
    if not isinstance(stop, list) or not stop or not all(isinstance(s, str) for s in stop):
        return "parameters.stop must be a list of strings"
    num_ctx = parameters.get("num_ctx")
    if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx <= 0:
        return "parameters.num_ctx must be a positive integer"
    if request.get("stream") is not False:
        return "stream must be false: the client reads one answer"
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: OllamaTestServer


@contextmanager
def running_ollama_test_server() -> Iterator[OllamaTestServer]:
    """Serve on a free loopback port until the block ends."""
    server = _Server((LOOPBACK, 0), _Handler)
    server.state = OllamaTestServer(url=f"http://{LOOPBACK}:{server.server_address[1]}")
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="ollama-test-server", daemon=True
    )
    thread.start()
    try:
        yield server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
