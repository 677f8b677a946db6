"""moto's S3 server on :9000 that keeps its buckets across restarts, as MinIO keeps them on its
volume: the state is loaded from /data at start and saved there when the container is stopped
(SIGTERM: `docker compose stop` or `down`), so the container test's `down` then `up` finds the
runs and exports it left. moto keeps objects in memory and pickles them whole (its S3 keys
define their pickled state); a kill loses what changed since the start, as no test needs more.

    python server.py          serve
    python server.py check    the health check: exit 0 once the server answers
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import urllib.request
from pathlib import Path

STATE = Path("/data/moto-s3.pickle")


def check() -> int:
    try:
        urllib.request.urlopen("http://127.0.0.1:9000/", timeout=4).close()
    except OSError as error:
        print(error)
        return 1
    return 0


def serve() -> int:
    # Imported here, not at the top: the health check runs every few seconds without moto.
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    if STATE.exists():
        with STATE.open("rb") as file:
            for account, regions in pickle.load(file).items():
                for region, backend in regions.items():
                    s3_backends[account][region] = backend
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=9000, verbose=False)
    server.start()
    stopped = threading.Event()
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: stopped.set())
    stopped.wait()
    server.stop()
    partial = STATE.with_suffix(".partial")
    with partial.open("wb") as file:
        pickle.dump({account: dict(regions) for account, regions in s3_backends.items()}, file)
    os.replace(partial, STATE)
    return 0


if __name__ == "__main__":
    sys.exit(check() if sys.argv[1:] == ["check"] else serve())
