"""What this machine trains on: the device, the dtype it computes fast in, and how much fits.

Decided once per run from what the hardware reports (and, for a CPU's dtype, what a short probe
measures), and written into the run record, so a run's numbers can be read knowing where they
came from. Import-light: torch loads on first use.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from backpropagate_services.common.dtype_probe import (
    CACHE_FILE_NAME,
    DEFAULT_SHAPES,
    DtypeChoice,
    MatmulShapes,
    cached_probe,
)

GIB = 1024**3
# CPU flags of the instructions that multiply bf16 natively (Intel AMX, AVX-512 BF16 on Intel
# Cooper Lake+ and AMD Zen 4+). Without them torch emulates bf16, several times slower than
# fp32; with them bf16 may still be the slower one (dtype_probe), so they only allow a probe.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


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
    dtype_reason: str = ""  # why compute_dtype: a setting, the GPU, the CPU's probe

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


def cpu_dtype_choice(
    setting: str = "auto", shapes: MatmulShapes = DEFAULT_SHAPES, home: Path | None = None
) -> DtypeChoice:
    """`setting` where it names a dtype; fp32 on a CPU without bf16 instructions; else what the
    probe measures for `shapes` with torch's current threads, kept in <home>/cpu-dtype.json
    (home: the settings' by default)."""
    if setting != "auto":
        return DtypeChoice(setting, "set by BACKPROPAGATE_TRAINER__CPU_DTYPE")
    if not cpu_flags() & BF16_CPU_FLAGS:
        return DtypeChoice("float32", "this CPU has no bf16 instructions (AVX-512 BF16, AMX)")
    if home is None:
        from backpropagate_api.settings import get_settings

        home = get_settings().home
    return cached_probe(home / CACHE_FILE_NAME, probe_key(shapes), shapes)


def probe_key(shapes: MatmulShapes) -> str:
    """What a probe's verdict holds for: this CPU (model, flags, cores), torch's threads and
    version, and the shapes it multiplied."""
    import torch

    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return (
        f"{cpu_name()}, flags {flags}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; {shapes.hidden}x{shapes.intermediate}x{shapes.vocab}"
    )


def detect(
    cpu_dtype: str = "auto", shapes: MatmulShapes = DEFAULT_SHAPES, home: Path | None = None
) -> Hardware:
    """The device a run trains on: the first CUDA GPU, else the CPU (Apple's MPS is reported
    as unsupported, not used). On a CPU the dtype is `cpu_dtype_choice`'s for the model of
    `shapes` (the offline default's where not given)."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        properties = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.is_bf16_supported()
        return Hardware(
            device="cuda:0",
            name=properties.name,
            compute_dtype="bfloat16" if bf16 else "float16",
            total_memory=int(total),
            free_memory=int(free),
            cores=int(properties.multi_processor_count),
            fp8=(properties.major, properties.minor) >= (8, 9),
            dtype_reason="the GPU computes in bf16" if bf16 else "the GPU has no bf16",
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
    choice = cpu_dtype_choice(cpu_dtype, shapes, home)
    return Hardware(
        device="cpu",
        name=cpu_name(),
        compute_dtype=choice.dtype,
        total_memory=int(memory.total),
        free_memory=int(memory.available),
        cores=os.cpu_count() or 1,
        fp8=False,
        note=note,
        dtype_reason=choice.reason,
    )


def default_micro_batch(hardware: Hardware) -> int:
    """Conversations one forward pass takes by default on the CPU: from free host memory and
    cores, since a wider batch only pays off when there are cores to run it and memory to hold
    its activations. On a GPU a run's memory plan chooses it from its estimated peak
    (`trainer.memory_plan`)."""
    free_gib = hardware.free_memory / GIB
    if free_gib >= 8 and hardware.cores >= 2:
        return 4
    return 2 if free_gib >= 4 else 1


def reset_peak_memory(hardware: Hardware) -> None:
    """Start counting the peak afresh, so a worker that trains run after run reports each run's
    own peak, not the largest of all so far. On Linux, writing 5 to /proc/self/clear_refs resets
    VmHWM to the current RSS; elsewhere the CPU peak stays the process's."""
    if hardware.is_cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


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
