"""On a CPU the compute dtype is the one measured faster there, not the one CPU flags suggest.

The rule is checked on given speeds; the probe itself runs for real on this machine, and a short
real run of a tiny random Llama (the real tokenizer) records the dtype it computed in and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_processes import connected, in_process_stack
from test_training_loop import tiny_llama

from backpropagate.render import print_run
from backpropagate.workflows import follow_run, submit_train, upload_dataset
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.dtype_probe import (
    CACHE_FILE_NAME,
    DTYPES,
    MatmulShapes,
    cached_probe,
    choose,
)
from backpropagate_services.common.hardware import (
    BF16_CPU_FLAGS,
    cpu_dtype_choice,
    cpu_flags,
    detect,
    probe_key,
)
from backpropagate_services.stack import SERVICES

# Small enough that a real probe takes a fraction of a second even on a busy machine.
SMALL = MatmulShapes(hidden=128, intermediate=256, vocab=1024)
HAS_BF16_INSTRUCTIONS = bool(cpu_flags() & BF16_CPU_FLAGS)


@pytest.mark.parametrize(
    ("fp32_gflops", "bf16_gflops", "chosen"),
    [
        (170.0, 92.0, "float32"),  # Xeon with AVX-512 BF16 and no AMX: bf16 at 0.54x
        (100.0, 105.0, "float32"),  # a tie within noise: fp32, the more exact
        (100.0, 172.0, "bfloat16"),  # Zen 4 EPYC: bf16 at 1.72x
    ],
)
def test_bf16_is_chosen_only_where_it_measured_at_least_a_tenth_faster(
    fp32_gflops: float, bf16_gflops: float, chosen: str
) -> None:
    choice = choose(fp32_gflops, bf16_gflops)

    assert choice.dtype == chosen
    speedup = f"{bf16_gflops / fp32_gflops:.2f}x"
    assert speedup in choice.reason
    assert f"{bf16_gflops:.0f} against {fp32_gflops:.0f} GFLOP/s" in choice.reason


@pytest.mark.parametrize("measured", DTYPES)
def test_the_measured_verdict_decides_the_dtype_not_the_cpu_flags(
    tmp_path: Path, measured: str
) -> None:
    """This machine's verdict as a probe left it: what detect() computes in, with its reason."""
    verdict = choose(100.0, 172.0 if measured == "bfloat16" else 54.0)
    (tmp_path / CACHE_FILE_NAME).write_text(
        json.dumps({probe_key(SMALL): {"dtype": verdict.dtype, "reason": verdict.reason}})
    )

    hardware = detect("auto", SMALL, tmp_path)

    if HAS_BF16_INSTRUCTIONS:
        assert (hardware.compute_dtype, hardware.dtype_reason) == (measured, verdict.reason)
    else:  # emulated bf16 is never probed
        assert hardware.compute_dtype == "float32"
        assert "no bf16 instructions" in hardware.dtype_reason


def test_the_cpu_dtype_setting_overrides_the_probe(tmp_path: Path) -> None:
    for dtype in DTYPES:
        choice = cpu_dtype_choice(dtype, SMALL, tmp_path)
        assert choice.dtype == dtype
        assert "BACKPROPAGATE_TRAINER__CPU_DTYPE" in choice.reason
    assert not (tmp_path / CACHE_FILE_NAME).exists()  # nothing measured


def test_a_real_probe_chooses_a_dtype_and_keeps_it_under_the_home(tmp_path: Path) -> None:
    cache = tmp_path / CACHE_FILE_NAME
    key = probe_key(SMALL)

    first = cached_probe(cache, key, SMALL)

    assert first.dtype in DTYPES
    assert first.fp32_gflops > 0 and first.bf16_gflops > 0
    assert first == choose(first.fp32_gflops, first.bf16_gflops)
    kept = json.loads(cache.read_text())[key]
    assert kept["dtype"] == first.dtype
    # A later call reads the verdict instead of measuring: a marker put in the file comes back.
    cache.write_text(json.dumps({key: {**kept, "reason": "marker"}}))
    assert cached_probe(cache, key, SMALL).reason == "marker"


@pytest.mark.parametrize(
    "corrupt", ["{not json", "[1, 2]", '{"KEY": {"dtype": "float64", "reason": "x"}}', ""]
)
def test_a_corrupt_cache_is_probed_again_and_written_afresh(tmp_path: Path, corrupt: str) -> None:
    cache = tmp_path / CACHE_FILE_NAME
    key = probe_key(SMALL)
    cache.write_text(corrupt.replace("KEY", key))

    choice = cached_probe(cache, key, SMALL)

    assert choice.fp32_gflops > 0  # measured, not read
    assert json.loads(cache.read_text()) == {
        key: {
            "dtype": choice.dtype,
            "reason": choice.reason,
            "fp32_gflops": choice.fp32_gflops,
            "bf16_gflops": choice.bf16_gflops,
        }
    }


def test_a_run_records_the_dtype_it_computed_in_and_why(
    smollm2_tokenizer, tmp_path: Path, quickstart: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "tiny-llama"
    tiny = tiny_llama(smollm2_tokenizer)
    tiny.save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    home = tmp_path / "home"
    settings = Settings(home=home, safety=SafetySettings(source="host"))
    config = trainer_pb2.TrainConfig(
        base_model=str(model_dir), steps=2, batch_size=2, max_length=64
    )

    with (
        in_process_stack(settings, list(SERVICES)) as stack,
        connected(stack.address, list(SERVICES)) as client,
    ):
        dataset_id = upload_dataset(client, quickstart).dataset_id
        run = follow_run(client, submit_train(client, dataset_id, config))

    assert run.status == "succeeded", run
    assert run.compute_dtype in DTYPES
    if HAS_BF16_INSTRUCTIONS:  # the probe of this model's shapes decided, and was kept
        shapes = MatmulShapes(
            tiny.config.hidden_size, tiny.config.intermediate_size, tiny.config.vocab_size
        )
        kept = json.loads((home / CACHE_FILE_NAME).read_text())[probe_key(shapes)]
        assert (run.compute_dtype, run.compute_dtype_reason) == (kept["dtype"], kept["reason"])
    else:
        assert "no bf16 instructions" in run.compute_dtype_reason
    print_run(run)  # what `runs show` prints
    assert f"why {run.compute_dtype}" in capsys.readouterr().out
