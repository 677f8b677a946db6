"""The continual merge's math on small matrices: SLAO's orthonormal start, its merge weights
(the exact merged B after 4 tasks), and the variants' starts and merges
(services/trainer/multirun/slao.py holds the algorithm)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from backpropagate_services.trainer.multirun.slao import (
    MERGE_MODES,
    ContinualMerge,
    LayerLora,
    merge_weight,
    orthonormal_rows,
)

RANK, D_IN, D_OUT = 3, 6, 5


def lora(seed: int) -> dict[str, LayerLora]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: LayerLora(
            torch.randn(RANK, D_IN, generator=generator, dtype=torch.float64),
            torch.randn(D_OUT, RANK, generator=generator, dtype=torch.float64),
        )
        for name in ("q_proj", "down_proj")
    }


def test_the_start_of_a_task_has_orthonormal_rows_spanning_the_last_as_row_space():
    a = lora(1)["q_proj"].a

    q = orthonormal_rows(a)

    assert q.shape == a.shape
    assert torch.allclose(q @ q.T, torch.eye(RANK, dtype=a.dtype))
    # Projected on the new rows, the old rows are unchanged: the same row space.
    assert torch.allclose(a @ q.T @ q, a)
    # Signs fixed: diag(R) >= 0, R = Q^T A^T being upper triangular.
    assert bool((torch.diagonal(q @ a.T) >= 0).all())


def test_a_zero_direction_keeps_a_positive_sign():
    a = torch.zeros(2, 4, dtype=torch.float64)
    a[0, 0] = 1.0  # the second row is zero: R's second diagonal entry is 0

    q = orthonormal_rows(a)

    assert torch.allclose(q[0], a[0]) and torch.isfinite(q).all()


def test_after_four_tasks_the_merged_b_weighs_the_fine_tuned_bs_as_the_paper_says():
    merge = ContinualMerge("slao")
    tasks = [lora(seed) for seed in range(1, 5)]
    steps = [merge.add(adapter) for adapter in tasks]

    weights = [1.0, 1 - 1 / math.sqrt(2), 1 - 1 / math.sqrt(3), 0.5]  # each task's (1 - lambda)
    shares = [
        math.prod(weights[1:]),
        (1 / math.sqrt(2)) * weights[2] * weights[3],
        (1 / math.sqrt(3)) * weights[3],
        0.5,
    ]
    assert [round(share, 2) for share in shares] == [0.06, 0.15, 0.29, 0.5]
    for name in tasks[0]:
        expected = sum(share * task[name].b for share, task in zip(shares, tasks, strict=True))
        assert torch.allclose(merge.merged[name].b, expected)
        assert torch.equal(merge.merged[name].a, tasks[3][name].a)  # A is replaced
    assert [step.weight for step in steps] == [1.0, *(merge_weight(i, "slao") for i in (2, 3, 4))]
    assert all(step.change_norm > 0 for step in steps)


def test_slao_starts_from_the_last_fine_tuned_b_and_last_merge_from_the_merged_one():
    first, second = lora(1), lora(2)
    starts = {}
    for mode in ("slao", "last-merge", "no-qr", "sequential", "average"):
        merge = ContinualMerge(mode)
        assert merge.start() is None  # the first task: a fresh LoRA
        merge.add(first)
        merge.add(second)
        starts[mode] = (merge.start(), merge)

    slao, _ = starts["slao"]
    last_merge, last_merge_state = starts["last-merge"]
    for name, layer in second.items():
        assert torch.equal(slao[name].b, layer.b)
        assert torch.allclose(slao[name].a, orthonormal_rows(layer.a))
        assert torch.equal(last_merge[name].b, last_merge_state.merged[name].b)
        assert torch.equal(starts["no-qr"][0][name].a, layer.a)
        assert torch.equal(starts["sequential"][1].merged[name].b, layer.b)  # no merge
    assert starts["average"][0] is None  # every task a fresh LoRA


def test_average_keeps_the_exact_mean_of_the_products_as_one_wider_adapter():
    merge = ContinualMerge("average")
    tasks = [lora(seed) for seed in range(1, 4)]
    for adapter in tasks:
        merge.add(adapter)

    for name in tasks[0]:
        mean = sum(task[name].product for task in tasks) / 3
        assert torch.allclose(merge.merged[name].product, mean)
        assert merge.merged[name].a.shape == (3 * RANK, D_IN)


def test_last_merge_clamps_its_weight_and_an_unknown_mode_is_refused():
    assert merge_weight(400, "last-merge") == 0.1 and merge_weight(400, "slao") == 0.05
    assert set(MERGE_MODES) == {"slao", "last-merge", "no-qr", "average", "sequential"}
    with pytest.raises(ValueError, match="none of slao"):
        ContinualMerge("ties")


@pytest.mark.parametrize("mode", MERGE_MODES)
def test_a_restored_merge_goes_on_as_the_uninterrupted_one(mode):
    """A campaign resumed after task 2 merges tasks 3 and 4 exactly as one never stopped."""
    whole = ContinualMerge(mode)
    for seed in (1, 2):
        whole.add(lora(seed))
    state = whole.state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    restored = ContinualMerge.restore(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))

    for seed in (3, 4):
        expected, got = whole.start(), restored.start()
        assert (expected is None) == (got is None)
        for name in expected or {}:
            assert torch.equal(expected[name].a, got[name].a)
            assert torch.equal(expected[name].b, got[name].b)
        assert whole.add(lora(seed)) == restored.add(lora(seed))
    for name, layer in whole.merged.items():
        assert torch.equal(layer.product, restored.merged[name].product)
