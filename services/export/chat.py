"""A chat answer from a GGUF file through llama.cpp, as a user of llama.cpp or Ollama gets it.

The GGUF's own chat template renders the messages (no `chat_format`), so what is checked and
shown is what the file does on its own. llama.cpp runs in an isolated child process: a native
crash fails this call with RUNTIME_NATIVE_CRASH instead of killing the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from backpropagate_services.common.isolation import run_isolated
from backpropagate_services.export.llama_runtime import open_gguf

if TYPE_CHECKING:
    from llama_cpp.llama_types import CreateChatCompletionResponse


# What Ollama applies unless a Modelfile says otherwise: answers here read like answers there.
# Greedy decoding without it sends small quantised models into loops they would not enter in
# Ollama (docs/export.md).
RUNNER_REPEAT_PENALTY = 1.1


@dataclass(frozen=True)
class ChatReply:
    text: str
    # "stop": the model ended its turn (end-of-turn token); "length": cut at max_tokens.
    finish_reason: str
    completion_tokens: int


def _reply_in_this_process(
    gguf_path: Path,
    messages: list[dict[str, str]],
    threads: int,
    max_tokens: int,
    n_ctx: int,
    lora_path: Path | None,
) -> ChatReply:
    llm = open_gguf(gguf_path, n_ctx=n_ctx, threads=threads, lora_path=lora_path)
    try:
        # Without stream=True the result is one response, never the iterator the union allows.
        completion = cast(
            "CreateChatCompletionResponse",
            llm.create_chat_completion(
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0.0,
                repeat_penalty=RUNNER_REPEAT_PENALTY,
            ),
        )
    finally:
        llm.close()
    choice = completion["choices"][0]
    return ChatReply(
        text=str(choice["message"]["content"] or "").strip(),
        finish_reason=str(choice["finish_reason"]),
        completion_tokens=int(completion["usage"]["completion_tokens"]),
    )


def chat_reply(
    gguf_path: Path,
    messages: list[dict[str, str]],
    *,
    threads: int,
    max_tokens: int,
    n_ctx: int = 2048,
    stage: str = "chat",
    lora_path: Path | None = None,
) -> ChatReply:
    """Greedy reply to `messages` ([{"role", "content"}]) from the GGUF (with the GGUF adapter
    `lora_path` applied, if given), in a child process.

    Raises ModelLoadError for a file llama.cpp cannot load, NativeCrashError if it crashes.
    """
    return run_isolated(
        stage, _reply_in_this_process, gguf_path, messages, threads, max_tokens, n_ctx, lora_path
    )
