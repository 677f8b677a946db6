"""An Ollama Modelfile for an exported GGUF, in the chat format the model was trained on.

Ollama does not run the Jinja chat template stored in a GGUF. It formats chats with a Go
template, and for a GGUF imported without one it fuzzy-matches the Jinja text against its own
library, falling back to the bare prompt. A fine-tuned model prompted in any other layout than its
training one answers worse, so the export states the template explicitly.

The family is recognised from the special tokens in the Jinja text; each family's Go template is
literal text around `.System` and each message's `.Content`, the layout of Ollama's own templates
(github.com/ollama/ollama, template/*.gotmpl). Where those differ from the model's Jinja template
the Jinja template wins, because the model saw it in training: Mistral v0.3 and Gemma 3 put the
system prompt and the user's text two newlines apart, Ollama's templates one. What a template
writes into the system turn by itself (Qwen's and SmolLM2's default system prompt, Llama 3.1's
knowledge-cutoff lines) is read off the Jinja template by rendering it, as transformers did when
the training data was formatted.

The templates take the system prompt from `.System` and skip the system entries of `.Messages`:
older Ollama releases dropped those entries from `.Messages`, current ones keep them, and the
prompt must be the same for both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backpropagate_api.errors import ConfigError
from backpropagate_services.common.atomic import staged

MODELFILE_NAME = "Modelfile"

# Stand-ins rendered through the Jinja template to find what it writes around a system prompt.
# Plain words: templates `trim` message contents, and a probe must survive that unchanged.
_PROBE_SYSTEM = "PROBE-SYSTEM-PROMPT"
_PROBE_USER = "PROBE-USER-MESSAGE"


@dataclass(frozen=True)
class _Layout:
    """How one family lays out a chat: the literal text around each turn's content."""

    name: str
    markers: tuple[str, ...]  # all present in a Jinja template of this family
    user: tuple[str, str]  # text before and after a user message
    assistant: tuple[str, str]
    generation_prompt: str  # what opens the turn the model writes
    stop: tuple[str, ...]
    # A system prompt is either a turn of its own (its prefix and suffix) or is written at the
    # start of the first or the last user turn, followed by `system_separator`.
    system: tuple[str, str] | None = None
    system_in_user: str | None = None  # "first" or "last"
    system_separator: str = ""
    default_eos: str = ""  # the family's end-of-sequence token when the caller does not say


_EOS = "{eos}"  # stands for the tokenizer's end-of-sequence token; dropped when there is none

# Most specific first: Phi-4 is ChatML with a separator token.
_LAYOUTS = (
    _Layout(
        name="phi4",
        markers=("<|im_start|>", "<|im_sep|>"),
        user=("<|im_start|>user<|im_sep|>", "<|im_end|>"),
        assistant=("<|im_start|>assistant<|im_sep|>", "<|im_end|>"),
        generation_prompt="<|im_start|>assistant<|im_sep|>",
        stop=("<|im_start|>", "<|im_end|>", "<|im_sep|>"),
        system=("<|im_start|>system<|im_sep|>", "<|im_end|>"),
    ),
    _Layout(
        name="chatml",  # Qwen 2 / 2.5 / 3, SmolLM2, and most fine-tunes of base models
        markers=("<|im_start|>", "<|im_end|>"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
        generation_prompt="<|im_start|>assistant\n",
        stop=("<|im_start|>", "<|im_end|>"),
        system=("<|im_start|>system\n", "<|im_end|>\n"),
    ),
    _Layout(
        name="llama3",
        markers=("<|start_header_id|>", "<|eot_id|>"),
        user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    ),
    _Layout(
        name="gemma",  # Gemma 2 has no system role; Gemma 3 opens the first user turn with it
        markers=("<start_of_turn>", "<end_of_turn>"),
        user=("<start_of_turn>user\n", "<end_of_turn>\n"),
        assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
        generation_prompt="<start_of_turn>model\n",
        stop=("<start_of_turn>", "<end_of_turn>"),
        system_in_user="first",
        system_separator="\n\n",
    ),
    _Layout(
        name="phi3",
        markers=("<|user|>", "<|assistant|>", "<|end|>"),
        user=("<|user|>\n", "<|end|>\n"),
        assistant=("<|assistant|>\n", "<|end|>\n"),
        generation_prompt="<|assistant|>\n",
        stop=("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
        system=("<|system|>\n", "<|end|>\n"),
    ),
    _Layout(
        name="mistral",  # the v0.3 layout: the system prompt opens the last user turn
        markers=("[INST]", "[/INST]"),
        user=("[INST] ", "[/INST]"),
        assistant=(" ", _EOS),
        generation_prompt="",
        stop=("[INST]", "[/INST]", _EOS),
        system_in_user="last",
        system_separator="\n\n",
        default_eos="</s>",
    ),
)

# Not the format of any model: a readable layout for a template nobody recognised.
_GENERIC = _Layout(
    name="generic",
    markers=(),
    user=("User: ", "\n\n"),
    assistant=("Assistant: ", "\n\n"),
    generation_prompt="Assistant:",
    stop=("User:", _EOS),
    system=("", "\n\n"),
)


@dataclass(frozen=True)
class TemplateFamily:
    """A chat template family and its translation into Ollama's Go template language."""

    name: str
    go_template: str
    stop: tuple[str, ...]
    generic: bool = False  # the Jinja template was not recognised (or there was none)


def detect_template_family(
    chat_template: str | None, *, eos_token: str | None = None
) -> TemplateFamily:
    """The family of a Jinja chat template, with the Go template that renders the same prompts.

    `eos_token` is the tokenizer's end-of-sequence string: Mistral ends an assistant turn with it.
    """
    layout = _layout_for(chat_template)
    eos = eos_token or layout.default_eos
    layout = dataclasses.replace(
        layout,
        assistant=(layout.assistant[0], layout.assistant[1].replace(_EOS, eos)),
        stop=tuple(dict.fromkeys(t for t in (s.replace(_EOS, eos) for s in layout.stop) if t)),
    )
    system_turn: SystemTurn | None = None
    if layout.system is not None:
        system_turn = _system_turn_of(chat_template, layout, eos) or (*layout.system, "")
    return TemplateFamily(
        name=layout.name,
        go_template=_go_template(layout, system_turn),
        stop=layout.stop,
        generic=layout.name == _GENERIC.name,
    )


def _layout_for(chat_template: str | None) -> _Layout:
    if chat_template:
        for layout in _LAYOUTS:
            if all(marker in chat_template for marker in layout.markers):
                return layout
    return _GENERIC


SystemTurn = tuple[str, str, str]  # prefix, suffix, and what is written when there is no system


def _system_turn_of(chat_template: str | None, layout: _Layout, eos: str) -> SystemTurn | None:
    """(prefix, suffix, default) of the system turn as the Jinja template itself writes it.

    The default is what the template writes before the first user turn when the chat has no
    system prompt ("" for most). None when the template cannot be rendered or writes the system
    prompt anywhere but right before the first user turn: the family's own layout is used then.
    """
    if not chat_template:
        return None
    first_user_turn = layout.user[0] + _PROBE_USER
    user = {"role": "user", "content": _PROBE_USER}
    with_system = _render_jinja(
        chat_template, [{"role": "system", "content": _PROBE_SYSTEM}, user], eos
    )
    without_system = _render_jinja(chat_template, [user], eos)
    if with_system is None or without_system is None:
        return None
    before_user, found, _ = with_system.partition(first_user_turn)
    default, found_without, _ = without_system.partition(first_user_turn)
    if not (found and found_without) or before_user.count(_PROBE_SYSTEM) != 1:
        return None
    prefix, _, suffix = before_user.partition(_PROBE_SYSTEM)
    return prefix, suffix, default


def _render_jinja(chat_template: str, messages: list[dict[str, str]], eos: str) -> str | None:
    """The prompt the Jinja template makes of `messages`, rendered as transformers renders it.

    Same sandbox and helpers as transformers' apply_chat_template; BOS is left out (llama.cpp adds
    it itself). None when the template fails: it may reject a probe chat, or use a tag only
    transformers defines (`{% generation %}`).
    """

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: object,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    # Llama 3.2 dates its system turn with this; the export date is the closest to training's.
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos
        )
    except Exception:  # a template is foreign code: any failure just means "no answer"
        return None


_USER_TURN_TAKING_SYSTEM = {
    # Index 0, or 1 behind the system entry that current Ollama keeps in .Messages.
    "first": "(le $i 1)",
    "last": "(eq (len (slice $.Messages $i)) 1)",
}


def _go_template(layout: _Layout, system_turn: SystemTurn | None) -> str:
    """Ollama's Go template for `layout`: the system turn, every message, the generation prompt."""
    parts: list[str] = []
    if system_turn is not None:
        prefix, suffix, default = system_turn
        parts.append("{{ if .System }}" + _text(prefix) + "{{ .System }}" + _text(suffix))
        if default:
            parts.append("{{ else }}" + _text(default))
        parts.append("{{ end }}")
    system_in_user = ""
    if layout.system_in_user:
        condition = _USER_TURN_TAKING_SYSTEM[layout.system_in_user]
        system_in_user = (
            f"{{{{ if and $.System {condition} }}}}{{{{ $.System }}}}"
            f"{_text(layout.system_separator)}{{{{ end }}}}"
        )
    user_prefix, user_suffix = layout.user
    assistant_prefix, assistant_suffix = layout.assistant
    parts.append("{{ range $i, $_ := .Messages }}" if system_in_user else "{{ range .Messages }}")
    parts.append(
        '{{ if eq .Role "user" }}'
        + _text(user_prefix)
        + system_in_user
        + "{{ .Content }}"
        + _text(user_suffix)
        + '{{ else if eq .Role "assistant" }}'
        + _text(assistant_prefix)
        + "{{ .Content }}"
        + _text(assistant_suffix)
        + "{{ end }}{{ end }}"
    )
    parts.append(_text(layout.generation_prompt))
    return "".join(parts)


def _text(literal: str) -> str:
    """`literal` as Go template text: as is, or a string constant if it would open an action."""
    if "{{" not in literal:
        return literal
    # A JSON string without ASCII escaping is a valid Go string literal.
    return "{{ " + json.dumps(literal, ensure_ascii=False) + " }}"


def ollama_parameters(family: TemplateFamily, num_ctx: int) -> dict[str, object]:
    """The model parameters Ollama stores with the model: the Modelfile and the API send these."""
    if num_ctx <= 0:
        raise ConfigError(f"num_ctx must be a positive number of tokens, not {num_ctx}.")
    return {"stop": list(family.stop), "num_ctx": num_ctx}


def render_modelfile(
    gguf_name: str,
    chat_template: str | None,
    *,
    num_ctx: int = 4096,
    system: str | None = None,
    eos_token: str | None = None,
) -> str:
    """The Modelfile text for `gguf_name`, a GGUF file in the same directory as the Modelfile.

    `chat_template` is the Jinja template the model was trained with (tokenizer_config's, or the
    GGUF's `tokenizer.chat_template`); None when the model has none.
    """
    family = detect_template_family(chat_template, eos_token=eos_token)
    lines = [f"# Ollama Modelfile for {gguf_name}, written by Backpropagate."]
    if family.generic:
        lines += [
            "# Chat template: generic. The model's chat template was not recognised (or it has",
            "# none), so this TEMPLATE is a plain User/Assistant layout, not the one the model was",
            "# trained with: replace it with the Go equivalent of its Jinja chat template.",
        ]
    else:
        lines.append(f"# Chat template: {family.name}, translated from the model's Jinja template.")
    lines += [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(family.go_template, 'template')}"]
    for key, value in ollama_parameters(family, num_ctx).items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_parameter_value(item)}")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    return "\n".join(lines) + "\n"


def _parameter_value(value: object) -> str:
    # Ollama reads a quoted value verbatim (no escapes), so a stop token must not hold a quote.
    if isinstance(value, str):
        if '"' in value:
            raise ConfigError(
                f"The stop token {value!r} contains a double quote, which a Modelfile cannot hold.",
                hint="Register the model with Ollama's API instead: it takes stop tokens as JSON.",
            )
        return f'"{value}"'
    return str(value)


def _quoted(value: str, what: str) -> str:
    # A Modelfile value in triple quotes runs to the next triple quote; it has no escapes.
    if '"""' in value:
        raise ConfigError(
            f'The {what} contains """, which cannot be written into a Modelfile.',
            hint='Remove the triple double quote (""") from it.',
        )
    return f'"""{value}"""'


def write_modelfile(path: Path, text: str) -> Path:
    """Write the Modelfile atomically: Ollama never reads a half-written one."""
    with staged(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return path
