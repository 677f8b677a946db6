"""Publishing on the Hugging Face Hub: the model card, the staged folder, and the push's errors.

The adapter and the merged model are real ones (peft / transformers on a tiny random Llama).
Nothing here reaches a non-loopback address: pushes go to a closed port on 127.0.0.1, or to a
small Hub stand-in on 127.0.0.1 that speaks the endpoints `create_repo` and `upload_folder` use
(repo creation, README validation, preupload, NDJSON commit).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub
import pytest
from huggingface_hub import ModelCard, ModelCardData
from lora_adapters import tiny_llama

from backpropagate_api.errors import (
    EXIT_RUNTIME_ERROR,
    EXIT_USER_ERROR,
    ConfigError,
    HubAuthFailedError,
    HubAuthRequiredError,
    HubError,
    HubUnreachableError,
    NotFoundError,
)
from backpropagate_services.export.hub import (
    ExportReport,
    ModelCardInfo,
    build_model_card,
    push_to_hub,
    stage_upload,
)

if TYPE_CHECKING:
    pass

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Shaped like a real user token, so the errors module's `hf_...` redaction is what is tested.
FAKE_TOKEN = "hf_" + "Q7xLm2Vb9Rt4" * 3
DATASET_SHA256 = hashlib.sha256(b"the quickstart rows").hexdigest()
LOSS_HISTORY = (2.5, 2.1, 1.7, 1.45, 1.3, 1.22, 1.18, 1.21, 1.16, 1.15)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a train run saves: `peft_model.save_pretrained` (with peft's own README.md)."""
    from peft import LoraConfig, get_peft_model

    directory = tmp_path_factory.mktemp("adapter")
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    peft_model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("merged")
    tiny_llama().save_pretrained(directory)
    return directory


def adapter_info(**overrides: object) -> ModelCardInfo:
    fields: dict[str, object] = {
        "base_model": BASE_MODEL,
        "repo_id": "someone/smollm2-quickstart-lora",
        "license": "apache-2.0",
        "run_id": "run-20250101-abcd",
        "dataset_file": "quickstart.jsonl",
        "dataset_sha256": DATASET_SHA256,
        "num_examples": 120,
        "dataset_format": "sharegpt",
        "steps": 100,
        "batch_size": 4,
        "learning_rate": 2e-4,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "max_length": 512,
        "seed": 42,
        "final_loss": 1.15,
        "loss_history": LOSS_HISTORY,
        "eval_loss": 1.3021,
    }
    fields.update(overrides)
    return ModelCardInfo(**fields)  # type: ignore[arg-type]


def card_data(card: str) -> ModelCardData:
    """The front matter as the Hub's own client reads it."""
    data = ModelCard(card).data
    assert isinstance(data, ModelCardData)
    return data


def table_row(card: str, name: str) -> str:
    """The value cell of the markdown table row named `name`."""
    match = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", card, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{card}"
    return match.group(1)


# -- the model card ------------------------------------------------------------------------------


def test_adapter_card_front_matter_parses_with_base_model_peft_library_and_tags() -> None:
    data = card_data(build_model_card(adapter_info()))

    assert data.base_model == BASE_MODEL
    assert data.library_name == "peft"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert {"backpropagate", "lora"} <= set(data.tags or [])


def test_adapter_card_shows_hyperparameter_table_dataset_hash_and_loss_summary() -> None:
    card = build_model_card(adapter_info())

    assert "| Hyperparameter | Value |" in card
    expected = {
        "Steps": "100",
        "Batch size": "4",
        "Learning rate": "0.0002",
        "LoRA r": "16",
        "LoRA alpha": "32",
        "LoRA dropout": "0.05",
        "Target modules": "q_proj, v_proj",
        "Max length (tokens)": "512",
        "Seed": "42",
    }
    assert {name: table_row(card, name) for name in expected} == expected
    assert table_row(card, "SHA-256") == f"`{DATASET_SHA256}`"
    assert table_row(card, "File") == "`quickstart.jsonl`"
    assert table_row(card, "Examples") == "120"
    assert table_row(card, "Format") == "sharegpt"
    assert table_row(card, "Final training loss") == "1.1500"
    assert table_row(card, "Eval loss") == "1.3021"
    assert "2.5000 at step 1, 1.1500 at step 10, lowest 1.1500 at step 10" in card
    assert 'PeftModel.from_pretrained(base, "someone/smollm2-quickstart-lora")' in card
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_MODEL}")' in card


def test_card_leaves_out_what_the_info_does_not_record() -> None:
    card = build_model_card(ModelCardInfo(base_model=BASE_MODEL, steps=50))

    assert table_row(card, "Steps") == "50"
    assert "Batch size" not in card
    assert "## Training data\n\nNot recorded." in card
    assert "## Export" not in card
    assert "None" not in card


def test_card_shows_the_export_report_and_keeps_a_multiline_answer_in_its_row() -> None:
    report = ExportReport(
        quantization="q8_0",
        top1_agreement=0.9875,
        mean_kl=0.00342,
        smoke_prompt="What is the capital of France?",
        smoke_answer="Paris.\nIt is | also the largest city.",
    )
    card = build_model_card(adapter_info(export=report))

    assert table_row(card, "Quantisation") == "q8_0"
    assert table_row(card, "Top-1 agreement with the torch model") == "98.8%"
    assert table_row(card, "Mean KL(torch ‖ GGUF)") == "0.00342"
    assert table_row(card, "Smoke-test prompt") == "What is the capital of France?"
    assert table_row(card, "Smoke-test answer") == "Paris.<br>It is \\| also the largest city."


def test_merged_model_card_is_a_transformers_model_loaded_from_the_repo() -> None:
    card = build_model_card(adapter_info(artifact="merged", repo_id="someone/merged"))

    data = card_data(card)
    assert data.library_name == "transformers"
    assert data.base_model == BASE_MODEL
    assert 'AutoModelForCausalLM.from_pretrained("someone/merged")' in card
    assert "PeftModel" not in card


@pytest.mark.parametrize(
    ("base_model", "name"),
    [
        ("/home/me/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("/srv/bp/models/smollm2.Q8_0.gguf", "smollm2.Q8_0.gguf"),
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ],
)
def test_a_local_base_model_is_named_by_its_name_never_by_the_servers_path(
    base_model: str, name: str
) -> None:
    card = build_model_card(adapter_info(base_model=base_model))

    assert card_data(card).base_model is None
    assert table_row(card, "Base model") == f"`{name}`"
    assert "/home/" not in card and "/srv/" not in card


# -- the staged folder ---------------------------------------------------------------------------


def test_staged_adapter_folder_holds_exactly_the_adapter_files_and_our_card(
    adapter_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for path in adapter_dir.iterdir():
        (run_dir / path.name).write_bytes(path.read_bytes())
    (run_dir / "loss.png").write_bytes(b"\x89PNG")  # a run's byproducts are not published
    (run_dir / "optimizer.pt").write_bytes(b"state")
    card = build_model_card(adapter_info())

    files = stage_upload(run_dir, card, tmp_path / "upload")

    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(path.name for path in (tmp_path / "upload").iterdir()) == files
    assert (tmp_path / "upload" / "README.md").read_text(encoding="utf-8") == card
    weights = "adapter_model.safetensors"
    assert (tmp_path / "upload" / weights).read_bytes() == (adapter_dir / weights).read_bytes()
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".partial")] == []


def test_staged_merged_model_folder_holds_config_weights_and_our_card(
    merged_dir: Path, tmp_path: Path
) -> None:
    card = build_model_card(adapter_info(artifact="merged"))

    files = stage_upload(merged_dir, card, tmp_path / "upload")

    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors"]


def test_a_directory_that_is_no_model_is_refused_with_input_not_found(tmp_path: Path) -> None:
    source = tmp_path / "notes"
    source.mkdir()
    (source / "config.json").write_text("{}")  # a config alone, without weights, is no model

    with pytest.raises(NotFoundError) as caught:
        stage_upload(source, "---\n---\n", tmp_path / "upload")

    assert caught.value.code == "INPUT_NOT_FOUND"
    assert "neither a peft adapter" in caught.value.message
    assert not (tmp_path / "upload").exists()


# -- the push: errors before and without the network ---------------------------------------------


@pytest.fixture
def no_hub_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token anywhere: not in the environment, not in a (temporary, empty) HF home.

    huggingface_hub reads HF_HOME once at import, so its token path is pointed there too.
    """
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))


def closed_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed on return: connecting is refused


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Whatever huggingface_hub does besides our requests stays on this machine and in tmp_path.

    It fetches an "agent harness" list from its default endpoint on the first request (unless
    telemetry is off), a proxy would carry 127.0.0.1 requests elsewhere, and hf_xet writes its
    logs under HF_HOME. The default endpoint becomes a closed loopback port, so a call we did
    not foresee fails here instead of leaving the machine.
    """
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(
        huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_loopback_port()}"
    )
    huggingface_hub.close_session()  # the next client is built from the cleaned environment
    yield
    huggingface_hub.close_session()


@pytest.fixture
def closed_port_endpoint(monkeypatch: pytest.MonkeyPatch, loopback_only: None) -> str:
    endpoint = f"http://127.0.0.1:{closed_loopback_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    return endpoint


@pytest.fixture
def upload_folder(adapter_dir: Path, tmp_path: Path) -> Path:
    stage_upload(adapter_dir, build_model_card(adapter_info()), tmp_path / "upload")
    return tmp_path / "upload"


@pytest.mark.parametrize(
    "repo_id",
    [
        "no-owner",
        "a/b/c",
        "owner/",
        "-owner/name",
        "owner/name-",
        "owner/.name",
        "own--er/name",
        "owner/na..me",
        "owner/name.git",
        "owner/na me",
        "owner/naïve",
        "owner/" + "x" * 97,
    ],
)
def test_a_repo_id_the_hub_would_refuse_is_input_config_invalid(
    repo_id: str, upload_folder: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        push_to_hub(upload_folder, repo_id, token=FAKE_TOKEN, endpoint="http://127.0.0.1:9")

    assert caught.value.code == "INPUT_CONFIG_INVALID"
    assert "owner/name" in caught.value.hint


def test_push_without_any_token_is_hub_auth_required_with_the_login_hint(
    no_hub_login: None, closed_port_endpoint: str, upload_folder: Path
) -> None:
    with pytest.raises(HubAuthRequiredError) as caught:
        push_to_hub(upload_folder, "someone/model", endpoint=closed_port_endpoint)

    assert caught.value.code == "HUB_AUTH_REQUIRED"
    assert "huggingface-cli login" in caught.value.hint
    assert "HF_TOKEN" in caught.value.hint
    assert caught.value.exit_code == EXIT_USER_ERROR


def test_push_to_an_unreachable_hub_is_hub_unreachable_quickly_and_never_shows_the_token(
    closed_port_endpoint: str, upload_folder: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(HubUnreachableError) as caught:
        push_to_hub(upload_folder, "someone/model", token=FAKE_TOKEN, endpoint=closed_port_endpoint)

    assert time.monotonic() - started < 10
    error = caught.value
    assert error.code == "HUB_UNREACHABLE"
    assert error.retryable
    assert closed_port_endpoint in error.message
    assert "network" in error.hint
    assert FAKE_TOKEN not in json.dumps(error.to_dict()) + str(error)


def test_push_in_huggingface_hub_offline_mode_is_hub_unreachable_with_the_offline_hint(
    monkeypatch: pytest.MonkeyPatch, closed_port_endpoint: str, upload_folder: Path
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubUnreachableError) as caught:
        push_to_hub(upload_folder, "someone/model", token=FAKE_TOKEN, endpoint=closed_port_endpoint)

    assert "HF_HUB_OFFLINE" in caught.value.hint


def test_hub_errors_redact_hf_tokens_from_message_hint_and_context() -> None:
    error = HubAuthFailedError(
        f"rejected {FAKE_TOKEN}", hint=f"token {FAKE_TOKEN} is read-only", header=FAKE_TOKEN
    )

    assert FAKE_TOKEN not in json.dumps(error.to_dict()) + str(error)


def test_hub_error_classes_carry_their_codes_and_retry_policy() -> None:
    assert (HubError.code, HubError.exit_code, HubError.grpc_status) == (
        "HUB_PUSH_FAILED",
        EXIT_RUNTIME_ERROR,
        "UNAVAILABLE",
    )
    assert not HubAuthRequiredError.retryable
    assert not HubAuthFailedError.retryable
    assert HubUnreachableError.retryable
    assert all(
        issubclass(cls, HubError)
        for cls in (HubAuthRequiredError, HubAuthFailedError, HubUnreachableError)
    )


# -- the push against a Hub stand-in on 127.0.0.1 ------------------------------------------------


@dataclass
class FakeHub:
    """Just enough of the Hub's HTTP API for `create_repo` + `upload_folder`, all in memory.

    Every file is declared "regular" at preupload, so its bytes travel base64 in the NDJSON
    commit: no LFS or Xet storage to stand in for.
    """

    token: str
    endpoint: str = ""
    refuse_create_with: int | None = None
    repos: dict[str, bool] = field(default_factory=dict)  # repo_id -> private
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def fake_hub_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest's output clean

        def reply(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorised(self) -> bool:
            header = self.headers.get("Authorization", "")
            if header == f"Bearer {hub.token}":
                return True
            # Like a careless server, echo what was sent: it must still not reach our errors.
            self.reply(401, {"error": f"Invalid credentials in Authorization: {header}"})
            return False

        def do_GET(self) -> None:
            hub.requests.append(f"GET {self.path}")
            if self.authorised():
                self.reply(404, {"error": "Repository not found"})

        def do_POST(self) -> None:
            hub.requests.append(f"POST {self.path}")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self.authorised():
                return
            if self.path == "/api/repos/create":
                if hub.refuse_create_with:
                    self.reply(hub.refuse_create_with, {"error": "Repository name is reserved"})
                    return
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}"
                hub.repos[repo_id] = request.get("visibility") == "private"
                self.reply(200, {"url": f"{hub.endpoint}/{repo_id}"})
            elif self.path == "/api/validate-yaml":  # upload_folder checks README.md first
                ModelCard(json.loads(body)["content"])  # raises on bad front matter
                self.reply(200, {"errors": [], "warnings": []})
            elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/main", self.path):
                files = json.loads(body)["files"]
                modes = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in files
                ]
                self.reply(200, {"files": modes})
            elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", self.path):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                assert lines[0]["key"] == "header"
                for line in lines[1:]:
                    assert line["key"] == "file", line
                    hub.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                oid = hashlib.sha1(body).hexdigest()
                hub.commits.append(oid)
                url = f"{hub.endpoint}/{match.group(1)}/commit/{oid}"
                self.reply(200, {"commitUrl": url, "commitOid": oid})
            else:
                self.reply(404, {"error": f"no route {self.path}"})

    return Handler


@pytest.fixture
def fake_hub(loopback_only: None) -> Iterator[FakeHub]:
    hub = FakeHub(token=FAKE_TOKEN)
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake_hub_handler(hub))
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()


def test_push_to_a_loopback_hub_creates_the_repo_and_commits_every_staged_file(
    fake_hub: FakeHub, upload_folder: Path
) -> None:
    result = push_to_hub(
        upload_folder,
        "someone/smollm2-quickstart-lora",
        token=FAKE_TOKEN,
        private=True,
        endpoint=fake_hub.endpoint,
    )

    assert fake_hub.repos == {"someone/smollm2-quickstart-lora": True}
    expected = {path.name: path.read_bytes() for path in upload_folder.iterdir()}
    assert fake_hub.files == expected
    assert result.files == sorted(expected)
    assert result.commit == fake_hub.commits[-1]
    assert result.url == f"{fake_hub.endpoint}/someone/smollm2-quickstart-lora"
    assert result.repo_id == "someone/smollm2-quickstart-lora"
    assert card_data(fake_hub.files["README.md"].decode()).base_model == BASE_MODEL


@pytest.mark.parametrize("source", ["HF_TOKEN", "saved login"])
def test_without_a_token_argument_the_push_uses_hf_token_or_the_saved_login(
    source: str,
    no_hub_login: None,
    monkeypatch: pytest.MonkeyPatch,
    fake_hub: FakeHub,
    upload_folder: Path,
) -> None:
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    else:  # where `huggingface-cli login` writes it
        Path(huggingface_hub.constants.HF_TOKEN_PATH).write_text(FAKE_TOKEN)

    result = push_to_hub(upload_folder, "someone/model", endpoint=fake_hub.endpoint)

    assert fake_hub.repos == {"someone/model": False}
    assert result.files == sorted(fake_hub.files)


def test_a_token_the_hub_rejects_is_hub_auth_failed_even_when_the_server_echoes_it(
    fake_hub: FakeHub, upload_folder: Path
) -> None:
    # Not hf_-shaped (an OAuth or a private endpoint's token): only the exact-string scrub helps.
    wrong_token = "oauth-7f3a9c2e5b8d1f4a6c0e"

    with pytest.raises(HubAuthFailedError) as caught:
        push_to_hub(upload_folder, "someone/model", token=wrong_token, endpoint=fake_hub.endpoint)

    error = caught.value
    assert error.code == "HUB_AUTH_FAILED"
    assert not error.retryable
    assert "HTTP 401" in error.message
    assert wrong_token not in json.dumps(error.to_dict()) + str(error)
    assert fake_hub.files == {}


def test_any_other_refusal_of_the_hub_is_hub_push_failed_with_its_reason(
    fake_hub: FakeHub, upload_folder: Path
) -> None:
    fake_hub.refuse_create_with = 400

    with pytest.raises(HubError) as caught:
        push_to_hub(upload_folder, "someone/model", token=FAKE_TOKEN, endpoint=fake_hub.endpoint)

    assert type(caught.value) is HubError
    assert caught.value.code == "HUB_PUSH_FAILED"
    assert "Repository name is reserved" in caught.value.message
    assert "HTTP 400" in caught.value.message
