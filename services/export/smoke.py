"""One real chat answer from the exported GGUF, as a user of llama.cpp or Ollama would get it.

Verification checks the numbers; this checks that the file loads, that its own chat template
renders, and that generation stops on the model's end-of-turn token with text in between.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from backpropagate_services.common.errors import ExportSmokeTestError

if TYPE_CHECKING:
    from llama_cpp.llama_types import CreateChatCompletionResponse


def smoke_answer(gguf_path: Path, prompt: str, threads: int, max_tokens: int = 48) -> str:
    """Greedy answer to `prompt` through the GGUF's chat template; ExportSmokeTestError if empty.

    Both thread counts are set: `n_threads_batch` defaults to every core, and on a small machine
    whose other cores are busy that runs several times slower than one thread. The answer does
    not depend on the thread count (docs/export.md); it is checked for being there, not for its
    words, since a near-tie can send a faithful quantisation down another branch.
    """
    import llama_cpp

    try:
        llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    except ValueError as exc:  # llama-cpp-python's way of saying the file did not load
        raise ExportSmokeTestError(f"llama.cpp could not load {gguf_path.name}: {exc}") from exc
    try:
        # No chat_format: llama-cpp-python then renders the template stored in the GGUF.
        # Without stream=True the result is one response, never the iterator the union allows.
        completion = cast(
            "CreateChatCompletionResponse",
            llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.0,
            ),
        )
    finally:
        llm.close()
    answer = str(completion["choices"][0]["message"]["content"] or "").strip()
    if not answer:
        raise ExportSmokeTestError(
            f"{gguf_path.name} answered {prompt!r} with nothing.", gguf=str(gguf_path)
        )
    return answer
