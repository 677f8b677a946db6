"""One real chat answer from the exported GGUF, checked the way a user would notice a fault.

Verification checks the numbers; this checks that the file loads, that its own chat template
renders, and that generation ends on the model's end-of-turn token (finish reason "stop") with
text before it. A template or stop-token fault shows as an answer that never ends, which a
generous token budget tells apart from a merely long answer.
"""

from __future__ import annotations

from pathlib import Path

from backpropagate_api.errors import ExportSmokeTestError, ModelLoadError
from backpropagate_services.export.chat import ChatReply, chat_reply

# A question any chat model answers in a sentence, so that a missing end-of-turn shows.
DEFAULT_SMOKE_PROMPT = "What is the capital of France? Answer in one sentence."
# Far longer than a one-sentence answer; a model that has not stopped by then will not stop.
SMOKE_MAX_TOKENS = 256


def smoke_answer(
    gguf_path: Path,
    prompt: str,
    threads: int,
    max_tokens: int = SMOKE_MAX_TOKENS,
    lora_path: Path | None = None,
) -> ChatReply:
    """Greedy answer to `prompt`; ExportSmokeTestError if it is empty or does not stop.

    It is checked for being there and ending, not for its words: a near-tie can send a faithful
    quantisation down another branch (docs/export.md).
    """
    try:
        reply = chat_reply(
            gguf_path,
            [{"role": "user", "content": prompt}],
            threads=threads,
            max_tokens=max_tokens,
            stage="smoke",
            lora_path=lora_path,
        )
    except ModelLoadError as exc:
        raise ExportSmokeTestError(exc.message, gguf=str(gguf_path)) from exc
    if not reply.text:
        raise ExportSmokeTestError(
            f"{gguf_path.name} answered {prompt!r} with nothing.", gguf=str(gguf_path)
        )
    if reply.finish_reason != "stop":
        raise ExportSmokeTestError(
            f"{gguf_path.name} did not end its answer to {prompt!r} within {max_tokens} tokens "
            f"(finish reason {reply.finish_reason!r}): {reply.text[:120]!r}...",
            hint="If a less quantised export (q8_0, f16) of the same run ends its answer, this "
            "quantisation derails the model: use that one. If f16 does not end either, the chat "
            "template or end-of-turn token is wrong: check the base model's tokenizer files.",
            gguf=str(gguf_path),
        )
    return reply
