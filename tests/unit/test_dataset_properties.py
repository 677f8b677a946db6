"""No input makes a dataset parser crash: whatever bytes, rows or cells a file holds, reading it
either gives examples or raises a UserError (a stable INPUT_ code with the file and line)."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backpropagate_api.errors import UserError
from backpropagate_services.dataprep.formats import parse_records
from backpropagate_services.dataprep.records import file_records

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "messages",
                    "conversations",
                    "role",
                    "content",
                    "from",
                    "value",
                    "instruction",
                    "input",
                    "output",
                    "prompt",
                    "chosen",
                    "rejected",
                    "completion",
                    "label",
                    "text",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)


def read(name: str, data: bytes, strict: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_bytes(data)
        try:
            parsed = parse_records(file_records(path, name), name, strict=strict)
        except UserError as error:
            assert error.code.startswith("INPUT_"), error.code
            assert error.context.get("filename") == name or "format" in error.context
            return
        assert parsed.kept > 0 and parsed.kept + parsed.rows_rejected == parsed.rows_read


@PROPERTY
@given(data=st.binary(max_size=400), name=st.sampled_from(["d.jsonl", "d.csv", "d.tsv"]))
@pytest.mark.parametrize("strict", [True, False])
def test_any_bytes_are_examples_or_an_input_error(data, name, strict):
    read(name, data, strict)


@PROPERTY
@given(rows=st.lists(json_values, min_size=1, max_size=6))
@pytest.mark.parametrize("strict", [True, False])
def test_any_json_rows_are_examples_or_an_input_error(rows, strict):
    read("d.jsonl", "\n".join(json.dumps(row) for row in rows).encode(), strict)


@PROPERTY
@given(
    header=st.lists(
        st.sampled_from(["prompt", "response", "instruction", "output", "input", "label", "x"]),
        min_size=1,
        max_size=4,
    ),
    cells=st.lists(st.lists(st.text(max_size=10), max_size=5), min_size=1, max_size=5),
)
def test_any_csv_table_is_examples_or_an_input_error(header, cells):
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(cells)
    read("d.csv", text.getvalue().encode(), strict=False)
