"""Identifiers that sort by creation time and say what they name."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """e.g. run-20261123T161500-3f9a1c: readable, time-ordered, unique enough per machine."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"
