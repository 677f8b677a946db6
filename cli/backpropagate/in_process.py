"""The services in this process, for what the client runs itself: the embedded stack (no
BACKPROPAGATE_ENDPOINT), `backprop serve`, chat with a local GGUF and handing a downloaded GGUF
to Ollama. These are the only places the client reaches `backpropagate_services`.

A client-only install (`pip install backpropagate`, no extras: no torch, no llama.cpp) lacks
what they import, and a service's image holds only that service's package; the user is told
which extra to install, or which endpoint to set, as DEP_PACKAGE_MISSING (exit code 1), never an
ImportError. Every import of service code by the client sits in a `services_needed` block, so
that rule can be checked (tests/unit/test_deploy_static.py: an image need not hold what only
such a block imports).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from backpropagate_api.errors import MissingDependencyError

# Everything `backprop serve all` and the embedded default run.
STACK_EXTRAS = "dataprep,trainer,safety,export,stack"
EXPORT_EXTRAS = "export"
# The client and the API package are every install's; a missing module of theirs is a bug.
ALWAYS_INSTALLED = ("backpropagate", "backpropagate_api")


@contextmanager
def services_needed(
    feature: str, extras: str, *, or_endpoint: bool = False, services: bool = True
) -> Iterator[None]:
    """Run the body, which imports service code (`services=False`: another extra's, the web
    UI's); a third-party package it lacks becomes MissingDependencyError naming `extras` (and,
    with `or_endpoint`, a remote stack instead)."""
    try:
        yield
    except ModuleNotFoundError as missing:
        if (missing.name or "").partition(".")[0] in ALWAYS_INSTALLED:
            raise  # the client's own code missing is a broken install or a bug
        hint = f"Install it with `pip install 'backpropagate[{extras}]'`"
        if or_endpoint:
            hint += ", or point the client at a running stack: BACKPROPAGATE_ENDPOINT=host:port"
        runs = "runs the services in this process and " if services else ""
        raise MissingDependencyError(
            f"{feature} {runs}needs the package {missing.name!r}, which this install of "
            "Backpropagate does not have.",
            hint=f"{hint}.",
            package=missing.name,
        ) from None
