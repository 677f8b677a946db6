"""Every command, option and BACKPROPAGATE_* variable the README and the handbook mention exists
in the code, so a reader who copies one gets what the page says, not "No such option".

The `backprop ...` invocations in code blocks and inline code are parsed as a shell would split
them and checked against the Typer app (hidden aliases included); variable names against the
settings and the few names read elsewhere (backpropagate_api.setting_names).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from backpropagate.cli import app
from backpropagate_api.setting_names import known_variables

REPO = Path(__file__).resolve().parents[2]
# The hand-written pages; docs/reference is generated from the code and checked by its own test.
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
INVOCATION = re.compile(r"(?:^|[\s(;&|$])backprop\s+(.*)")
VARIABLE = re.compile(r"BACKPROPAGATE_[A-Z0-9_]*")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>&1"}


def snippets(text: str) -> list[str]:
    """The code of a page: each line of its fenced and indented blocks, and each inline code
    span."""
    blocks = [line for block in FENCE.findall(text) for line in block.splitlines()]
    prose = FENCE.sub("", text)
    indented = [line for line in prose.splitlines() if line.startswith("    ")]
    return blocks + indented + INLINE.findall(prose)


def invocations(text: str) -> list[list[str]]:
    """The words after each `backprop` in the page's code, up to a comment or shell operator."""
    found = []
    for snippet in snippets(text):
        for match in INVOCATION.finditer(snippet):
            rest = match.group(1).split("  #")[0].split(" # ")[0]
            try:
                words = shlex.split(rest, comments=True)
            except ValueError:  # an unbalanced quote: a fragment, not a command
                continue
            command = []
            for word in words:
                if word in SHELL_OPERATORS or word.startswith(("|", ">", "<")):
                    break
                command.append(word.strip("[]"))
            found.append(command)
    return found


def placeholder(word: str) -> bool:
    """A word a page writes for the reader to fill in: `<run-id>`, `COMMAND`, `...`."""
    return word.startswith(("<", "{")) or word.isupper() or word == "..."


def check(root: Any, words: list[str]) -> str | None:
    """What is wrong with `backprop WORDS`; None when every command and option exists."""
    command, context = root, ["backprop"]
    options = {opt for param in root.params for opt in [*param.opts, *param.secondary_opts]}
    for word in words:
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            if name not in options | {"--help"}:
                return f"{' '.join(context)} has no option {name}"
            continue
        subcommands = getattr(command, "commands", {})
        if word in subcommands:
            command = subcommands[word]
            context.append(word)
            options = {opt for p in command.params for opt in [*p.opts, *p.secondary_opts]}
        elif subcommands and command is root and not placeholder(word):
            return f"backprop has no command {word}"
    return None


def unknown_variables(text: str) -> list[str]:
    """The BACKPROPAGATE_* names in `text` that nothing reads; a name ending in _ stands for a
    family (BACKPROPAGATE_TRAINING__*, BACKPROPAGATE_STORE__S3_*) and needs one member."""
    known = known_variables()
    return sorted(
        name
        for name in set(VARIABLE.findall(text))
        if name not in known and not (name.endswith("_") and any(k.startswith(name) for k in known))
    )


@pytest.fixture(scope="module")
def root() -> Any:
    return typer.main.get_command(app)


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_backprop_command_and_option_a_page_shows_exists(root: Any, page: Path) -> None:
    problems = sorted(
        {
            f"{problem}: backprop {' '.join(words)}"
            for words in invocations(page.read_text())
            if (problem := check(root, words))
        }
    )

    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_backpropagate_variable_a_page_names_is_read_by_the_code(page: Path) -> None:
    assert unknown_variables(page.read_text()) == []


def test_the_parser_finds_commands_in_blocks_and_inline_code() -> None:
    text = "```bash\nbackprop runs show RUN --json | jq .  # the record\n```\nThen `backprop info`."

    assert invocations(text) == [["runs", "show", "RUN", "--json"], ["info"]]


def test_the_slao_paper_is_cited_by_its_title() -> None:
    title = "Merge before Forget: A Single LoRA Continual Learning via Continual Merging"
    citing = [REPO / "docs" / "multi-run.md", REPO / "services/trainer/multirun/slao.py"]

    for path in citing:
        assert title in " ".join(path.read_text().split()), path
    for page in [*PAGES, *citing]:  # the product's expansion is not the paper's title
        assert "Asymmetric Merging" not in " ".join(page.read_text().split()), page


def test_every_backpropagate_variable_the_deploy_files_use_is_known() -> None:
    """A `.env` from `make env` (compose's variables too) must raise no misspelt-setting
    warning: each name is a setting or listed in setting_names.OTHER_VARIABLES."""
    files = [REPO / "docker-compose.yml", REPO / ".env.example", REPO / "Makefile"]
    files += [path for path in (REPO / "deploy").rglob("*") if path.is_file()]
    unknown = {
        f"{name} ({path.relative_to(REPO)})"
        for path in files
        for name in unknown_variables(path.read_text(errors="replace"))
    }

    assert sorted(unknown) == []


LINK = re.compile(r"\]\(([^)\s]+\.md)(?:#([^)\s]+))?\)")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces -."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_link_to_another_page_leads_to_it_and_its_heading(page: Path) -> None:
    broken = []
    for target, anchor in LINK.findall(page.read_text()):
        linked = (page.parent / target).resolve()
        if not linked.is_file():
            broken.append(target)
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}#{anchor}")

    assert broken == []
