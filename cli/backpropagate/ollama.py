"""Hand an exported GGUF to Ollama: a Modelfile next to it, or a model registered with a daemon.

Both read what the GGUF itself carries, the chat template the model was trained with and its
end-of-turn token, so Ollama formats chats exactly as training did (services/export/modelfile.py
translates the template). Client-side on purpose: the daemon is the user's, next to the file.
"""

from __future__ import annotations

from pathlib import Path

from backpropagate.in_process import EXPORT_EXTRAS, services_needed

with services_needed("Handing a GGUF to Ollama", EXPORT_EXTRAS):
    from backpropagate_services.export.convert import read_gguf_summary
    from backpropagate_services.export.modelfile import render_modelfile, write_modelfile
    from backpropagate_services.export.ollama import OllamaModel
    from backpropagate_services.export.ollama import register_with_ollama as _register

DEFAULT_NUM_CTX = 4096


def modelfile_path(gguf_path: Path) -> Path:
    """`<name>.Modelfile` beside the GGUF, so exports in one directory keep their own."""
    return gguf_path.with_suffix(".Modelfile")


def write_ollama_modelfile(
    gguf_path: Path, *, system: str | None = None, num_ctx: int = DEFAULT_NUM_CTX
) -> Path:
    """Write the Modelfile for `gguf_path` beside it; `ollama create NAME -f <it>` uses it."""
    summary = read_gguf_summary(gguf_path)
    text = render_modelfile(
        gguf_path.name,
        summary.chat_template,
        num_ctx=num_ctx,
        system=system,
        eos_token=summary.eos_token,
    )
    return write_modelfile(modelfile_path(gguf_path), text)


def register_with_ollama(
    gguf_path: str | Path,
    name: str,
    *,
    system: str | None = None,
    num_ctx: int = DEFAULT_NUM_CTX,
    host: str | None = None,
) -> OllamaModel:
    """Create the Ollama model `name` from an exported GGUF (then: `ollama run NAME`).

    `host` is an OLLAMA_HOST value (default: the environment's, else http://127.0.0.1:11434).
    An unreachable daemon raises OllamaRegistrationError (DEP_OLLAMA_REGISTRATION_FAILED).
    """
    path = Path(gguf_path)
    summary = read_gguf_summary(path)
    return _register(
        path,
        name,
        chat_template=summary.chat_template,
        system=system,
        num_ctx=num_ctx,
        host=host,
        eos_token=summary.eos_token,
    )
