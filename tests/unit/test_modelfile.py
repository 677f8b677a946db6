"""The Modelfile's Go template must make the prompt the model was trained on, token for token.

Each family's Go template runs through a small interpreter of exactly the Go template constructs
modelfile.py emits, fed the way Ollama feeds it (template/template.go: the system prompts joined
into .System, consecutive messages of one role merged; current releases keep the system entries in
.Messages, older ones dropped them), and is compared with the model's own Jinja template rendered
the way transformers renders it. The Jinja templates are the models' tokenizer_config.json ones;
SmolLM2's comes from the real tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backpropagate_api.errors import ConfigError
from backpropagate_services.export.modelfile import (
    detect_template_family,
    render_modelfile,
    write_modelfile,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# -- the models' chat templates, as their tokenizer_config.json holds them -----------------------

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    r"'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501  (copied verbatim)

# Qwen/Qwen2.5-7B-Instruct
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501  (copied verbatim)

# mistralai/Mistral-7B-Instruct-v0.3
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501  (copied verbatim)

# microsoft/Phi-3-mini-4k-instruct
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    r"{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    r"{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    r"{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/phi-4
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# google/gemma-3-4b-it
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# google/gemma-2-2b-it: no system role at all
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}"
    r"{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

WITH_SYSTEM = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?\nJust the city, please."},
]
WITHOUT_SYSTEM = WITH_SYSTEM[1:]
CHATS = {"with-system": WITH_SYSTEM, "without-system": WITHOUT_SYSTEM}

# id: (Jinja template, bos_token, eos_token, expected family)
MODELS = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "qwen2.5": (QWEN25, "", "<|im_end|>", "chatml"),
    "mistral-v0.3": (MISTRAL_V03, "<s>", "</s>", "mistral"),
    "phi3": (PHI3, "<s>", "<|endoftext|>", "phi3"),
    "phi4": (PHI4, "<|endoftext|>", "<|im_end|>", "phi4"),
    "gemma3": (GEMMA3, "<bos>", "<eos>", "gemma"),
}


def jinja_prompt(template: str, chat: list[dict[str, str]], bos: str, eos: str) -> str:
    """The prompt as transformers' apply_chat_template renders it, less the BOS llama.cpp adds."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    prompt = environment.from_string(template).render(
        messages=chat, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )
    return without_template_bos(prompt, template, bos)


def without_template_bos(prompt: str, template: str, bos: str) -> str:
    """The prompt less the BOS its template writes: llama.cpp (so Ollama) adds that one itself.

    Only a BOS the template writes: SmolLM2's BOS is <|im_start|>, which every turn begins with.
    """
    return prompt.removeprefix(bos) if bos and "bos_token" in template else prompt


def ollama_template_data(chat: list[dict[str, str]], *, system_in_messages: bool) -> dict[str, Any]:
    """What Ollama hands a messages template (template/template.go, Execute and collate)."""
    messages: list[dict[str, str]] = []
    for message in chat:
        if message["role"] == "system" and not system_in_messages:
            continue
        if messages and messages[-1]["Role"] == message["role"]:
            messages[-1]["Content"] += "\n\n" + message["content"]
        else:
            messages.append({"Role": message["role"], "Content": message["content"]})
    system = "\n\n".join(m["content"] for m in chat if m["role"] == "system")
    return {"System": system, "Messages": messages}


# -- a Go text/template interpreter for exactly the constructs modelfile.py emits ----------------

# An action runs to the first "}}" outside a string constant, as in Go's lexer.
_ACTION = re.compile(r'\{\{((?:"(?:[^"\\]|\\.)*"|[^"}]|\}(?!\}))*)\}\}')
_TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$?\.?[A-Za-z_][A-Za-z0-9_.]*|\$')


class GoTemplateError(Exception):
    """The template uses something this interpreter does not implement."""


def go_render(template: str, data: dict[str, Any]) -> str:
    """Execute a Go template: text, `{{ pipeline }}`, if / else if / else / end, range over a list
    (with or without `$i, $_ :=`), fields (`.Role`, `$.System`), variables, string and integer
    constants, parentheses, and the builtins eq, le, and, len and slice, with Go's truth rules.
    Anything else raises, trim markers included, so the emitted templates cannot drift past it."""
    pieces: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(template):
        pieces.append(("text", template[position : match.start()]))
        inner = match.group(1)
        if inner.startswith("-") or inner.endswith("-") or inner != f" {inner.strip()} ":
            raise GoTemplateError(f"unexpected action spacing or trim marker: {{{{{inner}}}}}")
        pieces.append(("action", inner.strip()))
        position = match.end()
    pieces.append(("text", template[position:]))
    if any(kind == "text" and "{{" in value for kind, value in pieces):
        raise GoTemplateError("an action that is never closed")
    nodes, _, stopped_at = _parse(pieces, 0)
    if stopped_at is not None:
        raise GoTemplateError(f"unexpected {{{{ {stopped_at} }}}}")
    output: list[str] = []
    _execute(nodes, dot=data, root=data, variables={}, output=output)
    return "".join(output)


def _parse(pieces: list[tuple[str, str]], index: int) -> tuple[list[Any], int, str | None]:
    """Nodes up to an `end` / `else` / `else if` action (returned) or the end of the template."""
    nodes: list[Any] = []
    while index < len(pieces):
        kind, value = pieces[index]
        index += 1
        if kind == "text":
            if value:
                nodes.append(("text", value))
        elif value == "end" or value == "else" or value.startswith("else if "):
            return nodes, index, value
        elif value.startswith("if "):
            branches = []
            condition: str | None = value.removeprefix("if ")
            while True:
                body, index, stopped_at = _parse(pieces, index)
                branches.append((condition, body))
                if stopped_at == "end":
                    break
                if stopped_at == "else":
                    condition = None
                elif stopped_at is not None and stopped_at.startswith("else if "):
                    condition = stopped_at.removeprefix("else if ")
                else:
                    raise GoTemplateError("unterminated if")
            nodes.append(("if", branches))
        elif value.startswith("range "):
            header = value.removeprefix("range ")
            names: list[str] = []
            if ":=" in header:
                declared, header = header.split(":=")
                names = [name.strip() for name in declared.split(",")]
            body, index, stopped_at = _parse(pieces, index)
            if stopped_at != "end":
                raise GoTemplateError("range without end (or with an else)")
            nodes.append(("range", names, header.strip(), body))
        else:
            nodes.append(("print", value))
    return nodes, index, None


def _execute(
    nodes: list[Any], *, dot: Any, root: Any, variables: dict[str, Any], output: list[str]
) -> None:
    for node in nodes:
        if node[0] == "text":
            output.append(node[1])
        elif node[0] == "print":
            value = _evaluate(node[1], dot, root, variables)
            output.append(str(value).lower() if isinstance(value, bool) else str(value))
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition is None or _truth(_evaluate(condition, dot, root, variables)):
                    _execute(body, dot=dot, root=root, variables=variables, output=output)
                    break
        else:
            _, names, expression, body = node
            items = _evaluate(expression, dot, root, variables)
            if not isinstance(items, list):
                raise GoTemplateError(f"range over {type(items).__name__}")
            for position, item in enumerate(items):
                scope = dict(variables)
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = position, item
                elif names:
                    raise GoTemplateError(f"range declares {names}")
                _execute(body, dot=item, root=root, variables=scope, output=output)


def _truth(value: Any) -> bool:
    # Go: false, 0, nil and empty strings, slices and maps are false.
    return bool(value)


def _go_and(*values: Any) -> Any:
    for value in values:
        if not _truth(value):
            return value
    return values[-1]


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "eq": lambda a, b: a == b,
    "le": lambda a, b: a <= b,
    "and": _go_and,
    "len": len,
    "slice": lambda items, start: items[start:],
}


def _evaluate(expression: str, dot: Any, root: Any, variables: dict[str, Any]) -> Any:
    tokens: list[str] = []
    position = 0
    while position < len(expression):
        if expression[position] == " ":
            position += 1
            continue
        match = _TOKEN.match(expression, position)
        if match is None:
            raise GoTemplateError(f"cannot read {expression[position:]!r}")
        tokens.append(match.group())
        position = match.end()
    value, rest = _command(tokens, dot, root, variables)
    if rest:
        raise GoTemplateError(f"trailing {rest} in {expression!r}")
    return value


Parsed = tuple[Any, list[str]]  # a value and the tokens after it


def _command(tokens: list[str], dot: Any, root: Any, variables: dict[str, Any]) -> Parsed:
    """A command: a function applied to operands, or one operand; stops at ')'."""
    if tokens[0] in _FUNCTIONS:
        name, tokens = tokens[0], tokens[1:]
        arguments = []
        while tokens and tokens[0] != ")":
            argument, tokens = _operand(tokens, dot, root, variables)
            arguments.append(argument)
        return _FUNCTIONS[name](*arguments), tokens
    return _operand(tokens, dot, root, variables)


def _operand(tokens: list[str], dot: Any, root: Any, variables: dict[str, Any]) -> Parsed:
    token, tokens = tokens[0], tokens[1:]
    if token == "(":
        value, tokens = _command(tokens, dot, root, variables)
        if not tokens or tokens[0] != ")":
            raise GoTemplateError("unbalanced parentheses")
        return value, tokens[1:]
    if token.startswith('"'):
        return json.loads(token), tokens
    if re.fullmatch(r"-?\d+", token):
        return int(token), tokens
    if token.startswith("$."):
        return _fields(root, token[2:]), tokens
    if token.startswith("$"):
        if token not in variables:
            raise GoTemplateError(f"undefined variable {token}")
        return variables[token], tokens
    if token.startswith("."):
        return _fields(dot, token[1:]), tokens
    raise GoTemplateError(f"unknown function or operand {token!r}")


def _fields(value: Any, path: str) -> Any:
    for name in path.split("."):
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"no field {name!r}")  # Go fails on a missing struct field
        value = value[name]
    return value


# -- the specifications ------------------------------------------------------------------------

OLLAMA_RELEASES = {"current-ollama": True, "older-ollama": False}


@pytest.mark.parametrize("system_in_messages", OLLAMA_RELEASES.values(), ids=OLLAMA_RELEASES)
@pytest.mark.parametrize("chat_id", CHATS)
@pytest.mark.parametrize("model", MODELS)
def test_go_template_renders_the_same_prompt_as_the_models_jinja_template(
    model: str, chat_id: str, system_in_messages: bool
) -> None:
    template, bos, eos, family_name = MODELS[model]
    chat = CHATS[chat_id]

    family = detect_template_family(template, eos_token=eos)
    ollama_prompt = go_render(
        family.go_template, ollama_template_data(chat, system_in_messages=system_in_messages)
    )

    assert family.name == family_name
    assert not family.generic
    assert ollama_prompt == jinja_prompt(template, chat, bos, eos)


@pytest.mark.parametrize("system_in_messages", OLLAMA_RELEASES.values(), ids=OLLAMA_RELEASES)
@pytest.mark.parametrize("chat_id", CHATS)
def test_smollm2_go_template_renders_the_same_prompt_as_its_tokenizer(
    smollm2_tokenizer: PreTrainedTokenizerBase, chat_id: str, system_in_messages: bool
) -> None:
    chat = CHATS[chat_id]
    tokenizer_prompt = str(
        smollm2_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )

    family = detect_template_family(
        str(smollm2_tokenizer.chat_template), eos_token=smollm2_tokenizer.eos_token
    )
    ollama_prompt = go_render(
        family.go_template, ollama_template_data(chat, system_in_messages=system_in_messages)
    )

    assert family.name == "chatml"
    assert ollama_prompt == without_template_bos(
        tokenizer_prompt, str(smollm2_tokenizer.chat_template), smollm2_tokenizer.bos_token or ""
    )


@pytest.mark.parametrize("system_in_messages", OLLAMA_RELEASES.values(), ids=OLLAMA_RELEASES)
def test_gemma2_go_template_renders_the_same_prompt_for_a_chat_without_system_role(
    system_in_messages: bool,
) -> None:
    family = detect_template_family(GEMMA2, eos_token="<eos>")

    ollama_prompt = go_render(
        family.go_template,
        ollama_template_data(WITHOUT_SYSTEM, system_in_messages=system_in_messages),
    )

    assert ollama_prompt == jinja_prompt(GEMMA2, WITHOUT_SYSTEM, "<bos>", "<eos>")


def test_default_system_prompts_and_preambles_are_read_off_the_jinja_template() -> None:
    qwen = detect_template_family(QWEN25).go_template
    llama31 = detect_template_family(LLAMA31).go_template

    assert "{{ else }}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud." in qwen
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ .System }}" in (
        llama31
    )


def test_stop_tokens_are_the_families_end_of_turn_tokens() -> None:
    assert detect_template_family(QWEN25).stop == ("<|im_start|>", "<|im_end|>")
    assert detect_template_family(LLAMA3).stop == (
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    )
    assert detect_template_family(MISTRAL_V03, eos_token="</s>").stop == (
        "[INST]",
        "[/INST]",
        "</s>",
    )
    assert detect_template_family(PHI4).stop == ("<|im_start|>", "<|im_end|>", "<|im_sep|>")
    assert detect_template_family(GEMMA3).stop == ("<start_of_turn>", "<end_of_turn>")


def modelfile_fields(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Commands of a Modelfile (values in triple quotes may span lines) and its PARAMETER lines."""
    fields = {
        name: quoted or plain
        for name, quoted, plain in re.findall(
            r'^(FROM|TEMPLATE|SYSTEM) (?:"""(.*?)"""|(\S+))$', text, re.M | re.S
        )
    }
    parameters = re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M)
    return fields, parameters


def test_modelfile_names_the_gguf_template_stop_tokens_context_and_system_prompt() -> None:
    text = render_modelfile(
        "model-q4_k_m.gguf", LLAMA3, num_ctx=8192, system="Answer like a pirate."
    )

    fields, parameters = modelfile_fields(text)
    assert fields == {
        "FROM": "./model-q4_k_m.gguf",
        "TEMPLATE": detect_template_family(LLAMA3).go_template,
        "SYSTEM": "Answer like a pirate.",
    }
    assert parameters == [
        ("stop", '"<|start_header_id|>"'),
        ("stop", '"<|end_header_id|>"'),
        ("stop", '"<|eot_id|>"'),
        ("num_ctx", "8192"),
    ]
    assert "# Chat template: llama3" in text
    assert "generic" not in text


@pytest.mark.parametrize(
    "chat_template",
    [None, "{% for message in messages %}### {{ message['role'] }}: {{ message['content'] }}\n"],
    ids=["no-template", "unknown-template"],
)
def test_unrecognised_template_gets_a_generic_layout_and_the_modelfile_says_so(
    chat_template: str | None,
) -> None:
    family = detect_template_family(chat_template)
    text = render_modelfile("model.gguf", chat_template)

    assert family.generic
    assert family.name == "generic"
    assert "# Chat template: generic. The model's chat template was not recognised" in text
    assert go_render(family.go_template, ollama_template_data(WITH_SYSTEM, system_in_messages=True))
    assert "SYSTEM" not in text


def test_default_system_prompt_with_template_braces_stays_literal_text() -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}"
        r"{{ '<|im_start|>system\nReply in {{ braces }}.<|im_end|>\n' }}{% endif %}"
        r"{% for m in messages %}"
        r"{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    family = detect_template_family(template)

    ollama_prompt = go_render(
        family.go_template, ollama_template_data(WITHOUT_SYSTEM, system_in_messages=True)
    )

    assert ollama_prompt == jinja_prompt(template, WITHOUT_SYSTEM, "", "")
    assert "Reply in {{ braces }}." in ollama_prompt


def test_system_prompt_with_triple_quotes_is_rejected_with_a_hint() -> None:
    with pytest.raises(ConfigError) as caught:
        render_modelfile("model.gguf", LLAMA3, system='Say """hello""".')

    assert caught.value.code == "INPUT_CONFIG_INVALID"
    assert '"""' in caught.value.hint


def test_context_length_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        render_modelfile("model.gguf", LLAMA3, num_ctx=0)


def test_write_modelfile_leaves_the_finished_file_and_nothing_half_written(tmp_path: Path) -> None:
    target = tmp_path / "Modelfile"
    target.write_text("an older Modelfile\n")
    text = render_modelfile("model.gguf", QWEN25)

    written = write_modelfile(target, text)

    assert written == target
    assert target.read_text(encoding="utf-8") == text
    assert [path.name for path in tmp_path.iterdir()] == ["Modelfile"]


def test_go_interpreter_refuses_constructs_it_does_not_implement() -> None:
    with pytest.raises(GoTemplateError):
        go_render("{{- .System }}", {"System": "x"})
    with pytest.raises(GoTemplateError):
        go_render("{{ printf .System }}", {"System": "x"})
    with pytest.raises(GoTemplateError):
        go_render("{{ range .Messages }}{{ .Missing }}{{ end }}", {"Messages": [{"Role": "u"}]})
    with pytest.raises(GoTemplateError):
        go_render("{{ .System ", {"System": "x"})
