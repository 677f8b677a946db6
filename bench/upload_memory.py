"""Peak memory of a dataset upload by file size: it should not grow with the file.

For each size, a fresh process starts the dataprep service (its gRPC server and the real
servicer, storing into a local artifact directory), uploads a generated JSONL file of that size
through the client and reports its own peak RSS; the client streams the file in chunks, the
service parses and stores it a row at a time. Printed as ratios to the smallest file's peak, and
written to bench/results/upload_memory.json.

    .venv/bin/python bench/upload_memory.py [--sizes-mb 1 100 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "upload_memory.json"

UPLOAD_AND_REPORT = """
import json, sys, time
from pathlib import Path
from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_services.common.hardware import peak_rss_bytes
from backpropagate_api.settings import Settings
from backpropagate_services.stack import start_stack

data, home = Path(sys.argv[1]), Path(sys.argv[2])
stack = start_stack(Settings(home=home), ["dataprep"], "127.0.0.1:0")
connection = Connection({"dataprep": stack.address}, False)
start = time.perf_counter()
info = upload_dataset(connection, data)
seconds = time.perf_counter() - start
connection.close()
stack.stop()
peak = peak_rss_bytes()
print(json.dumps({"peak": peak, "rows": info.num_examples, "seconds": seconds}))
"""


def write_dataset(path: Path, size_bytes: int) -> None:
    """Chat rows of varied length up to `size_bytes`, written a block at a time."""
    block = []
    for n in range(1000):
        answer = " ".join(["word"] * (20 + n % 200))
        row = {
            "messages": [
                {"role": "user", "content": f"Question number {n}?"},
                {"role": "assistant", "content": answer},
            ]
        }
        block.append(json.dumps(row))
    text = ("\n".join(block) + "\n").encode()
    with path.open("wb") as handle:
        while handle.tell() + len(text) <= size_bytes:
            handle.write(text)
        rest = text[: size_bytes - handle.tell()]
        handle.write(rest[: rest.rfind(b"\n") + 1])  # whole rows only


def main() -> None:
    from backpropagate_services.common.hardware import cpu_name

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 100, 1000])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bp-upload-bench-") as tmp:
        for size_mb in args.sizes_mb:
            data = Path(tmp) / f"data-{size_mb}mb.jsonl"
            write_dataset(data, size_mb * 2**20)
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", UPLOAD_AND_REPORT, str(data), str(Path(tmp) / "home")],
                capture_output=True,
                text=True,
                check=True,
            )
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            measured |= {"size_mb": size_mb, "wall_seconds": time.perf_counter() - started}
            results.append(measured)
            data.unlink()
    base = results[0]["peak"]
    print(f"CPU: {cpu_name()}")
    print(f"{'file':>8} {'rows':>10} {'upload s':>9} {'peak RSS':>10} {'vs smallest':>12}")
    for row in results:
        print(
            f"{row['size_mb']:>6}MB {row['rows']:>10,} {row['seconds']:>9.1f} "
            f"{row['peak'] / 2**20:>8.0f}MB {row['peak'] / base:>11.2f}x"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
