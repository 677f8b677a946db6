"""Identifiers that sort by creation time and say what they name, and the check that a caller's
id is one before it becomes part of a store key."""

from __future__ import annotations

import re
import secrets
import time

from backpropagate_api.errors import NotFoundError, quoted

# What new_id makes (and a dataset's sha256): letters, digits, '-' and '_', never '.' or '/',
# so an id can be placed in a key or a path and never leave it.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"
_ID = re.compile(ID_PATTERN)


def new_id(prefix: str) -> str:
    """e.g. run-20261123T161500-3f9a1c: readable, time-ordered, unique enough per machine."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"


def checked_id(value: str, what: str) -> str:
    """`value` if it can be an id; else NOT_FOUND, as for an id nobody made: a path-like id
    (`../../etc/passwd`, `/etc/passwd`) gets the same answer from every store."""
    if not _ID.fullmatch(value):
        raise NotFoundError(
            f"No {what} with id {quoted(value)}: that is not an id.",
            hint=f"Use the {what} id as backprop printed it: letters, digits, '-' and '_'.",
            **{f"{what}_id": value[:200]},
        )
    return value
