"""The machine a benchmark ran on, named the same way in every script's output and results:
the CPU model and the instruction sets that decide its speed (AVX2, AVX-512, bf16, AMX), and
what the trainer's dtype probe measures there."""

from __future__ import annotations

SPEED_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def speed_flags() -> list[str]:
    """This CPU's flags among SPEED_FLAGS, sorted."""
    from backpropagate_services.common.hardware import cpu_flags

    return sorted(cpu_flags() & SPEED_FLAGS)


def described() -> str:
    """ "AMD EPYC (avx2), 2 cores": the model name, its speed flags and its cores."""
    import os

    from backpropagate_services.common.hardware import cpu_name

    return f"{cpu_name()} ({', '.join(speed_flags())}), {os.cpu_count()} cores"


def dtype_verdict() -> dict[str, object]:
    """A fresh run of the trainer's CPU dtype probe on the offline model's shapes (never the
    cached verdict): fp32's and bf16's GFLOP/s here and the dtype they decide. A CPU without
    bf16 instructions is measured too, though the trainer takes fp32 there unmeasured."""
    from dataclasses import asdict

    from backpropagate_services.common.dtype_probe import DEFAULT_SHAPES, probe

    return asdict(probe(DEFAULT_SHAPES))
