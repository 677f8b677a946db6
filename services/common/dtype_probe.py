"""bf16 or fp32 on a CPU: decided by timing the matrix products a training step makes.

CPU flags do not settle it. AVX-512 BF16 on an AMD Zen 4 EPYC makes torch's bf16 products fast;
on an Intel Xeon with the same flag and no AMX they run at about half fp32's speed, and a run
trained there in bf16 took 1.8x as long as in fp32. So the products of one training step of the
model (each linear layer's forward `x W^T` and the backward pass's `g W` through the frozen
weight, for attention's hidden x hidden, the MLP's hidden x intermediate both ways and the LM
head's hidden x vocabulary, at a few hundred rows) are timed in both dtypes with the threads the
run trains with, and the faster kept; bf16 must win by BF16_MIN_SPEEDUP, since fp32 is the
more exact of the two. A verdict is kept in a JSON file under the home directory, by a key that
names the machine, torch's version and the shapes, so each machine probes once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backpropagate_api.errors import BackpropagateError
from backpropagate_services.common.atomic import staged

if TYPE_CHECKING:
    import torch

    Operands = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

log = logging.getLogger(__name__)

CACHE_FILE_NAME = "cpu-dtype.json"
DTYPES = ("float32", "bfloat16")
BF16_MIN_SPEEDUP = 1.1  # below it fp32's exactness is worth more than the time saved
PROBE_ROWS = 256  # tokens of a micro-batch: a few hundred, as training multiplies
# Past a few thousand columns a product runs at the same rate; the cap keeps a 150k vocabulary's
# head from making the probe take seconds.
MAX_PROBE_WIDTH = 8192
MAX_ROUNDS = 3
PROBE_SECONDS = 1.0  # timed rounds stop past this, after the first


@dataclass(frozen=True)
class MatmulShapes:
    """The sizes of a model that set the shapes of its training products."""

    hidden: int
    intermediate: int
    vocab: int

    @property
    def weights(self) -> list[tuple[int, int]]:
        """(out, in) of attention's projection, the MLP's up and down, and the LM head."""
        h, i, v = (
            min(size, MAX_PROBE_WIDTH) for size in (self.hidden, self.intermediate, self.vocab)
        )
        return [(h, h), (i, h), (h, i), (v, h)]

    @property
    def flops(self) -> int:
        """FLOPs of one round in one dtype: a forward and a backward product per weight."""
        return sum(2 * 2 * PROBE_ROWS * out * in_ for out, in_ in self.weights)


# SmolLM2-135M-Instruct, the offline default model: what a caller that names no model probes.
DEFAULT_SHAPES = MatmulShapes(hidden=576, intermediate=1536, vocab=49152)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run computes in, and why, as the run record shows it."""

    dtype: str
    reason: str
    fp32_gflops: float = 0.0  # what the probe measured; 0: nothing was measured
    bf16_gflops: float = 0.0


def choose(fp32_gflops: float, bf16_gflops: float) -> DtypeChoice:
    """The rule: bf16 where it multiplies at least BF16_MIN_SPEEDUP times as fast as fp32."""
    speedup = bf16_gflops / fp32_gflops
    return DtypeChoice(
        dtype="bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32",
        reason=f"bf16 matmuls of this model's shapes ran at {speedup:.2f}x fp32's speed here: "
        f"{bf16_gflops:.0f} against {fp32_gflops:.0f} GFLOP/s",
        fp32_gflops=fp32_gflops,
        bf16_gflops=bf16_gflops,
    )


def probe(shapes: MatmulShapes) -> DtypeChoice:
    """Time one training step's products in both dtypes and choose. The dtypes alternate round
    by round, so a load that comes and goes slows both alike, and each keeps its best round."""
    import torch

    operands = {dtype: _operands(shapes, getattr(torch, dtype)) for dtype in DTYPES}
    for dtype in DTYPES:  # warm-up: first calls pick kernels and allocate
        _one_round(operands[dtype])
    best = dict.fromkeys(DTYPES, float("inf"))
    started = time.perf_counter()
    for _ in range(MAX_ROUNDS):
        for dtype in DTYPES:
            best[dtype] = min(best[dtype], _one_round(operands[dtype]))
        if time.perf_counter() - started > PROBE_SECONDS:
            break
    fp32, bf16 = (shapes.flops / best[dtype] / 1e9 for dtype in DTYPES)
    return choose(fp32, bf16)


def _operands(shapes: MatmulShapes, dtype: torch.dtype) -> Operands:
    """(input, weight, output gradient) per weight, as nn.Linear stores and meets them."""
    import torch

    generator = torch.Generator().manual_seed(0)

    def random(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(dtype)

    return [
        (random(PROBE_ROWS, in_), random(out, in_), random(PROBE_ROWS, out))
        for out, in_ in shapes.weights
    ]


def _one_round(operands: Operands) -> float:
    import torch

    started = time.perf_counter()
    with torch.no_grad():
        for x, weight, gradient in operands:
            torch.nn.functional.linear(x, weight)
            torch.matmul(gradient, weight)
    return time.perf_counter() - started


def cached_probe(cache_file: Path, key: str, shapes: MatmulShapes) -> DtypeChoice:
    """The verdict stored under `key` in `cache_file`, else a fresh probe, stored there. A
    cache that cannot be read is probed over; one that cannot be written is only logged."""
    verdicts = _read_cache(cache_file)
    known = verdicts.get(key)
    if known is not None:
        return known
    choice = probe(shapes)
    log.info("cpu dtype probe (%s): %s, %s", key, choice.dtype, choice.reason)
    entries = {name: asdict(verdict) for name, verdict in verdicts.items()}
    entries[key] = asdict(choice)
    try:
        with staged(cache_file) as partial:
            partial.write_text(json.dumps(entries, indent=2) + "\n")
    except (OSError, BackpropagateError) as exc:  # a full disk comes as RUNTIME_DISK_FULL
        log.warning("could not keep the cpu dtype verdict in %s: %s", cache_file, exc)
    return choice


def _read_cache(cache_file: Path) -> dict[str, DtypeChoice]:
    """The verdicts in `cache_file`; none where it is missing or not what this module wrote
    (the probe then runs again and the file is written afresh)."""
    try:
        entries = json.loads(cache_file.read_text())
        if not isinstance(entries, dict):
            raise ValueError("not an object")
        return {key: _verdict(entry) for key, entry in entries.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as exc:
        log.warning("cpu dtype cache %s unreadable (%s): probing again", cache_file, exc)
        return {}


def _verdict(entry: object) -> DtypeChoice:
    if (
        not isinstance(entry, dict)
        or entry.get("dtype") not in DTYPES
        or not isinstance(entry.get("reason"), str)
    ):
        raise ValueError(f"not a verdict: {entry!r:.80}")
    return DtypeChoice(**entry)
