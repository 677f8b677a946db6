"""`backprop data`: look at a dataset as the trainer will get it, before training on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backpropagate.render import (
    FormatOption,
    JsonOption,
    LanguagesOption,
    print_dataset,
    print_json,
    print_json_data,
    print_token_stats,
    record_dict,
)
from backpropagate.sdk import Trainer
from backpropagate_api.errors import ConfigError


def column_mapping(text: str) -> dict[str, str]:
    """--columns 'question=instruction,answer=output' as {"question": "instruction", ...}."""
    mapping: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        source, equals, target = pair.partition("=")
        if not (equals and source.strip() and target.strip()):
            raise ConfigError(
                f"--columns takes COLUMN=FIELD pairs, got {pair!r}.",
                hint="e.g. --columns 'question=instruction,answer=output'",
                fields="columns",
            )
        mapping[source.strip()] = target.strip()
    return mapping


def language_codes(text: str) -> list[str]:
    """--language 'en,fr' as ["en", "fr"]."""
    return [code.strip() for code in text.split(",") if code.strip()]


data_app = typer.Typer(help="Check datasets before training on them.", no_args_is_help=True)

SourceArgument = Annotated[
    Path,
    typer.Argument(
        help="A JSONL, CSV, TSV, Parquet or TXT file (gzipped or not), a saved dataset "
        "directory or a Hub id."
    ),
]
ColumnsOption = Annotated[
    str, typer.Option(help="Table columns to rename, e.g. 'question=instruction'.")
]
DedupOption = Annotated[str, typer.Option(help="Also remove duplicates: exact or near.")]


@data_app.command("inspect")
def data_inspect(
    source: SourceArgument,
    data_format: FormatOption = "auto",
    columns: ColumnsOption = "",
    dedup: DedupOption = "",
    languages: LanguagesOption = "",
    model: Annotated[
        str, typer.Option(help="Whose tokenizer and chat template (default: the trainer's).")
    ] = "",
    max_length: Annotated[
        int, typer.Option(help="Tokens a row is cut at, as in train (0: the default).")
    ] = 0,
    method: Annotated[
        str, typer.Option(help="The training method, as in train (preference data: dpo, ...).")
    ] = "",
    as_json: JsonOption = False,
) -> None:
    """Validate a dataset as `train` would: its format, counts, the rows left out and why, the
    duplicates, its token lengths and what max_length cuts, its first example as trained.
    Nothing trains."""
    trainer = Trainer(model, progress=False)
    info = trainer.inspect_data(
        source, data_format, column_mapping(columns), dedup, language_codes(languages)
    )
    tokens = trainer.inspect_tokens(info.dataset_id, max_length=max_length, method=method)
    if as_json:
        # The dataset's record, with its token statistics under "tokens".
        print_json_data({**record_dict(info), "tokens": record_dict(tokens, every_field=True)})
    else:
        print_dataset(info)
        print_token_stats(tokens)


@data_app.command("prepare")
def data_prepare(
    source: SourceArgument,
    data_format: FormatOption = "auto",
    columns: ColumnsOption = "",
    dedup: DedupOption = "",
    languages: LanguagesOption = "",
    strict: Annotated[bool, typer.Option(help="Fail on the first bad row.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Validate, filter and store a dataset as `train` would, and print its record. `train` on
    the same file with the same options then finds it prepared: nothing is sent or parsed
    again."""
    info = Trainer(progress=False).inspect_data(
        source, data_format, column_mapping(columns), dedup, language_codes(languages), strict
    )
    if as_json:
        print_json(info)
    else:
        print_dataset(info)
