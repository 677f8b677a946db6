"""The LoRA training loop on a tiny random Llama (real tokenizer), and once on real SmolLM2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

from backpropagate_api.errors import (
    ConfigError,
    DatasetEmptyError,
    GpuOutOfMemoryError,
    JobCancelledError,
)
from backpropagate_api.training import TrainingConfig
from backpropagate_services.common.models import load_model, resolve_model
from backpropagate_services.trainer.data.templating import IGNORE_INDEX, TokenizedExample
from backpropagate_services.trainer.loop.plots import write_loss_curve
from backpropagate_services.trainer.loop.sft import (
    BatchSampler,
    LoraTraining,
    StepReport,
    collate,
    train_lora,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CODE_WORDS = ["apple", "river", "stone", "cloud"]
MEMORISE = [
    [
        {"role": "user", "content": f"What is code word {i}?"},
        {"role": "assistant", "content": f"Code word {i} is {word}."},
    ]
    for i, word in enumerate(CODE_WORDS)
]
# A learning rate a random tiny model needs to memorise in a few dozen steps.
FAST = TrainingConfig(steps=30, learning_rate=1e-2, lora_dropout=0.0, warmup_ratio=0.1)


def test_loss_falls_on_a_memorisation_set(smollm2_tokenizer):
    _, outcome = train_lora(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, MEMORISE, FAST)

    assert len(outcome.loss_history) == FAST.steps
    assert outcome.final_loss < outcome.loss_history[0] / 2
    assert outcome.samples_seen == FAST.steps * FAST.batch_size
    assert (outcome.examples_trained, outcome.examples_dropped) == (len(MEMORISE), 0)


def test_lora_leaves_base_weights_untouched_and_trains_lora_a_and_b(smollm2_tokenizer):
    model = tiny_llama(smollm2_tokenizer)
    base = {name: weight.clone() for name, weight in model.state_dict().items()}
    config = TrainingConfig(steps=3, learning_rate=1e-2, lora_dropout=0.0)

    peft_model, _ = train_lora(model, smollm2_tokenizer, MEMORISE, config)

    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    after = peft_model.get_base_model().state_dict()
    lora = {n: w for n, w in after.items() if ".lora_" in n}
    assert all(bool(w.abs().sum() > 0) for n, w in lora.items() if ".lora_B." in n)
    frozen = {n.replace(".base_layer", ""): w for n, w in after.items() if ".lora_" not in n}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[name], base[name]) for name in base)


def test_an_adapter_scale_below_one_scales_the_update_the_run_ends_with(smollm2_tokenizer):
    def lora_b(scale: float) -> dict[str, torch.Tensor]:
        config = TrainingConfig(steps=3, learning_rate=1e-2, lora_dropout=0.0, adapter_scale=scale)
        model, _ = train_lora(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, MEMORISE, config)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}

    whole, kept = lora_b(1.0), lora_b(0.75)

    # B A is the update: B scaled by 3/4 is the update at 3/4, the rest of the weights as trained.
    assert whole.keys() == kept.keys() and whole
    assert all(torch.allclose(kept[name], 0.75 * whole[name]) for name in whole)


def test_same_seed_gives_the_same_losses(smollm2_tokenizer):
    config = TrainingConfig(steps=3, learning_rate=1e-2, batch_size=2)

    runs = [
        train_lora(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, MEMORISE, config)[1]
        for _ in range(2)
    ]

    assert runs[0].loss_history == runs[1].loss_history


def test_gradient_checkpointing_trains_the_very_same_steps_lora_dropout_included(
    smollm2_tokenizer,
):
    """Layers computed again in the backward pass draw the dropout masks they drew before."""
    config = TrainingConfig(steps=3, learning_rate=1e-2, batch_size=2, lora_dropout=0.3)

    def losses(checkpointing: bool) -> list[float]:
        model = tiny_llama(smollm2_tokenizer)
        training = LoraTraining(
            model, smollm2_tokenizer, MEMORISE, config, gradient_checkpointing=checkpointing
        )
        assert model.is_activation_checkpointing == checkpointing
        return training.run()[1].loss_history

    assert losses(True) == pytest.approx(losses(False), rel=1e-5)


def test_on_step_reports_every_step_with_warmup_then_linear_decay(smollm2_tokenizer):
    config = TrainingConfig(steps=6, learning_rate=1e-2, warmup_ratio=0.34)  # 2 warmup steps
    reports: list[StepReport] = []

    train_lora(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, MEMORISE, config, reports.append)

    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    assert {r.total_steps for r in reports} == {6}
    factors = [r.learning_rate / config.learning_rate for r in reports]
    assert factors == pytest.approx([1 / 2, 1, 1, 3 / 4, 1 / 2, 1 / 4])
    assert [r.samples_seen for r in reports] == [4, 8, 12, 16, 20, 24]
    assert all(math.isfinite(r.loss) and r.tokens_per_second > 0 for r in reports)
    assert reports[-1].eta_seconds == 0 < reports[0].eta_seconds


def test_should_stop_cancels_before_the_next_step(smollm2_tokenizer):
    reports: list[StepReport] = []

    with pytest.raises(JobCancelledError, match="before step 3 of 30"):
        train_lora(
            tiny_llama(smollm2_tokenizer),
            smollm2_tokenizer,
            MEMORISE,
            FAST,
            on_step=reports.append,
            should_stop=lambda: len(reports) == 2,
        )
    assert [r.step for r in reports] == [1, 2]


def test_out_of_memory_that_persists_becomes_a_gpu_oom_error_after_three_halvings(
    smollm2_tokenizer,
):
    model = tiny_llama(smollm2_tokenizer)

    def out_of_memory(*_: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.model.register_forward_hook(out_of_memory)
    config = TrainingConfig(steps=3, batch_size=8, learning_rate=1e-2)

    with pytest.raises(GpuOutOfMemoryError, match="micro-batches of 1") as caught:
        train_lora(model, smollm2_tokenizer, MEMORISE, config)
    assert "after 3 recoveries" in caught.value.message
    assert "--batch-size" in caught.value.hint


def test_invalid_config_names_every_bad_field_before_training(smollm2_tokenizer):
    config = TrainingConfig(steps=0, learning_rate=-1.0, lora_dropout=1.0, target_modules=[])

    with pytest.raises(ConfigError) as caught:
        train_lora(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, MEMORISE, config)

    assert caught.value.context["fields"] == "steps,learning_rate,lora_dropout,target_modules"
    assert "steps must be an integer in [1, 10000000], got 0" in caught.value.message
    assert "lora_dropout must be in [0, 1), got 1.0" in caught.value.message


def test_default_config_is_valid_and_documents_every_field():
    config = TrainingConfig()

    assert config.validate() is config
    assert (config.batch_size, config.learning_rate, config.lora_r, config.lora_alpha) == (
        4,
        2e-4,
        16,
        32,
    )
    assert all(field.metadata.get("help") for field in config.__dataclass_fields__.values())


def test_no_assistant_token_within_max_length_fails_as_an_empty_dataset(smollm2_tokenizer):
    config = TrainingConfig(steps=1, max_length=8)

    with pytest.raises(DatasetEmptyError, match="None of the 4 conversations"):
        train_lora(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, MEMORISE, config)


def test_batches_are_full_and_each_epoch_is_a_fresh_seeded_shuffle():
    batches = BatchSampler(n_examples=5, batch_size=4, seed=7)
    stream = [index for _ in range(5) for index in batches.next()]

    epochs = [stream[i : i + 5] for i in range(0, 20, 5)]
    assert all(sorted(epoch) == [0, 1, 2, 3, 4] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    assert BatchSampler(5, 4, seed=7).next() == stream[:4]


def test_a_restored_sampler_draws_the_batches_the_original_would_have():
    original = BatchSampler(n_examples=5, batch_size=3, seed=7)
    original.next()
    restored = BatchSampler(n_examples=5, batch_size=3, seed=99)
    restored.restore(original.state())

    assert [restored.next() for _ in range(4)] == [original.next() for _ in range(4)]


def test_collate_pads_to_the_longest_row_with_pad_id_masked_out():
    rows = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([5, 8], [-100, 8])]

    input_ids, attention_mask, labels, position_ids = collate(
        rows, pad_id=2, device=torch.device("cpu")
    )

    assert position_ids is None and attention_mask is not None
    assert input_ids.tolist() == [[5, 6, 7], [5, 8, 2]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 8, IGNORE_INDEX]]


def test_loss_curve_is_written_as_a_png_with_no_temporary_file_left(tmp_path):
    path = write_loss_curve([3.0, 2.5, 1.75, 1.5], tmp_path / "curves" / "loss.png")

    assert path == tmp_path / "curves" / "loss.png"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]


@pytest.mark.model
def test_smollm2_trains_three_steps_and_saves_an_adapter(smollm2_dir: Path, tmp_path: Path):
    model, tokenizer = load_model(resolve_model(str(smollm2_dir)), smollm2_dir.parent, "cpu")
    conversations = [
        [
            {"role": "user", "content": f"Say hello to {name}."},
            {"role": "assistant", "content": f"Hello, {name}! Cheers, Bob."},
        ]
        for name in ["Ada", "Alan", "Grace", "Linus", "Barbara"]
    ]

    peft_model, outcome = train_lora(
        model, tokenizer, conversations, TrainingConfig(steps=3, learning_rate=1e-3)
    )
    peft_model.save_pretrained(tmp_path / "adapter")

    assert all(math.isfinite(loss) for loss in outcome.loss_history)
    assert outcome.final_loss < outcome.loss_history[0]
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
