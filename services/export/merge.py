"""Fold a LoRA adapter into its base model: W' = W + (alpha / r) * B A, saved as a plain HF dir.

llama.cpp and Ollama run one set of weights, so the adapter is merged before conversion. The
base is loaded in its own dtype (fp32 for the offline SmolLM2 copy, bf16 for most hub models on
a GPU machine): one copy of the weights, merged in place, never a second fp32 copy of a 7B
model. The tokenizer is the base model's: its chat template is the one the model answers to,
whatever template training may have used to mask the loss.

The merge is checked, not trusted: on the reference chats, the merged model's logits must equal
those of base + adapter (peft's unmerged forward pass) within the rounding of the dtype. The
merged logits are kept: verification compares the GGUF with them, so the merged model never
has to be loaded again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backpropagate_api.errors import ConfigError, ExportMergeError, NotFoundError
from backpropagate_services.common.atomic import staged
from backpropagate_services.common.models import ModelSource, load_model, local_directory
from backpropagate_services.export.reference import ScoredChat, reference_logits, scored_chats

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Largest merged-vs-unmerged logit difference, relative to the largest logit, that rounding
# explains: fp32 merges agree to about 1e-6; 16-bit weights round W + BA to 8 or 11 bits.
MERGE_TOLERANCE = {"torch.float32": 1e-4, "torch.float16": 2e-2, "torch.bfloat16": 5e-2}


@dataclass(frozen=True)
class MergedModel:
    directory: Path | None  # where the merged model was saved; None when it was not asked for
    base_directory: Path  # the base model's own files, for exports that keep base and adapter
    chats: list[ScoredChat]
    logits: list[torch.Tensor]  # the merged model's logits at the chats' scored positions
    vocab_size: int
    num_parameters: int
    dtype: str
    merge_error: float  # max |merged - unmerged| logit difference / max |logit|


def _relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    import torch

    reference, other = torch.cat(a), torch.cat(b)
    return float((reference - other).abs().max() / reference.abs().max().clamp(min=1e-6))


def is_full_model(directory: Path) -> bool:
    """A full fine-tune's output: a whole model (config.json), no adapter."""
    return (directory / "config.json").is_file() and not (
        directory / "adapter_config.json"
    ).is_file()


def _full_model(
    base: ModelSource, model_dir: Path, cache_dir: Path, out_dir: Path | None
) -> MergedModel:
    """A full fine-tune has nothing to merge: its weights are the model (merge error 0). The
    base's tokenizer is kept, as for a merge, for the chat template the model answers to."""
    from transformers import AutoTokenizer

    tuned = ModelSource(kind="hf_dir", location=str(model_dir), name=base.name)
    model, _ = load_model(tuned, cache_dir, device="cpu", dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(str(local_directory(base, cache_dir)))
    chats = scored_chats(tokenizer)
    logits = reference_logits(model, chats)
    return _kept(model, tokenizer, base, cache_dir, out_dir, chats, logits, 0.0)


def _kept(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base: ModelSource,
    cache_dir: Path,
    out_dir: Path | None,
    chats: list[ScoredChat],
    logits: list[torch.Tensor],
    merge_error: float,
) -> MergedModel:
    """The model to export (written to `out_dir` unless None) with its logits on `chats`."""
    if out_dir is not None:
        with staged(out_dir) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return MergedModel(
        directory=out_dir,
        base_directory=local_directory(base, cache_dir),
        chats=chats,
        logits=logits,
        vocab_size=int(model.config.vocab_size),
        num_parameters=int(model.num_parameters()),
        dtype=str(next(model.parameters()).dtype),
        merge_error=merge_error,
    )


def merge_adapter(
    base: ModelSource, adapter_dir: Path, cache_dir: Path, out_dir: Path | None
) -> MergedModel:
    """Merge base + adapter and check it; write it to `out_dir` (safetensors, config,
    tokenizer; atomic on failure) unless `out_dir` is None, when only its logits are needed.

    Raises ExportMergeError when the merged model does not compute what base + adapter did.
    """
    from peft import PeftModel

    if is_full_model(adapter_dir):
        return _full_model(base, adapter_dir, cache_dir, out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise NotFoundError(
            f"{adapter_dir} holds no adapter_config.json, so it is no peft adapter.",
            hint="Export the adapter directory a finished train run wrote.",
            adapter=str(adapter_dir),
        )
    model, tokenizer = load_model(base, cache_dir, device="cpu", dtype="auto")
    log.info("merging %s into %s", adapter_dir, base.name)
    try:
        adapted = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError) as exc:  # shapes or target modules that do not fit
        raise ConfigError(
            f"The adapter in {adapter_dir} does not fit {base.name}: {exc}",
            hint="Export with the base model the adapter was trained on.",
            adapter=str(adapter_dir),
            model=base.name,
        ) from exc
    chats = scored_chats(tokenizer)
    unmerged = reference_logits(adapted, chats)
    merged = adapted.merge_and_unload()
    logits = reference_logits(merged, chats)
    dtype = str(next(merged.parameters()).dtype)
    error = _relative_difference(unmerged, logits)
    tolerance = MERGE_TOLERANCE.get(dtype, MERGE_TOLERANCE["torch.bfloat16"])
    if error > tolerance:
        raise ExportMergeError(
            f"The merged model's logits differ from base + adapter by {error:.2e} of the largest "
            f"logit ({dtype}), more than rounding explains ({tolerance:g}).",
            adapter=str(adapter_dir),
            model=base.name,
        )
    return _kept(merged, tokenizer, base, cache_dir, out_dir, chats, logits, error)
