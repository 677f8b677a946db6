"""A dataset file's lines as text, however the editor that wrote it saved it.

Windows tools write UTF-8 with a byte-order mark, Notepad and Excel's "Unicode text" write
UTF-16 with one, and most write CRLF line ends: all of that is decoded here, line by line (a big
file is never held whole), so the parsers only see text. A file in any other encoding fails on the
first line that is not UTF-8, with that line's number. A gzip-compressed file (data.jsonl.gz, as
datasets are often shipped) is read through gzip, still a line at a time, and its decompressed
bytes count against the upload limit (limits.ByteBudget); a ZIP archive is refused saying so,
since it may hold anything.
"""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from backpropagate_api.errors import DatasetParseError
from backpropagate_services.dataprep import limits
from backpropagate_services.dataprep.limits import ByteBudget

# Longest first: UTF-32 LE's mark begins with UTF-16 LE's.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


def uncompressed_name(path: Path, filename: str) -> str:
    """`filename` without the .gz of a gzip file: the extension left tells the file's kind."""
    return filename.removesuffix(".gz") if _head(path).startswith(GZIP_MAGIC) else filename


def text_lines(path: Path, filename: str, max_bytes: int | None = None) -> Iterator[str]:
    """Each line of the file, decoded, without its line end (LF or CRLF). A line longer than
    limits.MAX_ROW_BYTES is refused without being read whole, and a file that decompresses past
    `max_bytes` once past it (DatasetTooLargeError)."""
    counted = " once decompressed" if _head(path).startswith(GZIP_MAGIC) else ""
    try:
        yield from _lines(path, filename, ByteBudget(filename, max_bytes, counted))
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetParseError(
            f"{filename}: the gzip compression is damaged ({exc or 'cut short'})",
            hint="Compress the file again, or pass it uncompressed.",
            filename=filename,
        ) from exc


def _head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(4)


def _open(path: Path, filename: str) -> BinaryIO:
    """The file's bytes, decompressed if it is gzip."""
    head = _head(path)
    if head.startswith(ZIP_MAGIC):
        raise DatasetParseError(
            f"{filename}: a ZIP archive, not a dataset file",
            hint="Extract the dataset file from the archive and pass that (a .gz file is read "
            "as it is).",
            filename=filename,
        )
    if head.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _lines(path: Path, filename: str, budget: ByteBudget) -> Iterator[str]:
    with _open(path, filename) as probe:
        head = probe.read(4)
    encoding = next((name for mark, name in BYTE_ORDER_MARKS if head.startswith(mark)), "utf-8")
    if encoding == "utf-16" or encoding == "utf-32":
        yield from _wide_lines(path, filename, encoding, budget)
        return
    with _open(path, filename) as handle:
        number = 0
        # Split on LF only, as JSON Lines does: U+2028 and the like may sit inside a string.
        while raw := handle.readline(limits.MAX_ROW_BYTES + 1):
            number += 1
            budget.spend(len(raw))
            _check_length(len(raw), raw.endswith(b"\n"), filename, number)
            line = raw.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise not_decodable(
                    filename, number, "UTF-8", f"{exc.reason} at byte {exc.start}"
                ) from exc


def _wide_lines(path: Path, filename: str, encoding: str, budget: ByteBudget) -> Iterator[str]:
    """UTF-16 / UTF-32 lines. Decoded a block at a time, so a bad byte is placed near, not at,
    its line."""
    read = 0
    unit = 2 if encoding == "utf-16" else 4  # bytes a character takes, at least
    with io.TextIOWrapper(_open(path, filename), encoding=encoding, newline="") as handle:
        try:
            # Characters: the bound is looser.
            while line := handle.readline(limits.MAX_ROW_BYTES + 1):
                read += 1
                budget.spend(len(line) * unit)
                _check_length(len(line), line.endswith(("\n", "\r")), filename, read)
                yield line.removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise not_decodable(filename, read + 1, encoding.upper(), "near here") from exc


def _check_length(length: int, ended: bool, filename: str, line: int) -> None:
    """A read of MAX_ROW_BYTES + 1 that did not reach the line's end: the line is longer."""
    if length - ended > limits.MAX_ROW_BYTES:
        raise limits.row_too_large(filename, line)


def not_decodable(filename: str, line: int, encoding: str, where: str) -> DatasetParseError:
    return DatasetParseError(
        f"{filename} line {line}: not valid {encoding} ({where})",
        hint="Save the file as UTF-8 (in most editors: Save As, Encoding: UTF-8).",
        filename=filename,
        line=line,
    )
