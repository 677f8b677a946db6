"""Registering a GGUF with Ollama speaks the documented blob + create protocol, and fails clearly.

Every test talks HTTP to a real server on a free loopback port (tests/ollama_test_server.py),
which checks uploads against their digests and create requests against the documented shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import requests
import servers
from ollama_test_server import OllamaTestServer, running_ollama_test_server

from backpropagate_api.errors import ConfigError, OllamaRegistrationError
from backpropagate_services.export.modelfile import detect_template_family
from backpropagate_services.export.ollama import (
    OllamaModel,
    RetryPolicy,
    ollama_base_url,
    register_with_ollama,
)

# The plain ChatML template many fine-tunes carry.
CHATML = (
    "{% for message in messages %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FAST_RETRY = RetryPolicy(attempts=3, first_wait_s=0.01, max_wait_s=0.02)


@pytest.fixture
def ollama() -> Iterator[OllamaTestServer]:
    with running_ollama_test_server() as server:
        yield server


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    """A real, tiny GGUF (2 KB): header, metadata with the chat template, one tensor."""
    path = tmp_path / "tiny-f16.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", np.arange(512, dtype=np.float32).reshape(8, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def register(gguf_file: Path, ollama: OllamaTestServer, **options: object) -> OllamaModel:
    return register_with_ollama(
        gguf_file,
        "tiny:latest",
        chat_template=CHATML,
        host=ollama.url,
        retry=FAST_RETRY,
        **options,  # type: ignore[arg-type]
    )


def test_gguf_is_uploaded_as_the_blob_named_by_its_sha256_then_the_model_is_created(
    gguf_file: Path, ollama: OllamaTestServer
) -> None:
    model = register(gguf_file, ollama)

    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert model == OllamaModel(name="tiny:latest", digest=digest, host=ollama.url)
    assert ollama.blobs == {digest: gguf_file.read_bytes()}
    assert ollama.requests == [
        ("HEAD", f"/api/blobs/sha256:{digest}"),
        ("POST", f"/api/blobs/sha256:{digest}"),
        ("POST", "/api/create"),
    ]


def test_create_request_carries_the_modelfile_familys_template_stop_tokens_and_context(
    gguf_file: Path, ollama: OllamaTestServer
) -> None:
    model = register(gguf_file, ollama, num_ctx=8192, system="Answer in French.")

    family = detect_template_family(CHATML)
    assert ollama.models["tiny:latest"] == {
        "model": "tiny:latest",
        "files": {"tiny-f16.gguf": f"sha256:{model.digest}"},
        "template": family.go_template,
        "parameters": {"stop": ["<|im_start|>", "<|im_end|>"], "num_ctx": 8192},
        "system": "Answer in French.",
        "stream": False,
    }
    assert family.name == "chatml"


def test_a_blob_the_daemon_already_holds_is_not_uploaded_again(
    gguf_file: Path, ollama: OllamaTestServer
) -> None:
    register(gguf_file, ollama)
    ollama.requests.clear()

    register(gguf_file, ollama)

    assert ollama.calls("HEAD", "/api/blobs/") == 1
    assert ollama.calls("POST", "/api/blobs/") == 0
    assert ollama.calls("POST", "/api/create") == 1


def test_unreachable_daemon_fails_after_retries_with_the_ollama_serve_hint(
    gguf_file: Path,
) -> None:
    closed_port = servers.free_port()

    with pytest.raises(OllamaRegistrationError) as caught:
        register_with_ollama(
            gguf_file,
            "tiny",
            chat_template=CHATML,
            host=f"127.0.0.1:{closed_port}",
            retry=FAST_RETRY,
        )

    error = caught.value
    assert error.code == "DEP_OLLAMA_REGISTRATION_FAILED"
    assert error.retryable
    assert "ollama serve" in error.hint and "OLLAMA_HOST" in error.hint
    assert "(3 attempts)" in error.message
    assert error.context == {"host": f"http://127.0.0.1:{closed_port}", "model": "tiny"}


def test_server_errors_are_retried_and_the_registration_then_succeeds(
    gguf_file: Path, ollama: OllamaTestServer
) -> None:
    ollama.fail_next("HEAD /api/blobs", 503)
    ollama.fail_next("POST /api/create", 500)

    model = register(gguf_file, ollama)

    assert ollama.calls("HEAD", "/api/blobs/") == 2
    assert ollama.calls("POST", "/api/create") == 2
    assert "tiny:latest" in ollama.models
    assert model.digest in ollama.blobs


def test_a_daemon_that_keeps_failing_is_given_up_on_with_its_own_message(
    gguf_file: Path, ollama: OllamaTestServer
) -> None:
    ollama.fail_next("POST /api/create", 500, 500, 500)

    with pytest.raises(OllamaRegistrationError) as caught:
        register(gguf_file, ollama)

    assert ollama.calls("POST", "/api/create") == FAST_RETRY.attempts
    assert "HTTP 500: test server answers 500 to POST /api/create" in caught.value.message
    assert caught.value.context["status"] == "500"


def test_a_refused_request_is_not_retried_and_says_what_the_daemon_answered(
    gguf_file: Path, ollama: OllamaTestServer
) -> None:
    ollama.fail_next("POST /api/create", 400)

    with pytest.raises(OllamaRegistrationError) as caught:
        register(gguf_file, ollama)

    assert ollama.calls("POST", "/api/create") == 1
    assert caught.value.code == "DEP_OLLAMA_REGISTRATION_FAILED"
    assert "did not create the model: HTTP 400" in caught.value.message
    assert "would not create the model" in caught.value.hint
    assert caught.value.context == {"host": ollama.url, "model": "tiny:latest", "status": "400"}


def test_ollama_host_from_the_environment_is_used_when_no_host_is_given(
    gguf_file: Path, ollama: OllamaTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", ollama.url.removeprefix("http://"))

    model = register_with_ollama(gguf_file, "from-env", chat_template=None, retry=FAST_RETRY)

    assert model.host == ollama.url
    assert ollama.models["from-env"]["template"] == detect_template_family(None).go_template


def test_test_server_rejects_an_upload_that_does_not_hash_to_its_digest(
    ollama: OllamaTestServer,
) -> None:
    wrong = hashlib.sha256(b"other bytes").hexdigest()

    response = requests.post(f"{ollama.url}/api/blobs/sha256:{wrong}", data=b"GGUF", timeout=5)

    assert response.status_code == 400
    assert "digest mismatch" in response.json()["error"]
    assert ollama.blobs == {}


@pytest.mark.parametrize(
    ("ollama_host", "base_url"),
    [
        (None, "http://127.0.0.1:11434"),
        ("", "http://127.0.0.1:11434"),
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("localhost", "http://localhost:11434"),
        (":9999", "http://127.0.0.1:9999"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:11500", "http://127.0.0.1:11500"),
        ("[::1]:11434", "http://[::1]:11434"),
        ("::", "http://[::1]:11434"),
        ('"127.0.0.1:5000"', "http://127.0.0.1:5000"),
        ("https://ollama.example.com", "https://ollama.example.com:443"),
        ("http://ollama.example.com/proxy/", "http://ollama.example.com:80/proxy"),
        ("ollama.example.com:99999", "http://ollama.example.com:11434"),
    ],
)
def test_ollama_host_is_read_the_way_the_ollama_cli_reads_it(
    ollama_host: str | None, base_url: str
) -> None:
    assert ollama_base_url(ollama_host) == base_url


def test_ollama_host_with_another_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        ollama_base_url("tcp://127.0.0.1:11434")

    assert "OLLAMA_HOST" in caught.value.hint
