"""How long a value of a Parquet column chunk can be, from the file itself, before decoding it.

A Parquet footer counts a dictionary's values once, however many rows repeat them: a file of a
few hundred bytes whose dictionary holds one 7 MiB value, repeated by every row, says it holds
7 MiB and decodes to gigabytes. The dictionary page's own header says how many bytes the page
decompresses to (Arrow refuses a page that decompresses to another size, and a second
dictionary), so no value in it is longer: that bounds what each row can repeat. The header is
the first fields of a Thrift compact-protocol struct (PageHeader: type, uncompressed size,
compressed size), read here by hand because pyarrow does not expose page headers.

DELTA_BYTE_ARRAY repeats a prefix of the previous value in the next: a chunk so encoded may
repeat a value as long as the chunk in every row, like an unknown dictionary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import pyarrow.parquet as pq

DICTIONARY_PAGE = 2  # parquet.thrift PageType
I32_FIELD = 0x15  # Thrift compact protocol: the next field (id delta 1), of type i32
HEADER_BYTES = 32  # enough for the first three fields (a byte and up to five varint bytes each)
PREFIX_ENCODINGS = {"DELTA_BYTE_ARRAY"}


def repeatable_bytes(handle: BinaryIO, column: pq.ColumnChunkMetaData) -> int:
    """An upper bound on a value of `column`'s chunk that decoding may repeat in many rows: 0
    for plain values (each decodes once), the dictionary page's size when the chunk starts
    with one, else (a prefix encoding, a dictionary elsewhere) the chunk's whole size."""
    whole = int(column.total_uncompressed_size)
    if PREFIX_ENCODINGS & set(column.encodings):
        return whole
    if not column.has_dictionary_page and "RLE_DICTIONARY" not in column.encodings:
        return 0
    dictionary = _dictionary_page_bytes(handle, column)
    return whole if dictionary is None else min(dictionary, whole)


def _dictionary_page_bytes(handle: BinaryIO, column: pq.ColumnChunkMetaData) -> int | None:
    """The uncompressed size of the page Arrow reads first in the chunk (from the same offset
    as Arrow), if that page is a dictionary; None otherwise, or if its header is not as the
    writers we know write it."""
    start = column.data_page_offset
    if column.dictionary_page_offset and 0 < column.dictionary_page_offset < start:
        start = column.dictionary_page_offset
    handle.seek(start)
    fields = _leading_i32_fields(handle.read(HEADER_BYTES), 2)
    if fields is None or fields[0] != DICTIONARY_PAGE or fields[1] < 0:
        return None
    return fields[1]


def _leading_i32_fields(data: bytes, count: int) -> list[int] | None:
    """The first `count` fields of a compact-protocol struct, if each is the next field id and
    an i32 (a zigzag varint); None otherwise."""
    values, position = [], 0
    for _ in range(count):
        if position >= len(data) or data[position] != I32_FIELD:
            return None
        position += 1
        value = shift = 0
        while True:
            if position >= len(data) or shift > 28:  # an i32 takes at most five bytes
                return None
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append((value >> 1) ^ -(value & 1))
    return values
