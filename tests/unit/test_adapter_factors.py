"""A LoRA adapter as per-layer factors and back (services/trainer/adapters/factors.py): a saved
peft directory read, a merged adapter written as one that peft loads with the same update,
and an adapter that does not fit a model refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_adapters import save_random_lora, tiny_llama

from backpropagate_api.errors import ConfigError
from backpropagate_services.trainer.adapters.factors import (
    as_parameters,
    factors,
    read_adapter_dir,
    write_adapter_dir,
)
from backpropagate_services.trainer.multirun.slao import ContinualMerge, LayerLora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def merged_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny model's weights with the adapter at `adapter_dir` merged in, as peft does it."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(adapter_dir))
    return {name: tensor.clone() for name, tensor in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_an_average_merge_wider_than_a_run_loads_in_peft_with_the_mean_update(tmp_path, rslora):
    """Two runs' adapters averaged are one of twice the rank; peft must scale it as each run's
    was (alpha / r, or alpha / sqrt(r)), so merging it gives the mean of the two merged models."""
    options = {"use_rslora": rslora, "target_modules": ["q_proj", "v_proj"]}
    first = save_random_lora(tiny_llama(), tmp_path / "first", 0.5, **options)
    # The second run: the same layers, other factors (signs flipped, B doubled).
    flipped = {n: LayerLora(-f.a, 2 * f.b) for n, f in read_adapter_dir(first).items()}
    second = write_adapter_dir(flipped, first, tmp_path / "second")
    merge = ContinualMerge("average")
    merge.add(read_adapter_dir(first))
    merge.add(flipped)

    written = write_adapter_dir(merge.merged, first, tmp_path / "average")

    assert next(iter(read_adapter_dir(written).values())).a.shape[0] == 16  # 2 x r=8
    base = tiny_llama().state_dict()
    one, two, mean = (merged_weights(d) for d in (first, second, written))
    for name, weight in mean.items():
        expected = base[name] + ((one[name] - base[name]) + (two[name] - base[name])) / 2
        assert torch.allclose(weight, expected, atol=1e-6), name


def test_factors_of_a_model_and_of_its_saved_adapter_are_the_same(tmp_path):
    from peft import PeftModel

    saved = save_random_lora(tiny_llama(), tmp_path / "adapter", 0.5)
    model = PeftModel.from_pretrained(tiny_llama(), str(saved))
    in_model = factors(dict(model.named_parameters()))
    on_disk = read_adapter_dir(saved)

    assert set(in_model) == set(on_disk) and len(on_disk) == 2 * 7  # 2 layers, 7 linear each
    for name, layer in on_disk.items():
        assert torch.equal(layer.a, in_model[name].a) and torch.equal(layer.b, in_model[name].b)
    parameters = dict(model.named_parameters())
    loaded = as_parameters(on_disk, parameters)
    assert set(loaded) == {name for name in parameters if ".lora_" in name}


def test_an_adapter_of_another_rank_or_other_layers_is_refused(tmp_path):
    from peft import PeftModel

    adapter = read_adapter_dir(save_random_lora(tiny_llama(), tmp_path / "r8", 0.5))
    narrower = save_random_lora(tiny_llama(), tmp_path / "r4", 0.5, r=4)
    parameters = dict(PeftModel.from_pretrained(tiny_llama(), str(narrower)).named_parameters())
    with pytest.raises(ConfigError, match="is \\(8, 32\\) there and \\(4, 32\\) here"):
        as_parameters(adapter, parameters)

    only_q = save_random_lora(tiny_llama(), tmp_path / "q", 0.5, target_modules=["q_proj"])
    parameters = dict(PeftModel.from_pretrained(tiny_llama(), str(only_q)).named_parameters())
    with pytest.raises(ConfigError, match="the model has no LoRA on layer") as refused:
        as_parameters(adapter, parameters)
    assert refused.value.code == "INPUT_CONFIG_INVALID"
