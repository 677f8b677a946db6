"""Detect a dataset's format, validate every row, normalise to OpenAI-style messages.

Accepted JSONL row shapes (one format per file):
- ShareGPT: {"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}
- OpenAI messages: {"messages": [{"role": "user" | "assistant" | "system", "content": "..."}]},
  a content also as a list of text parts [{"type": "text", "text": "..."}], stored joined
- Alpaca: {"instruction": "...", "input": "..." (optional), "output": "...", "system": "..."
  (optional)}
- ChatML text: {"text": "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|>"}
- Plain text: {"text": "..."} with no ChatML turns (or a .txt file's line), one document trained
  as completion: every token is learnt, not only an assistant's
- Preference pairs (dpo, orpo, simpo, kto): {"prompt": P, "chosen": A, "rejected": A}
- Labelled answers (kto): {"prompt": P, "completion": A, "label": true | false}
where P is a string (one user message) or a list of messages ending with a user turn, and A a
string (one assistant message) or a list of assistant messages. Chat rows become a list of
messages, preference rows the same keys with every value a list of messages (`PreferenceRow`).

Every problem is reported with the file, the 1-based line and the field, because a user fixing a
10,000-line file needs to know exactly where to look.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from backpropagate_api.errors import (
    DatasetEmptyError,
    DatasetFormatUnknownError,
    DatasetParseError,
    DatasetSchemaError,
    DatasetValidationError,
    UserError,
    quoted,
)
from backpropagate_api.uploads import listed
from backpropagate_services.common.datasets import (
    PAIRED_FORMAT,
    PREFERENCE_FORMATS,
    TEXT_FORMAT,
    UNPAIRED_FORMAT,
    Conversation,
    LeftOut,
    PreferenceRow,
    RowRejection,
)
from backpropagate_services.dataprep.records import Record

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"system", "user", "assistant"}
FORMATS = ("sharegpt", "openai", "alpaca", "chatml", TEXT_FORMAT, *PREFERENCE_FORMATS)
CHATML_TURN = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>", re.DOTALL)
# A JSON escape of half a surrogate pair: a row with one is checked for a half left alone.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_FIELD_PATH = 100  # characters of a field's path an error names


@dataclass(frozen=True)
class ParsedDataset:
    format: str
    kept: int  # rows that are examples
    rows_read: int  # non-blank lines
    invalid: LeftOut  # rows left out (not strict): how many, and the first of them
    rows: list[dict[str, Any]] = field(default_factory=list)  # as stored, unless `keep` took them

    @property
    def rejected(self) -> list[RowRejection]:
        """The first rows left out, in file order."""
        return self.invalid.examples

    @property
    def rows_rejected(self) -> int:
        return self.invalid.count

    @property
    def conversations(self) -> list[Conversation]:
        """A chat file's examples ([] for preference data and plain text)."""
        return [row["messages"] for row in self.rows if "messages" in row]

    @property
    def preference_rows(self) -> list[PreferenceRow]:
        """A preference file's examples ([] for chat data)."""
        return self.rows if self.format in PREFERENCE_PARSERS else []


@dataclass(frozen=True)
class _Row:
    filename: str
    line: int
    value: dict[str, Any]
    hint: str | None = None  # what the row's format looks like; None: the chat formats

    def fail(self, field: str, problem: str) -> DatasetSchemaError:
        return DatasetSchemaError(
            f"{self.filename} line {self.line}: field '{field}' {problem}",
            hint=self.hint,
            filename=self.filename,
            line=self.line,
            field=field,
        )

    def text(self, container: dict[str, Any], key: str, field: str, required: bool = True) -> str:
        if key not in container:
            if required:
                raise self.fail(field, "is missing")
            return ""
        value = container[key]
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, not {type(value).__name__}")
        if required and not value.strip():
            raise self.fail(field, "is empty")
        return value


def detect_format(row: dict[str, Any]) -> str | None:
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if isinstance(row.get("text"), str):
        return "chatml" if "<|im_start|>" in row["text"] else TEXT_FORMAT
    # One key is enough to tell, so a missing other one is reported as that row's error. A
    # prompt and completion without a label are no format of ours (prompt-completion SFT).
    if "chosen" in row or "rejected" in row:
        return PAIRED_FORMAT
    if "label" in row:
        return UNPAIRED_FORMAT
    return None


def _turns(row: _Row, key: str) -> list[Any]:
    turns = row.value.get(key)
    if not isinstance(turns, list) or not turns:
        raise row.fail(key, "must be a non-empty list of turns")
    return turns


def _checked_order(
    row: _Row, field: str, conversation: Conversation, turn_field: Callable[[int], str]
) -> Conversation:
    """A conversation a chat template renders and a model learns from: an assistant turn, each
    answering a user turn, speakers taking turns, a system turn only first. Two user turns in a
    row mostly mean a lost reply; many templates (Llama 2, Mistral, Gemma) refuse them, and one
    such row would stop the whole run at training time. `turn_field(i)`: where turn i is."""
    if not any(message["role"] == "assistant" for message in conversation):
        raise row.fail(field, "has no assistant turn, so there is nothing to learn from")
    previous = None
    for index, message in enumerate(conversation):
        role, where = message["role"], turn_field(index)
        turn = f" (turn {index + 1})" if where == field else ""  # a field that holds every turn
        if role == "system" and index > 0:
            raise row.fail(where, f"is a system turn after the first{turn}: move it first")
        if role == "assistant" and previous in (None, "system"):
            raise row.fail(where, f"is an assistant turn that answers no user turn{turn}")
        if role == previous and role != "system":
            missing = "a reply" if role == "user" else "a user turn"
            raise row.fail(
                where, f"is a second {role} turn in a row{turn} ({missing} missing before it)"
            )
        previous = role
    return conversation


@dataclass(frozen=True)
class _TurnFormat:
    """Where a turn-list format keeps its turns, who speaks, and what is said."""

    turns_key: str
    speaker_key: str
    text_key: str
    roles: dict[str, str]  # the format's speaker names -> our roles
    speaker_noun: str  # "speaker" or "role", as users of the format call it
    parts: bool = False  # the text may also be a list of OpenAI content parts


SHAREGPT = _TurnFormat("conversations", "from", "value", SHAREGPT_ROLES, "speaker")
OPENAI = _TurnFormat(
    "messages", "role", "content", {r: r for r in OPENAI_ROLES}, "role", parts=True
)


def _parse_turns(row: _Row, spec: _TurnFormat) -> Conversation:
    return _checked_order(
        row,
        spec.turns_key,
        _parse_messages(row, spec),
        lambda index: f"{spec.turns_key}[{index}].{spec.speaker_key}",
    )


def _parse_messages(row: _Row, spec: _TurnFormat) -> Conversation:
    conversation = []
    for index, turn in enumerate(_turns(row, spec.turns_key)):
        field = f"{spec.turns_key}[{index}]"
        if not isinstance(turn, dict):
            raise row.fail(
                field, f"must be an object with '{spec.speaker_key}' and '{spec.text_key}'"
            )
        speaker = row.text(turn, spec.speaker_key, f"{field}.{spec.speaker_key}")
        if speaker not in spec.roles:
            raise row.fail(
                f"{field}.{spec.speaker_key}",
                f"has unknown {spec.speaker_noun} {quoted(speaker)} "
                f"(use one of {sorted(spec.roles)})",
            )
        where = f"{field}.{spec.text_key}"
        if spec.parts and not isinstance(turn.get(spec.text_key, ""), str):
            content = _content_parts(row, turn[spec.text_key], where)
        else:
            content = row.text(turn, spec.text_key, where)
        conversation.append({"role": spec.roles[speaker], "content": content})
    return conversation


def _content_parts(row: _Row, parts: Any, field: str) -> str:
    """An OpenAI content given as parts, as the text it trains on: its text parts joined by
    newlines, as llama.cpp's server and vLLM join them for a template that takes strings. Any
    other part (an image, audio) is refused by its type: a text model learns nothing from it."""
    if not isinstance(parts, list) or not parts:
        found = "an empty list" if isinstance(parts, list) else type(parts).__name__
        raise row.fail(field, f"must be a string or a non-empty list of content parts, not {found}")
    texts = []
    for index, part in enumerate(parts):
        where = f"{field}[{index}]"
        if not isinstance(part, dict):
            raise row.fail(where, 'must be an object {"type": "text", "text": ...}')
        kind = row.text(part, "type", f"{where}.type")
        if kind != "text":
            raise row.fail(f"{where}.type", f"is {quoted(kind)}: only text parts train")
        texts.append(row.text(part, "text", f"{where}.text"))
    return "\n".join(texts)


def _parse_alpaca(row: _Row) -> Conversation:
    instruction = row.text(row.value, "instruction", "instruction")
    extra_input = row.text(row.value, "input", "input", required=False)
    output = row.text(row.value, "output", "output")
    system = row.text(row.value, "system", "system", required=False)
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return ([{"role": "system", "content": system}] if system.strip() else []) + turns


def _parse_chatml(row: _Row) -> Conversation:
    """ChatML turns, as Qwen's and SmolLM's templates write them; nothing but whitespace may
    sit between or around them."""
    text = row.text(row.value, "text", "text")
    if CHATML_TURN.sub("", text).strip():
        raise row.fail(
            "text", "has text outside <|im_start|>role ... <|im_end|> turns (an unclosed turn?)"
        )
    conversation = []
    for index, (role, content) in enumerate(CHATML_TURN.findall(text)):
        if role.strip() not in OPENAI_ROLES:
            raise row.fail(
                "text",
                f"turn {index + 1} has unknown role {quoted(role.strip())} "
                f"(use one of {sorted(OPENAI_ROLES)})",
            )
        conversation.append({"role": role.strip(), "content": content})
    return _checked_order(row, "text", conversation, lambda _index: "text")


def _messages_or_text(row: _Row, key: str, roles: set[str], text_role: str) -> Conversation:
    """`key` as messages: a string is one message of `text_role`, a list is OpenAI-style turns
    whose roles are in `roles`."""
    if key not in row.value:
        raise row.fail(key, "is missing")
    if isinstance(row.value[key], str):
        return [{"role": text_role, "content": row.text(row.value, key, key)}]
    if not isinstance(row.value[key], list):
        raise row.fail(key, "must be a string or a non-empty list of messages")
    spec = _TurnFormat(key, "role", "content", {r: r for r in roles}, "role", parts=True)
    return _parse_messages(row, spec)


def _prompt(row: _Row) -> Conversation:
    prompt = _messages_or_text(row, "prompt", OPENAI_ROLES, "user")
    if prompt[-1]["role"] != "user":
        raise row.fail(
            f"prompt[{len(prompt) - 1}].role", "must be 'user': the answers reply to the last turn"
        )
    return prompt


def _answer(row: _Row, key: str) -> Conversation:
    return _messages_or_text(row, key, {"assistant"}, "assistant")


def _parse_pair(row: _Row) -> PreferenceRow:
    prompt, chosen, rejected = _prompt(row), _answer(row, "chosen"), _answer(row, "rejected")
    if chosen == rejected:
        raise row.fail("rejected", "is the same as 'chosen', so there is no preference to learn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _parse_labelled(row: _Row) -> PreferenceRow:
    prompt, completion = _prompt(row), _answer(row, "completion")
    if "label" not in row.value:
        raise row.fail("label", "is missing")
    label = row.value["label"]
    if not isinstance(label, bool):
        raise row.fail("label", f"must be true or false, not {type(label).__name__}")
    return {"prompt": prompt, "completion": completion, "label": label}


PARSERS: dict[str, Callable[[_Row], Conversation]] = {
    "sharegpt": partial(_parse_turns, spec=SHAREGPT),
    "openai": partial(_parse_turns, spec=OPENAI),
    "alpaca": _parse_alpaca,
    "chatml": _parse_chatml,
}
PREFERENCE_PARSERS: dict[str, Callable[[_Row], PreferenceRow]] = {
    PAIRED_FORMAT: _parse_pair,
    UNPAIRED_FORMAT: _parse_labelled,
}
_TEXTS = (
    "a prompt is a string or a list of messages ending with a user turn, an answer a string or "
    "a list of assistant messages"
)
PREFERENCE_HINTS = {
    PAIRED_FORMAT: f'Every row is {{"prompt", "chosen", "rejected"}}: {_TEXTS}.',
    UNPAIRED_FORMAT: f'Every row is {{"prompt", "completion", "label": true | false}}: {_TEXTS}.',
}


def _row(record: Record, filename: str, number: int) -> _Row:
    if isinstance(record, DatasetParseError):
        raise record
    if isinstance(record, dict):
        return _Row(filename, number, record)
    text = record
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetParseError(
            f"{filename} line {number}: invalid JSON ({exc.msg} at column {exc.colno})",
            filename=filename,
            line=number,
        ) from exc
    except RecursionError as exc:  # no chat row nests anywhere near this deep
        raise DatasetParseError(
            f"{filename} line {number}: JSON nested too deeply to be a dataset row",
            filename=filename,
            line=number,
        ) from exc
    if not isinstance(value, dict):
        raise DatasetParseError(
            f"{filename} line {number}: a row must be a JSON object, not {type(value).__name__}",
            filename=filename,
            line=number,
        )
    if SURROGATE_ESCAPE.search(text) and (found := _lone_surrogate(value)):
        raise _not_unicode(filename, number, *found)
    return _Row(filename, number, value)


def _not_unicode(filename: str, line: int, field: str, problem: str) -> DatasetParseError:
    if len(field) > MAX_FIELD_PATH:  # keys are the file's: a path may be as long as its row
        field = f"{field[:MAX_FIELD_PATH]}..."
    return DatasetParseError(
        f"{filename} line {line}: field '{field}' is not valid Unicode ({problem})",
        hint="A JSON escape of half a surrogate pair (\\ud800 to \\udfff) must be followed by "
        "its other half: export the file again as UTF-8 text.",
        filename=filename,
        line=line,
        field=field,
    )


def _lone_surrogate(value: Any) -> tuple[str, str] | None:
    """(field, what) of the first string, key or text, that holds half a surrogate pair alone:
    valid JSON, but no text that can be stored or sent as UTF-8. Walked with a stack, not by
    recursion: the row may nest as deep as the JSON parser allows."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        field, item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as exc:
                half = ord(item[exc.start])
                return field, f"a lone surrogate \\u{half:04x} at character {exc.start + 1}"
        elif isinstance(item, list):
            pending += reversed([(f"{field}[{index}]", child) for index, child in enumerate(item)])
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                name = key.encode("utf-8", "backslashreplace").decode()
                where = f"{field}.{name}" if field else name
                pending += [(where, child), (where, key)]  # the key first
    return None


class _Parser:
    """One file's rows into one format's examples, each handed to `keep` as stored (see
    common.datasets); `expected` is the format once known."""

    def __init__(
        self, filename: str, expected: str | None, keep: Callable[[dict[str, Any], int], None]
    ) -> None:
        self.filename = filename
        self.expected = expected
        self.keep = keep
        self.kept = 0

    def add(self, row: _Row) -> None:
        found = detect_format(row.value)
        if self.expected is None:
            if found is None:
                raise DatasetFormatUnknownError(
                    f"{self.filename} line {row.line}: cannot tell the format from keys "
                    f"{sorted(row.value)}",
                    filename=self.filename,
                    line=row.line,
                )
            self.expected = found
        elif found != self.expected:
            raise DatasetSchemaError(
                f"{self.filename} line {row.line}: row is {found or 'of no known format'} but "
                f"the file is {self.expected} (keys {sorted(row.value)})",
                filename=self.filename,
                line=row.line,
                field=",".join(sorted(row.value)),
            )
        if self.expected in PREFERENCE_PARSERS:
            hinted = _Row(row.filename, row.line, row.value, PREFERENCE_HINTS[self.expected])
            self.keep(PREFERENCE_PARSERS[self.expected](hinted), row.line)
        elif self.expected == TEXT_FORMAT:
            self.keep({"text": row.text(row.value, "text", "text")}, row.line)
        else:
            self.keep({"messages": PARSERS[self.expected](row)}, row.line)
        self.kept += 1


def parse_jsonl(
    lines: Iterable[str], filename: str, format_hint: str = "auto", *, strict: bool = True
) -> ParsedDataset:
    """Parse and validate a JSON Lines file's decoded lines (encoding.text_lines)."""
    return parse_records(enumerate(lines, start=1), filename, format_hint, strict=strict)


def parse_records(
    records: Iterable[tuple[int, Record]],
    filename: str,
    format_hint: str = "auto",
    *,
    strict: bool = True,
    keep: Callable[[dict[str, Any], int], None] | None = None,
) -> ParsedDataset:
    """Parse and validate a whole file's rows (records.file_records), each at its line.

    strict: the first bad row raises, with its line. Otherwise bad rows are left out and listed
    in `invalid`, up to MAX_REJECTED_FRACTION of the rows read (DatasetValidationError above,
    with the list); a file with no good row at all raises its first row's error.
    keep: called with each example as stored and its line, as it is parsed (the file is never
    held whole); without it the examples are returned in `rows`. Of the rows left out, the
    first KEPT_ROW_EXAMPLES are kept and the rest counted (`invalid`)."""
    expected = None if format_hint in ("", "auto") else format_hint
    if expected is not None and expected not in FORMATS:
        raise DatasetFormatUnknownError(
            f"Unknown dataset format {quoted(format_hint)}; "
            f"use one of {', '.join(FORMATS)} or auto.",
            format=format_hint,
        )
    rows: list[dict[str, Any]] = []
    parser = _Parser(filename, expected, keep or (lambda row, _line: rows.append(row)))
    invalid = LeftOut()
    first_error: UserError | None = None
    rows_read = 0
    for number, record in records:
        if isinstance(record, str) and not record.strip():
            continue
        rows_read += 1
        try:
            parser.add(_row(record, filename, number))
        except (DatasetParseError, DatasetSchemaError, DatasetFormatUnknownError) as error:
            if strict:
                raise
            invalid.add(_rejection(error, number))
            first_error = first_error or error
    if not parser.kept and first_error is not None:
        raise first_error
    if not parser.kept or parser.expected is None:
        raise DatasetEmptyError(f"{filename} has no rows.", filename=filename)
    if invalid.count > MAX_REJECTED_FRACTION * rows_read:
        raise _too_many_rejected(filename, rows_read, invalid)
    return ParsedDataset(parser.expected, parser.kept, rows_read, invalid, rows)


MAX_REJECTED_FRACTION = 0.1


def _rejection(error: UserError, line: int) -> RowRejection:
    reason = error.message.removeprefix(f"{error.context.get('filename', '')} line {line}: ")
    return RowRejection(line, error.code, error.context.get("field", ""), reason)


def _too_many_rejected(filename: str, rows_read: int, invalid: LeftOut) -> DatasetValidationError:
    shown = "".join(f"\n  {line}" for line in listed(invalid.examples, invalid.count))
    return DatasetValidationError(
        f"{filename}: {invalid.count} of {rows_read} rows are invalid, more than "
        f"{MAX_REJECTED_FRACTION:.0%}:{shown}",
        filename=filename,
        rows_read=rows_read,
        rows_rejected=invalid.count,
    )
