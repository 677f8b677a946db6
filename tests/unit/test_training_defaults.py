"""Where a run's config comes from: the request, presets, BACKPROPAGATE_* settings, the data."""

from __future__ import annotations

import json

import pytest
from test_cli_errors import backprop

from backpropagate.config import get_preset
from backpropagate.sdk import adapter_of_mode
from backpropagate_api.errors import ConfigError, UserError
from backpropagate_api.settings import Settings
from backpropagate_api.training import LORA_PRESETS, TRAINING_PRESETS
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.hardware import (
    GIB,
    Hardware,
    default_micro_batch,
)
from backpropagate_services.trainer.planning.config import training_config_from_proto
from backpropagate_services.trainer.planning.defaults import (
    DATA_BUDGET_LEARNING_RATE,
    DATA_BUDGET_TARGETS,
    MAX_STEPS,
    data_budget,
    settle,
)


def settled(settings: Settings | None = None, examples: int = 40, **fields: object):
    return settle(trainer_pb2.TrainConfig(**fields), settings or Settings(), examples)


def test_a_value_given_with_the_run_beats_presets_and_settings(monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_LORA__R", "32")
    config, _ = settled(Settings(), lora_r=4, preset="quality", steps=5)
    assert config.lora_r == 4
    assert config.learning_rate == TRAINING_PRESETS["quality"]["learning_rate"]


def test_the_runs_preset_beats_a_setting_and_a_setting_beats_the_settings_preset(monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_LORA__R", "32")
    monkeypatch.setenv("BACKPROPAGATE_TRAINING__PRESET", "fast")
    settings = Settings()

    from_run, _ = settled(settings, preset="balanced", steps=5)
    from_settings, _ = settled(settings, steps=5)

    assert from_run.lora_r == TRAINING_PRESETS["balanced"]["lora_r"]
    assert (from_settings.lora_r, from_settings.preset) == (32, "fast")
    assert from_settings.learning_rate == TRAINING_PRESETS["fast"]["learning_rate"]


def test_documented_environment_keys_set_training_defaults(monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_TRAINING__LEARNING_RATE", "1e-4")
    monkeypatch.setenv("BACKPROPAGATE_LORA__TARGET_MODULES", '["q_proj", "v_proj"]')
    monkeypatch.setenv("BACKPROPAGATE_MODEL__NAME", "smollm2-135m-instruct")
    settings = Settings()

    config, _ = settled(settings, steps=5)
    training = training_config_from_proto(config)

    assert training.learning_rate == 1e-4
    assert training.target_modules == ["q_proj", "v_proj"]
    assert settings.model.name == "smollm2-135m-instruct"


def test_lora_quality_preset_is_rank_256_on_every_linear_layer_at_the_lora_rate():
    config, _ = settled(lora_preset="quality", steps=5)
    training = training_config_from_proto(config)
    assert (training.lora_r, training.lora_alpha, training.target_modules) == (
        256,
        32,
        "all-linear",
    )
    assert training.learning_rate == LORA_PRESETS["quality"]["learning_rate"]
    fast = training_config_from_proto(settled(lora_preset="fast", steps=5)[0])
    assert (fast.lora_r, fast.target_modules) == (16, ["q_proj", "v_proj"])


def test_an_unknown_preset_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="balanced"):
        settled(preset="turbo")


@pytest.mark.parametrize(
    ("examples", "batch", "steps"),
    [(100, 4, 200), (40, 4, 120), (4, 8, 60), (10_000_000, 4, MAX_STEPS)],
    ids=["epochs", "rows seen floor", "floor at batch 8", "cap"],
)
def test_the_budget_comes_from_the_data_with_the_reason(examples, batch, steps):
    got, reason = data_budget(examples, batch)
    assert got == steps
    assert f"{examples} examples" in reason


def test_the_budget_shrinks_in_epochs_as_the_data_grows():
    epochs = [data_budget(n, 4)[0] * 4 / n for n in (100, 1000, 5000)]
    assert epochs == sorted(epochs, reverse=True)


def test_a_run_without_steps_or_epochs_gets_the_data_budget_and_keeps_the_reason():
    config, reason = settled(examples=40)
    assert config.steps == data_budget(40, 4)[0]
    assert "epochs of 40 examples" in reason
    config, reason = settled(examples=40, eval_split=0.25)  # 30 left to train on
    assert config.steps == data_budget(30, 4)[0] and "30 examples" in reason


def test_explicit_steps_or_epochs_leave_no_budget_reason():
    assert settled(steps=7) == (settled(steps=7)[0], "")
    config, reason = settled(epochs=2, examples=40)
    assert (config.steps, reason) == (20, "")
    assert config.adapter_scale == 0  # the update kept whole: TrainingConfig's 1


def test_the_data_budget_gives_a_lora_sft_run_its_recipe_unless_the_run_says_otherwise():
    config, reason = settled(examples=40)
    assert list(config.target_modules) == [DATA_BUDGET_TARGETS] == ["all-mlp"]
    assert config.learning_rate == DATA_BUDGET_LEARNING_RATE
    assert "feed-forward layers (all-mlp)" in reason and "learning rate" in reason
    assert training_config_from_proto(config).target_modules == "all-mlp"  # peft's shorthand
    told = settled(examples=40, target_modules=["q_proj"], learning_rate=1e-4)[0]
    assert (list(told.target_modules), told.learning_rate) == (["q_proj"], 1e-4)
    for other in (settled(examples=40, adapter="dora"), settled(examples=40, method="dpo")):
        assert (list(other[0].target_modules), other[0].learning_rate) == ([], 0)
    assert list(settled(steps=7)[0].target_modules) == []  # a budget given: no recipe


def hardware(device: str, free_gib: float, cores: int = 8) -> Hardware:
    return Hardware(device, "x", "float32", int(64 * GIB), int(free_gib * GIB), cores, False)


@pytest.mark.parametrize(
    ("free_gib", "cores", "micro_batch"),
    [(20, 8, 4), (20, 1, 2), (5, 8, 2), (2, 8, 1)],
)
def test_default_micro_batch_on_a_cpu_follows_free_memory_and_cores(free_gib, cores, micro_batch):
    assert default_micro_batch(hardware("cpu", free_gib, cores)) == micro_batch


def test_backprop_config_prints_each_setting_with_where_it_came_from(tmp_path):
    (tmp_path / ".env").write_text("BACKPROPAGATE_TRAINING__PRESET=quality\n")
    outcome = backprop(tmp_path, "config", "--json", env={"BACKPROPAGATE_LORA__R": "64"})

    assert outcome.exit_code == 0, outcome.stderr
    printed = json.loads(outcome.stdout)
    settings, training = printed["settings"], printed["training defaults"]
    assert settings["BACKPROPAGATE_LORA__R"] == {"value": 64, "source": "environment"}
    assert settings["BACKPROPAGATE_TRAINING__PRESET"] == {"value": "quality", "source": ".env file"}
    assert settings["BACKPROPAGATE_QUEUE__BACKEND"]["source"] == "default"
    # What a run gets: the setting beats the settings' preset, which beats the built-in.
    assert training["BACKPROPAGATE_LORA__R"] == {"value": 64, "source": "environment"}
    assert training["BACKPROPAGATE_TRAINING__LEARNING_RATE"] == {
        "value": TRAINING_PRESETS["quality"]["learning_rate"],
        "source": "preset quality",
    }
    assert training["BACKPROPAGATE_LORA__DROPOUT"]["source"] == "built-in"
    assert training["BACKPROPAGATE_TRAINING__STEPS"]["value"] == "from the data's size"


def test_backprop_config_shows_no_secret_neither_a_secret_setting_nor_a_password_in_a_url(
    tmp_path,
):
    env = {
        "BACKPROPAGATE_QUEUE__REDIS_URL": "redis://:hunter2@cache:6379/0",
        "BACKPROPAGATE_STORE__S3_SECRET_KEY": "s3-secret-value",
    }
    as_json = backprop(tmp_path, "config", "--json", env=env)
    as_table = backprop(tmp_path, "config", env=env)

    for outcome in (as_json, as_table):
        assert outcome.exit_code == 0, outcome.stderr
        assert "hunter2" not in outcome.stdout and "s3-secret-value" not in outcome.stdout
    settings = json.loads(as_json.stdout)["settings"]
    assert settings["BACKPROPAGATE_QUEUE__REDIS_URL"] == {
        "value": "redis://:***@cache:6379/0",
        "source": "environment",
    }
    assert settings["BACKPROPAGATE_STORE__S3_SECRET_KEY"]["value"] == "********"
    assert "redis://:***@cache:6379/0" in as_table.stdout


def test_presets_by_name_as_the_product_documents_them():
    preset = get_preset("balanced")
    assert (preset.lora_r, preset.batch_size, preset.learning_rate) == (16, 16, 2e-4)
    with pytest.raises(ConfigError, match="fast, balanced, quality"):
        get_preset("best")


def test_mode_full_is_the_documented_name_of_the_full_adapter():
    assert adapter_of_mode("full") == "full"
    with pytest.raises(UserError, match="lora and full"):
        adapter_of_mode("qlora")
