"""Fold a LoRA adapter into its base model: W' = W + (alpha / r) * B A, saved as a plain HF dir.

llama.cpp and Ollama run one set of weights, so the adapter is merged before conversion. The
base is loaded in fp32 (never a quantised copy) so the merge adds no rounding of its own, and
the tokenizer is the base model's: its chat template is the one the model answers to, whatever
template training may have used to mask the loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

from backpropagate_services.common.atomic import staged
from backpropagate_services.common.errors import ConfigError, NotFoundError
from backpropagate_services.common.models import ModelSource, load_model

log = logging.getLogger(__name__)


def merge_adapter(base: ModelSource, adapter_dir: Path, cache_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter to `out_dir` (safetensors, config, tokenizer); atomic on failure."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise NotFoundError(
            f"{adapter_dir} holds no adapter_config.json, so it is no peft adapter.",
            hint="Export the adapter directory a finished train run wrote.",
            adapter=str(adapter_dir),
        )
    model, tokenizer = load_model(base, cache_dir, device="cpu")
    log.info("merging %s into %s", adapter_dir, base.name)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except RuntimeError as exc:  # torch's size mismatch when the shapes do not fit
        raise ConfigError(
            f"The adapter in {adapter_dir} does not fit {base.name}: {exc}",
            hint="Export with the base model the adapter was trained on.",
            adapter=str(adapter_dir),
            model=base.name,
        ) from exc
    with staged(out_dir) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir
