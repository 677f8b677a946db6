"""`backprop chat`: talk to an export in llama.cpp, through the chat template it carries.

The target is a GGUF file, or a run id: then that run's default export is made once (and
downloaded under <home>/exports) and reused by later chats. Each answer comes from a child
process (services/export/chat.py), so a native crash ends one answer, not the session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backpropagate.in_process import EXPORT_EXTRAS, services_needed
from backpropagate_api.errors import NotFoundError
from backpropagate_api.settings import Settings

with services_needed("backprop chat", EXPORT_EXTRAS):
    from backpropagate_services.export.chat import ChatReply, chat_reply

EXIT_WORDS = {"/exit", "/quit", "/bye"}


def resolve_chat_target(
    target: str, settings: Settings, export_run: Callable[[str, Path], Path]
) -> Path:
    """The GGUF to chat with: `target` itself, or the newest export of run `target` under
    <home>/exports, made with `export_run(run_id, directory)` when there is none yet."""
    if target.endswith(".gguf"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise NotFoundError(f"GGUF file not found: {target}", hint="Check the path.")
        return path
    directory = settings.home / "exports"
    existing = sorted(directory.glob(f"*-{target}-*.gguf"), key=lambda p: p.stat().st_mtime)
    return existing[-1] if existing else export_run(target, directory)


def _opening(system: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def ask_once(gguf: Path, question: str, *, system: str, threads: int, max_tokens: int) -> str:
    """One answer to `question`, as shown to the user."""
    question_only = [{"role": "user", "content": question}]
    return answer(gguf, question_only, system=system, threads=threads, max_tokens=max_tokens)


def answer(
    gguf: Path, conversation: list[dict[str, str]], *, system: str, threads: int, max_tokens: int
) -> str:
    """The next answer in `conversation` (its turns so far, the user's last), as shown to the
    user: the web UI's chat keeps the conversation itself."""
    messages = [*_opening(system), *conversation]
    return shown(chat_reply(gguf, messages, threads=threads, max_tokens=max_tokens), max_tokens)


def shown(reply: ChatReply, max_tokens: int) -> str:
    """The answer, marked when it was cut at `max_tokens` rather than finished."""
    if reply.finish_reason == "length":
        return f"{reply.text} [cut at {max_tokens} tokens]"
    return reply.text


def converse(
    gguf: Path,
    ask: Callable[[], str | None],
    show: Callable[[str], None],
    *,
    system: str,
    threads: int,
    max_tokens: int,
) -> int:
    """An interactive chat that keeps the conversation; ends on EOF, an empty line or /exit.
    Returns the number of answers given."""
    messages = _opening(system)
    answers = 0
    while (question := ask()) is not None and question.strip() not in ("", *EXIT_WORDS):
        messages.append({"role": "user", "content": question})
        reply = chat_reply(gguf, messages, threads=threads, max_tokens=max_tokens)
        messages.append({"role": "assistant", "content": reply.text})
        show(shown(reply, max_tokens))
        answers += 1
    return answers
