"""A worker trains run after run in one process: each run's record must carry its own peak
memory, not the largest peak of every run the process trained before it."""

from __future__ import annotations

import subprocess
import sys

MIB = 2**20

# A process that peaks at 400 MiB more than it holds afterwards, as a big run before a small one.
SCRIPT = """
from backpropagate_services.common.hardware import detect, peak_memory_bytes, reset_peak_memory
hardware = detect("float32")
big = bytearray(400 * 2**20)
big[:: 4096] = b"x" * len(big[:: 4096])  # touch every page, so it is resident
del big
before = peak_memory_bytes(hardware)
reset_peak_memory(hardware)
print(before, peak_memory_bytes(hardware))
"""


def test_resetting_the_peak_forgets_what_an_earlier_run_held() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    before, after = (int(value) for value in result.stdout.split())

    assert before - after > 300 * MIB
