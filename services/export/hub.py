"""Publish a trained adapter or merged model on the Hugging Face Hub, with a model card.

Three steps, each usable on its own:

- `build_model_card` writes the README.md the Hub shows: YAML front matter the Hub indexes
  (base model, library, tags, pipeline), then what the model is, what it was trained on (with the
  dataset's content hash, so a reader can tell whether they hold the same file), how, how well,
  how its export was verified, and how to load it.
- `stage_upload` assembles exactly the files to publish in a folder of their own. A run or cache
  directory may hold more than the model (peft's own placeholder README, optimizer state, plots):
  only the files that make up the model are published, never whatever else lies there.
- `push_to_hub` creates the repo if needed and uploads that folder, turning the Hub's failures
  into our error codes: no token, a rejected token, no network, anything else.

No gRPC here: a servicer or the CLI composes these.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import httpx2  # huggingface_hub's HTTP client: its transport errors mean "no network"
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from backpropagate_api.errors import (
    ConfigError,
    HubAuthFailedError,
    HubAuthRequiredError,
    HubError,
    HubUnreachableError,
    NotFoundError,
    quoted,
)
from backpropagate_services.common.atomic import staged

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Weights of a full HF model: one safetensors file, or shards with their index; .bin for old dirs.
MODEL_WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")

# The Hub's own rule (huggingface_hub's REPO_ID_REGEX, with the namespace required): letters,
# digits, '-', '_', '.', at most 96 characters, no '-' or '.' at either end of a part.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID_PATTERN = re.compile(rf"{_REPO_PART}/{_REPO_PART}")

ArtifactKind = Literal["adapter", "merged"]


@dataclass(frozen=True)
class ExportReport:
    """How a GGUF export of this model was verified; shown on the card when there was one."""

    quantization: str
    top1_agreement: float  # fraction of reference positions where the GGUF's argmax is torch's
    mean_kl: float  # mean KL(torch || gguf) per position
    smoke_answer: str
    smoke_prompt: str | None = None
    gguf_sha256: str | None = None


@dataclass(frozen=True)
class ModelCardInfo:
    """Everything the card says; a None field is left out of the card rather than guessed."""

    base_model: str  # a Hub id ("HuggingFaceTB/SmolLM2-135M-Instruct") or a local name
    artifact: ArtifactKind = "adapter"
    method: str = "LoRA"
    repo_id: str | None = None  # where the card will live, for the loading snippet
    model_name: str | None = None  # the card's title; derived from the base model by default
    license: str | None = None
    run_id: str | None = None
    # training data
    dataset_file: str | None = None
    dataset_sha256: str | None = None
    num_examples: int | None = None
    dataset_format: str | None = None
    # hyperparameters
    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: str | Sequence[str] | None = None
    max_length: int | None = None
    seed: int | None = None
    warmup_ratio: float | None = None
    # metrics
    final_loss: float | None = None
    loss_history: Sequence[float] | None = None
    eval_loss: float | None = None
    # verification of a GGUF export, when there was one
    export: ExportReport | None = None


@dataclass(frozen=True)
class HubPushResult:
    repo_id: str
    url: str  # the repo's page
    commit: str  # the commit's id on the Hub
    files: list[str]  # what was uploaded, relative to the folder


# -- the model card ------------------------------------------------------------------------------


def is_hub_repo_id(text: str) -> bool:
    """Whether `text` is an `owner/name` the Hub accepts (checked locally, no request)."""
    return (
        REPO_ID_PATTERN.fullmatch(text) is not None
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


def build_model_card(info: ModelCardInfo) -> str:
    """The README.md for the repo: Hub front matter, then the story of this model in sections."""
    info = replace(info, base_model=_public_base_model(info.base_model))
    tags = ["backpropagate", "lora", "peft" if info.artifact == "adapter" else "merged"]
    data = ModelCardData(
        # The Hub links base_model to that model's page and rejects what is no Hub id, so a local
        # base (a directory, a .gguf file, an alias) is named in the text only.
        base_model=info.base_model if is_hub_repo_id(info.base_model) else None,
        library_name="peft" if info.artifact == "adapter" else "transformers",
        license=info.license,
        pipeline_tag="text-generation",
        tags=tags,
    )
    sections = [
        _title_section(info),
        _model_section(info),
        _data_section(info),
        _hyperparameter_section(info),
        _metrics_section(info),
        _export_section(info.export) if info.export is not None else "",
        _usage_section(info),
    ]
    body = "\n\n".join(section for section in sections if section)
    # Parsed back before it is returned: a card the Hub cannot read must fail here, not on upload.
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def _public_base_model(base_model: str) -> str:
    """How a published card names the base model: a Hub id as it is, anything else (a run's
    base is the server's absolute path for a local model) by its last path part only, so the
    card tells the world the model's name but not the server's directory layout."""
    return base_model if is_hub_repo_id(base_model) else _last_part(base_model)


def _last_part(name: str) -> str:
    """The last part of a name: "owner/name" and "/a/b/name/" both give "name"."""
    return name.rstrip("/").rsplit("/", 1)[-1]


def _title_section(info: ModelCardInfo) -> str:
    base_name = _last_part(info.base_model)
    title = info.model_name or f"{base_name} {info.method} {info.artifact}"
    what = (
        f"A {info.method} adapter for `{info.base_model}`: load it on top of that base model."
        if info.artifact == "adapter"
        else f"`{info.base_model}` fine-tuned with {info.method}, the adapter merged into the "
        "weights: a plain transformers model."
    )
    return f"# {title}\n\n{what} Trained with Backpropagate."


def _model_section(info: ModelCardInfo) -> str:
    rows: list[tuple[str, object]] = [
        ("Base model", f"`{info.base_model}`"),
        ("Method", info.method),
        ("Artifact", "adapter (peft)" if info.artifact == "adapter" else "merged model"),
        ("Run", f"`{info.run_id}`" if info.run_id else None),
    ]
    return "## Model\n\n" + _table(("", ""), rows)


def _data_section(info: ModelCardInfo) -> str:
    rows: list[tuple[str, object]] = [
        ("File", f"`{info.dataset_file}`" if info.dataset_file else None),
        ("SHA-256", f"`{info.dataset_sha256}`" if info.dataset_sha256 else None),
        ("Examples", info.num_examples),
        ("Format", info.dataset_format),
    ]
    if all(value is None for _, value in rows):
        return "## Training data\n\nNot recorded."
    return "## Training data\n\n" + _table(("", ""), rows)


def _hyperparameter_section(info: ModelCardInfo) -> str:
    modules = info.target_modules
    rows: list[tuple[str, object]] = [
        ("Steps", info.steps),
        ("Batch size", info.batch_size),
        ("Learning rate", info.learning_rate),
        ("Warmup ratio", info.warmup_ratio),
        ("LoRA r", info.lora_r),
        ("LoRA alpha", info.lora_alpha),
        ("LoRA dropout", info.lora_dropout),
        ("Target modules", modules if isinstance(modules, str | None) else ", ".join(modules)),
        ("Max length (tokens)", info.max_length),
        ("Seed", info.seed),
    ]
    if all(value is None for _, value in rows):
        return "## Hyperparameters\n\nNot recorded."
    return "## Hyperparameters\n\n" + _table(("Hyperparameter", "Value"), rows)


def _metrics_section(info: ModelCardInfo) -> str:
    history = list(info.loss_history or [])
    rows: list[tuple[str, object]] = [
        ("Final training loss", _number(info.final_loss, ".4f")),
        ("Eval loss", _number(info.eval_loss, ".4f")),
    ]
    parts = ["## Metrics"]
    if any(value is not None for _, value in rows):
        parts.append(_table(("Metric", "Value"), rows))
    if history:
        parts.append(_loss_summary(history))
    if len(parts) == 1:
        parts.append("Not recorded.")
    return "\n\n".join(parts)


def _loss_summary(history: list[float]) -> str:
    """One line a reader can judge a run by: where the loss started, ended, and bottomed out."""
    best = min(range(len(history)), key=history.__getitem__)
    summary = (
        f"Training loss over {len(history)} steps: {history[0]:.4f} at step 1, "
        f"{history[-1]:.4f} at step {len(history)}, lowest {history[best]:.4f} at step {best + 1}"
    )
    # The last tenth smooths out the noise of a single final batch.
    tail = history[-(len(history) // 10) :] if len(history) >= 20 else []
    if tail:
        summary += f"; mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f}"
    return summary + "."


def _export_section(report: ExportReport) -> str:
    rows: list[tuple[str, object]] = [
        ("Quantisation", report.quantization),
        ("Top-1 agreement with the torch model", f"{report.top1_agreement:.1%}"),
        ("Mean KL(torch ‖ GGUF)", f"{report.mean_kl:.4g}"),
        ("GGUF SHA-256", f"`{report.gguf_sha256}`" if report.gguf_sha256 else None),
        ("Smoke-test prompt", report.smoke_prompt),
        ("Smoke-test answer", report.smoke_answer),
    ]
    return (
        "## Export\n\nA GGUF export was checked against the torch model on reference chats "
        "(next-token agreement and KL), then answered a prompt in llama.cpp.\n\n"
        + _table(("", ""), rows)
    )


def _usage_section(info: ModelCardInfo) -> str:
    repo = info.repo_id or "<owner>/<name>"
    chat = (
        'messages = [{"role": "user", "content": "Hello!"}]\n'
        "inputs = tokenizer.apply_chat_template(\n"
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True\n'
        ")\n"
        "output = model.generate(**inputs, max_new_tokens=64)\n"
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], '
        "skip_special_tokens=True))"
    )
    if info.artifact == "adapter":
        # Our adapters carry no tokenizer: the base model's chat template is the one it answers to.
        load = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{info.base_model}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{info.base_model}")\n'
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
        )
    return f"## How to use\n\n```python\n{load}\n{chat}\n```"


def _number(value: float | None, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def _cell(value: object) -> str:
    """A table cell: a '|' or a line break in free text (a smoke answer) must not break the row."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _table(header: tuple[str, str], rows: list[tuple[str, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows if value is not None]
    return "\n".join(lines)


# -- the folder to upload ------------------------------------------------------------------------


def artifact_kind(source_dir: Path) -> ArtifactKind:
    """Whether `source_dir` is a peft adapter or a full HF model; NotFoundError if neither."""
    if (source_dir / "adapter_config.json").is_file() and any(
        (source_dir / name).is_file() for name in ADAPTER_FILES[1:]
    ):
        return "adapter"
    if (source_dir / "config.json").is_file() and any(
        any(source_dir.glob(pattern)) for pattern in MODEL_WEIGHT_PATTERNS
    ):
        return "merged"
    raise NotFoundError(
        f"{source_dir} is neither a peft adapter (adapter_config.json + adapter_model.safetensors)"
        " nor a Hugging Face model directory (config.json + *.safetensors).",
        hint="Push the adapter directory of a finished run, or the merged model of an export.",
        path=str(source_dir),
    )


def _files_to_publish(source_dir: Path, kind: ArtifactKind) -> list[Path]:
    if kind == "adapter":
        names = {*ADAPTER_FILES, *TOKENIZER_FILES}
        chosen = [path for path in source_dir.iterdir() if path.name in names]
    else:
        names = {*MODEL_CONFIG_FILES, *TOKENIZER_FILES}
        chosen = [path for path in source_dir.iterdir() if path.name in names]
        chosen += [path for pattern in MODEL_WEIGHT_PATTERNS for path in source_dir.glob(pattern)]
    return sorted({path for path in chosen if path.is_file()})


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows: a merged 7B model is 15 GB, not worth copying.

    Safe because artifacts are never modified in place (they are replaced by rename)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage_upload(source_dir: Path, card: str, dest: Path) -> list[str]:
    """Build `dest`: the model's files from `source_dir` plus the card as README.md.

    Returns the sorted relative file names. `dest` appears complete or not at all.
    """
    kind = artifact_kind(source_dir)
    files = _files_to_publish(source_dir, kind)
    skipped = sorted(
        path.name for path in source_dir.iterdir() if path not in files and path.name != CARD_FILE
    )
    if skipped:
        log.info("not publishing %s from %s", ", ".join(skipped), source_dir)
    with staged(dest) as staging:
        staging.mkdir()
        for path in files:
            _link_or_copy(path, staging / path.name)
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
    return sorted([path.name for path in files] + [CARD_FILE])


# -- the push ------------------------------------------------------------------------------------


def validate_repo_id(repo_id: str) -> str:
    """`repo_id` if the Hub would accept it; checked before any token lookup or request."""
    if not is_hub_repo_id(repo_id):
        raise ConfigError(
            f"{quoted(repo_id)} is not a Hub repo id.",
            hint="Use owner/name: letters, digits, '-', '_' and '.', at most 96 characters each, "
            "no '--' or '..', not starting or ending with '-' or '.'.",
            repo_id=repo_id[:200],
        )
    return repo_id


def resolve_token(token: str | None) -> str:
    """The argument, else HF_TOKEN, else the token `huggingface-cli login` saved."""
    resolved = (token or "").strip() or get_token()
    if not resolved:
        raise HubAuthRequiredError("Pushing to the Hugging Face Hub needs a token; none is set.")
    return resolved


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
) -> HubPushResult:
    """Create `repo_id` if it does not exist and upload every file of `folder` in one commit.

    `private` applies when the repo is created; an existing repo keeps its visibility.

    Raises HubAuthRequiredError without a token, HubAuthFailedError when the Hub rejects it,
    HubUnreachableError when the Hub cannot be reached, HubError for any other refusal.
    """
    validate_repo_id(repo_id)
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is not a directory to upload.", path=str(folder))
    files = sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
    )
    resolved = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=resolved)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message="Upload model with Backpropagate",
        )
    except (httpx2.HTTPError, OSError, ValueError, RuntimeError) as exc:
        # HfHubHTTPError is an httpx2.HTTPError; offline mode an OSError; a README the Hub
        # rejects a ValueError; hf_xet's failures RuntimeErrors.
        raise _hub_error(exc, repo_id, api.endpoint, resolved) from exc
    log.info("pushed %d files to %s at %s", len(files), repo_id, commit.oid)
    return HubPushResult(repo_id=repo_id, url=str(repo), commit=commit.oid, files=files)


NETWORK_FAILURES = (httpx2.TransportError, ConnectionError, TimeoutError, socket.gaierror)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps: the HTTP client nests the socket error two levels down."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _hub_error(exc: Exception, repo_id: str, endpoint: str, token: str) -> HubError:
    """Our error for what the Hub client raised; the token is cut out of every text we keep.

    `redact` in the errors module catches `hf_...` tokens; this also catches any other shape
    (OAuth, a private endpoint's own), since we know the exact string.
    """
    reason = str(exc).replace(token, "***") or type(exc).__name__
    context = {"repo_id": repo_id, "endpoint": endpoint}
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return HubAuthFailedError(
                f"The Hub refused the token for {repo_id} (HTTP {status}): {reason}",
                status=status,
                **context,
            )
        return HubError(
            f"The Hub refused the push to {repo_id} (HTTP {status}): {reason}",
            status=status,
            **context,
        )
    causes = _causes(exc)
    if any(isinstance(cause, NETWORK_FAILURES) for cause in causes):
        # OfflineModeIsEnabled is a ConnectionError: the client refused before any socket opened.
        offline = any(isinstance(cause, OfflineModeIsEnabled) for cause in causes)
        hint = (
            "huggingface_hub is in offline mode: unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) "
            "to push."
            if offline
            else None
        )
        return HubUnreachableError(
            f"Could not reach the Hub at {endpoint} to push {repo_id}: {reason}",
            hint=hint,
            **context,
        )
    return HubError(f"Pushing to {repo_id} failed: {reason}", **context)
