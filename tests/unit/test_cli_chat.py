"""`backprop chat` with a GGUF file: one answer, or an interactive chat read from stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backpropagate_services.common.models import smollm2_gguf_path

pytestmark = pytest.mark.llama

BACKPROP = str(Path(sys.executable).parent / "backprop")


def backprop_chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BACKPROP, "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_one_message_gets_one_answer_through_the_gguf_template():
    done = backprop_chat(str(smollm2_gguf_path()), "Say hello.", "--max-tokens", "48")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_without_a_message_it_chats_until_the_input_ends_keeping_the_conversation():
    done = backprop_chat(str(smollm2_gguf_path()), "--max-tokens", "32", stdin="Hi!\nAnd you?\n")

    assert done.returncode == 0, done.stderr
    assert done.stdout.count("model:") == 2
    assert "an empty line or /exit ends it" in done.stderr


def test_a_missing_file_is_a_user_error_with_exit_code_1():
    done = backprop_chat("no-such-model.gguf", "Hi")

    assert done.returncode == 1
    assert "INPUT_NOT_FOUND" in done.stderr
