"""`python -m backpropagate.reference [DIR]`: write the reference pages (default docs/reference)."""

from __future__ import annotations

import sys
from pathlib import Path

from backpropagate.reference import generate

if __name__ == "__main__":
    for path in generate(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reference")):
        print(path)
