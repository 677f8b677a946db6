"""docs/reference/cli.md: every command, argument and option of `backprop`, from the Typer app
as `--help` shows it (hidden aliases listed with the command they stand for)."""

from __future__ import annotations

from typing import Any

import typer.main

from backpropagate.reference.markdown import cell, generated_header, table


def _arguments(command: Any, context: Any) -> str:
    rows = [
        (
            f"`{param.name.upper()}`",
            "yes" if param.required else f"no (default `{param.default}`)",
            param.help or "",
        )
        for param in command.params
        if param.param_type_name == "argument"
    ]
    return table(["argument", "required", "what"], rows) if rows else ""


def _options(command: Any, context: Any) -> str:
    rows = []
    for param in command.params:
        if param.param_type_name != "option" or param.hidden:
            continue
        record = param.get_help_record(context)
        if record is not None:
            rows.append((f"`{record[0]}`", record[1]))
    return table(["option", "what"], rows) if rows else ""


def _section(command: Any, context: Any, aliases: dict[str, list[str]]) -> list[str]:
    """The command's section, then its subcommands' (a group's own options first)."""
    path = context.command_path
    usage = " ".join(command.collect_usage_pieces(context))
    text = f"## `{path}`\n\n{cell(command.help or '')}\n\n```\n{path} {usage}\n```\n\n"
    if path in aliases:
        text += f"Also: {', '.join(f'`{alias}`' for alias in sorted(aliases[path]))}.\n\n"
    text += _arguments(command, context) + "\n" + _options(command, context)
    sections = [text.rstrip() + "\n"]
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            sub_context = sub.context_class(sub, info_name=name, parent=context)
            sections += _section(sub, sub_context, aliases)
    return sections


def _function(command: Any) -> Any:
    """The function a command runs (Typer wraps it once per command it is registered as)."""
    return getattr(command.callback, "__wrapped__", command.callback)


def _aliases(root: Any) -> dict[str, list[str]]:
    """Hidden top-level commands that run a visible one (`list-runs` is `runs list`), by the
    visible command's path."""
    visible = {}
    for name, command in root.commands.items():
        for sub_name, sub in getattr(command, "commands", {}).items():
            visible[_function(sub)] = f"backprop {name} {sub_name}"
    aliases: dict[str, list[str]] = {}
    for name, command in root.commands.items():
        if command.hidden and _function(command) in visible:
            aliases.setdefault(visible[_function(command)], []).append(f"backprop {name}")
    return aliases


def cli_page() -> str:
    from backpropagate.cli import app

    root = typer.main.get_command(app)
    context = root.context_class(root, info_name="backprop")
    sections = _section(root, context, _aliases(root))
    return generated_header("CLI reference", "the Typer app, cli/backpropagate") + "\n".join(
        sections
    )
