"""docs/reference/settings.md: every BACKPROPAGATE_* variable with its type, default and
description, from the settings classes (backpropagate_api.settings), grouped as they nest."""

from __future__ import annotations

from backpropagate.reference.markdown import generated_header, table
from backpropagate_api.setting_names import OTHER_VARIABLES, SettingVariable, setting_variables

INTRO = """Each setting is an environment variable, or a line of a `.env` file in the working
directory (the environment wins). Nested ones join their group and field with `__`
(`BACKPROPAGATE_QUEUE__REDIS_URL`); a whole group can also be given as one JSON object
(`BACKPROPAGATE_SAFETY='{"source": "host"}'`), and a list as JSON
(`BACKPROPAGATE_MODEL__ALLOWED_DIRS='["/srv/models"]'`). Names are not case-sensitive. A
`BACKPROPAGATE_*` name that is none of these is reported as a warning, with the closest known
name. `backprop config` prints the value of each in effect and where it came from.

"""


def _rows(variables: list[SettingVariable]) -> list[tuple[str, str, str, str]]:
    return [(f"`{v.name}`", v.type, f"`{v.default}`", v.description) for v in variables]


def settings_page() -> str:
    variables = setting_variables()
    top = [v for v in variables if "__" not in v.name and not v.group]
    text = generated_header(
        "Settings reference", "the settings, proto/backpropagate_api/settings.py"
    )
    text += INTRO + "## Top level\n\n" + table(["variable", "type", "default", "what"], _rows(top))
    for group in (v for v in variables if v.group):
        fields = [v for v in variables if v.name.startswith(f"{group.name}__")]
        text += f"\n## `{group.name}__*`\n\n{group.description}\n\n"
        text += table(["variable", "type", "default", "what"], _rows(fields))
    others = [(f"`{name}`", where) for name, where in OTHER_VARIABLES.items()]
    text += (
        "\n## Read elsewhere\n\nNot settings, but known names: no warning is given for them.\n\n"
    )
    return text + table(["variable", "read by"], others)
