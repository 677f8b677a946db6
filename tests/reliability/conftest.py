"""Fixtures of the reliability drills."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import save_tiny_llama

from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS, hf_location, resolve_model


@pytest.fixture
def home_env(model_cache: Path, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BACKPROPAGATE_HOME": str(tmp_path / "home"),
        "BACKPROPAGATE_MODEL_CACHE": str(model_cache),
        "COLUMNS": "200",
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """A tiny random Llama on SmolLM2's tokenizer, as a local base model directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        hf_location(resolve_model(OFFLINE_DEFAULT_ALIAS), model_cache)
    )
    return save_tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-llama"))
