"""What this machine trains on: the device, the dtype it computes fast in, and how much fits.

Decided once per run from what the hardware reports, and written into the run record, so a run's
numbers can be read knowing where they came from. Import-light: torch loads on first use.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

GIB = 1024**3
# CPU flags of the instructions that make bf16 matrix products fast (Intel AMX, AVX-512 BF16 on
# Intel Cooper Lake+ and AMD Zen 4+). Without them torch emulates bf16 and fp32 is faster.
FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda:0" or "cpu"
    name: str  # the GPU's or the CPU's model name
    compute_dtype: str  # "bfloat16" or "float32": what the base model is loaded and run in
    total_memory: int  # bytes of VRAM, or of host memory
    free_memory: int
    cores: int
    fp8: bool  # Hopper / Blackwell: FP8 tensor cores
    note: str = ""  # what a user should know about this choice

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """The first CPU's fields as Linux reports them (/proc/cpuinfo); none elsewhere."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags; none where unknown (fp32 is then the safe choice)."""
    return frozenset(cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_compute_dtype(setting: str = "auto") -> str:
    """bf16 where the CPU multiplies it natively (about 1.7x the speed of fp32 on SmolLM2 on a
    Zen 4 EPYC), fp32 elsewhere; `setting` forces one."""
    if setting != "auto":
        return setting
    return "bfloat16" if cpu_flags() & FAST_BF16_CPU_FLAGS else "float32"


def detect(cpu_dtype: str = "auto") -> Hardware:
    """The device a run trains on: the first CUDA GPU, else the CPU (Apple's MPS is reported
    as unsupported, not used)."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        properties = torch.cuda.get_device_properties(0)
        return Hardware(
            device="cuda:0",
            name=properties.name,
            compute_dtype="bfloat16" if torch.cuda.is_bf16_supported() else "float16",
            total_memory=int(total),
            free_memory=int(free),
            cores=int(properties.multi_processor_count),
            fp8=(properties.major, properties.minor) >= (8, 9),
        )
    mps = getattr(torch.backends, "mps", None)
    note = (
        "Apple MPS is not supported for training (untested, and its bf16 and memory reports "
        "differ): training on the CPU"
        if mps is not None and mps.is_available()
        else ""
    )
    import psutil

    memory = psutil.virtual_memory()
    return Hardware(
        device="cpu",
        name=cpu_name(),
        compute_dtype=cpu_compute_dtype(cpu_dtype),
        total_memory=int(memory.total),
        free_memory=int(memory.available),
        cores=os.cpu_count() or 1,
        fp8=False,
        note=note,
    )


def default_micro_batch(hardware: Hardware) -> int:
    """Conversations one forward pass takes by default: from free VRAM (>= 24 GB: 4, >= 16 GB:
    2, else 1); on the CPU from free host memory and cores, since a wider batch only pays off
    when there are cores to run it and memory to hold its activations."""
    free_gib = hardware.free_memory / GIB
    if hardware.is_cuda:
        return 4 if free_gib >= 24 else 2 if free_gib >= 16 else 1
    if free_gib >= 8 and hardware.cores >= 2:
        return 4
    return 2 if free_gib >= 4 else 1


def peak_memory_bytes(hardware: Hardware) -> int:
    """The peak so far: GPU memory torch allocated on CUDA; on the CPU the process's peak RSS
    (everything the process holds, so with the embedded stack the services' share too)."""
    if hardware.is_cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux the high-water mark of its own address
    space (VmHWM): `ru_maxrss` also keeps the peak of the process it was forked from, since
    exec carries it over, so a worker started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass  # not Linux
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)  # bytes there, KiB here


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads malloc arenas of their own and keeps what was freed in each; a
    trainer whose loading and compute threads allocate gigabytes then holds an extra that
    depends on thread timing. A couple of arenas keep its memory near what `memory_estimate`
    predicts. Does nothing where the C library is not glibc."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(M_ARENA_MAX, arenas)
