"""Every BACKPROPAGATE_* variable the settings read, and the ones set that none of them reads.

pydantic-settings ignores a variable it does not know, so `BACKPROPAGATE_MODEL_NAME=...` (one
underscore where the nesting takes two) used to change nothing, silently. `unknown_variables`
finds such names in the environment and the `.env` file, with the known name closest to each;
the CLI warns about them on stderr and the services in their log. A warning, not an error: an
unrelated variable must not stop a service from starting.

The settings reference (docs/reference/settings.md) is generated from `setting_variables`.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource

from backpropagate_api.settings import Settings

PREFIX = "BACKPROPAGATE_"
# BACKPROPAGATE_* names that are no setting but are read elsewhere, and where.
OTHER_VARIABLES = {
    "BACKPROPAGATE_DEBUG": "the CLI: full tracebacks (as `backprop --verbose`)",
    "BACKPROPAGATE_IMAGE_TAG": "docker-compose.yml: the tag of the images it runs",
    "BACKPROPAGATE_S3_BUCKET": "docker-compose.yml: the bucket MinIO and the services share",
    "BACKPROPAGATE_DATAPREP_PORT": "docker-compose.yml: dataprep's port on the host",
    "BACKPROPAGATE_TRAINER_PORT": "docker-compose.yml: the trainer's port on the host",
    "BACKPROPAGATE_SAFETY_PORT": "docker-compose.yml: the safety sidecar's port on the host",
    "BACKPROPAGATE_EXPORT_PORT": "docker-compose.yml: the export service's port on the host",
    "BACKPROPAGATE_WHEEL_CACHE": "deploy/llama-cpp/build-wheel.sh: where built wheels are kept",
}


@dataclass(frozen=True)
class SettingVariable:
    name: str  # BACKPROPAGATE_...
    type: str
    default: str
    description: str
    group: bool  # a nested group, settable whole as JSON or field by field


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `int | None`, `list[str]`, `'fast' | 'quality'`."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(value) for value in arguments)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(argument) for argument in arguments)
    if origin is typing.Annotated:
        return type_name(arguments[0])
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in arguments)}]"
    if annotation is type(None):
        return "None"
    return str(getattr(annotation, "__name__", annotation))


def _shown_default(value: Any) -> str:
    """A default as the reference shows it, the same on every machine: the home as ~."""
    if isinstance(value, BaseModel):
        return "(group)"
    text = str(value) if isinstance(value, Path) else repr(value)
    return text.replace(str(Path.home()), "~")


def setting_variables(
    model: type[BaseModel] = Settings, prefix: str = PREFIX
) -> list[SettingVariable]:
    """Every variable `model` reads, groups before their fields, in declaration order."""
    found: list[SettingVariable] = []
    for name, info in model.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        annotation = info.annotation
        is_group = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        default = info.get_default(call_default_factory=True)
        description = info.description or (annotation.__doc__ or "" if is_group else "")
        found.append(
            SettingVariable(
                variable,
                "JSON object" if is_group else type_name(annotation),
                _shown_default(default),
                " ".join(description.split()),
                is_group,
            )
        )
        if is_group:
            found += setting_variables(annotation, f"{variable}__")  # type: ignore[arg-type]
    return found


@dataclass(frozen=True)
class UnknownVariable:
    name: str
    source: Literal["environment", ".env file"]
    suggestion: str | None  # the known name closest to it, if any is close

    def warning(self) -> str:
        hint = f"; did you mean {self.suggestion}?" if self.suggestion else ""
        return f"{self.name} (from the {self.source}) is no Backpropagate setting{hint}"


def known_variables() -> list[str]:
    return [variable.name for variable in setting_variables()] + list(OTHER_VARIABLES)


def unknown_variables() -> list[UnknownVariable]:
    """BACKPROPAGATE_* names set in the environment or the `.env` file that nothing reads,
    each with the closest known name (difflib), as Settings reads both sources."""
    known = known_variables()
    unknown: list[UnknownVariable] = []
    seen: set[str] = set()
    sources: list[tuple[Literal["environment", ".env file"], dict[str, Any]]] = [
        ("environment", dict(EnvSettingsSource(Settings).env_vars)),
        (".env file", dict(DotEnvSettingsSource(Settings).env_vars)),
    ]
    for source, variables in sources:
        for lower in variables:
            name = lower.upper()
            if not name.startswith(PREFIX) or name in known or name in seen:
                continue
            seen.add(name)
            unknown.append(UnknownVariable(name, source, _closest(name, known)))
    return sorted(unknown, key=lambda variable: variable.name)


def _closest(name: str, known: list[str]) -> str | None:
    """The known name `name` is most likely a misspelling of, compared without the prefix
    they all share (which would make every name look alike)."""
    tails = {variable.removeprefix(PREFIX): variable for variable in known}
    close = difflib.get_close_matches(name.removeprefix(PREFIX), list(tails), n=1, cutoff=0.75)
    return tails[close[0]] if close else None
