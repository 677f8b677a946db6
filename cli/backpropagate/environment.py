"""What a bug report needs to know about this machine: versions, OS, GPU driver, extras.

Read from package metadata and NVML, never by importing torch or llama.cpp: `backprop info`
answers at once, and still answers where importing one of them is what fails.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from collections import defaultdict
from contextlib import suppress

# Packages whose versions decide how a run behaves, by their distribution names.
REPORTED_PACKAGES = ("backpropagate", "torch", "transformers", "peft", "trl", "llama-cpp-python")
NOT_INSTALLED = "not installed"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def torch_has_cuda() -> bool:
    """Whether the installed torch wheel is a CUDA build (a `+cpu` version is not)."""
    version = package_version("torch")
    return version != NOT_INSTALLED and not version.endswith("+cpu")


def nvidia_driver() -> tuple[str, str] | None:
    """(driver version, the CUDA version it supports) from NVML; None where no NVIDIA driver
    answers or the safety extra (nvidia-ml-py) is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        return str(pynvml.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{cuda % 1000 // 10}"
    finally:
        with suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def extras_installed(distribution: str = "backpropagate") -> list[str]:
    """The extras of `distribution` whose every requirement is installed (`pip install
    'backpropagate[trainer]'` adds the trainer's)."""
    needs: dict[str, list[str]] = defaultdict(list)
    for requirement in importlib.metadata.requires(distribution) or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        if extra and name:
            needs[extra[1]].append(name[0])
    return sorted(
        extra
        for extra, names in needs.items()
        if all(package_version(name) != NOT_INSTALLED for name in names)
    )


def facts() -> list[tuple[str, str]]:
    """(label, value) rows for `backprop info`, in the order a bug report reads them."""
    rows = [("python", platform.python_version()), ("os", platform.platform())]
    rows += [(name, package_version(name)) for name in REPORTED_PACKAGES]
    driver = nvidia_driver()
    rows.append(("nvidia driver", f"{driver[0]} (CUDA {driver[1]})" if driver else "none answers"))
    rows.append(("extras installed", ", ".join(extras_installed()) or "none (client only)"))
    return rows
