"""Where a setting's value came from: the process's environment, a `.env` file, or neither.

pydantic-settings merges the two (the environment wins) and keeps no trace of which one gave a
value. `backprop config` shows it, and the client needs it before it sends its token: a `.env` is
read from whatever directory a command runs in, a cloned repository's included, so a value found
there is not the user's choice the way an exported variable is. Both are read here exactly as
`Settings` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource

from backpropagate_api.settings import Settings

Source = Literal["environment", ".env file"]


def source_of(variable: str) -> Source | None:
    """Which source sets `variable` (BACKPROPAGATE_...; case does not matter, as for Settings),
    the environment first; None: neither does."""
    name = variable.lower()
    if name in EnvSettingsSource(Settings).env_vars:
        return "environment"
    if name in DotEnvSettingsSource(Settings).env_vars:
        return ".env file"
    return None


def dotenv_file() -> Path:
    """The `.env` file Settings reads (it need not exist), as an absolute path."""
    return Path(str(Settings.model_config.get("env_file"))).absolute()


def from_dotenv(variable: str, value: str) -> bool:
    """Whether `value` is what the `.env` file gives `variable`, the environment not overriding
    it (a value given in code that happens to equal it counts as the file's)."""
    if source_of(variable) != ".env file":
        return False
    return DotEnvSettingsSource(Settings).env_vars.get(variable.lower()) == value
