"""Rows that repeat one kept earlier in the file, exactly or nearly.

Scraped and exported data repeats itself, and a repeated row is trained on more often than the
rest: it is learnt by heart and weighs on the others. "exact": the same text once case and
whitespace are normalised. "near": MinHash LSH (datasketch) over word 3-grams, a row dropped when
its estimated Jaccard similarity with a kept row reaches the threshold: what reworded or lightly
edited copies share.
"""

from __future__ import annotations

import hashlib
from typing import Any

from backpropagate_api.errors import ConfigError, quoted
from backpropagate_services.common.datasets import RowRejection

MODES = ("none", "exact", "near")
DEFAULT_THRESHOLD = 0.8
PERMUTATIONS = 128  # MinHash size: the similarity estimate's error is about 1/sqrt(128), 9%
SHINGLE_WORDS = 3


class DuplicateFilter:
    def __init__(self, mode: str, threshold: float = 0.0) -> None:
        mode = mode or "none"
        threshold = threshold or DEFAULT_THRESHOLD
        if mode not in MODES or not 0 < threshold <= 1:
            raise ConfigError(
                f"dedup must be one of {', '.join(MODES)} with a threshold in (0, 1], got "
                f"{quoted(mode)} at {threshold:g}.",
                fields="dedup",
            )
        self.mode = mode
        self.threshold = threshold
        self._seen: dict[bytes, int] = {}  # exact: text digest -> the kept row's line
        self._lsh: Any = None
        if mode == "near":
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=threshold, num_perm=PERMUTATIONS)

    def duplicate_of(self, row: dict[str, Any], line: int) -> int | None:
        """The line of the kept row this one repeats; None (and the row is remembered as kept)
        when it repeats none."""
        if self.mode == "none":
            return None
        words = row_text(row).lower().split()
        if self.mode == "exact":
            key = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
            original = self._seen.get(key)
            if original is None:
                self._seen[key] = line
            return original
        return self._near(words, line)

    def removal(self, row: dict[str, Any], line: int) -> RowRejection | None:
        """Why the row is removed (code FILTER_DUPLICATE: which kept row it repeats), or None."""
        original = self.duplicate_of(row, line)
        if original is None:
            return None
        kind = "the same text as" if self.mode == "exact" else "nearly the same text as"
        return RowRejection(line, "FILTER_DUPLICATE", "", f"{kind} line {original}")

    def _near(self, words: list[str], line: int) -> int | None:
        from datasketch import MinHash

        signature = MinHash(num_perm=PERMUTATIONS)
        shingles = {" ".join(words[i : i + SHINGLE_WORDS]) for i in range(len(words))}
        signature.update_batch([shingle.encode() for shingle in shingles])
        matches = self._lsh.query(signature)
        if matches:
            return min(int(match) for match in matches)
        self._lsh.insert(str(line), signature)
        return None


def row_text(value: Any) -> str:
    """Every string in a stored row (messages' contents, prompts, answers), in order."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "\n".join(row_text(item) for key, item in value.items() if key != "role")
    if isinstance(value, list):
        return "\n".join(row_text(item) for item in value)
    return ""
