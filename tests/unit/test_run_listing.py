"""ListRuns pages through the runs, newest first, over a real gRPC server: the client's
list_runs walks every page, a status filter and a limit span pages, a bad page token or an
unknown status is the caller's error, and an unreadable entry in the store is left out and named
(in the local store and on S3 alike)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from service_processes import connected, in_process_stack

from backpropagate.connection import Connection
from backpropagate.run_history import list_runs
from backpropagate_api.errors import ArtifactInvalidError, UserError
from backpropagate_api.layout import run_record_key
from backpropagate_api.settings import SafetySettings, Settings, StoreSettings
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.records import save_record
from backpropagate_services.trainer.run_listing import DEFAULT_PAGE_SIZE

RUNS = 250


def run_id(index: int, kind: str = "run") -> str:
    """The index-th run made: a second apart, so ids sort by index."""
    return f"{kind}-20261206T{index // 3600:02d}{index // 60 % 60:02d}{index % 60:02d}-{index:06x}"


@pytest.fixture(scope="module")
def connection(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Connection]:
    settings = Settings(home=tmp_path_factory.mktemp("runs"), safety=SafetySettings(source="host"))
    with in_process_stack(settings, ["trainer"], start_workers=False) as stack:
        for index in range(RUNS):
            kind = "campaign" if index % 50 == 7 else "run"
            status = (
                common_pb2.JOB_STATUS_FAILED if index % 3 == 0 else common_pb2.JOB_STATUS_SUCCEEDED
            )
            record = trainer_pb2.RunRecord(run_id=run_id(index, kind), status=status)
            save_record(stack.runtime.store, run_record_key(record.run_id), record)
        with connected(stack.address, ["trainer"]) as client:
            yield client


def ids(records: list[trainer_pb2.RunRecord]) -> list[str]:
    return [record.run_id for record in records]


def expected(indices: range | list[int]) -> list[str]:
    return [run_id(i, "campaign" if i % 50 == 7 else "run") for i in indices]


def test_one_call_answers_a_page_and_the_token_of_the_next(connection: Connection) -> None:
    page = connection.call("trainer", connection.trainer.ListRuns, trainer_pb2.ListRunsRequest())
    assert ids(list(page.runs)) == expected(range(RUNS - 1, RUNS - 1 - DEFAULT_PAGE_SIZE, -1))
    assert page.next_page_token
    request = trainer_pb2.ListRunsRequest(page_size=120, page_token=page.next_page_token)
    second = connection.call("trainer", connection.trainer.ListRuns, request)
    assert ids(list(second.runs)) == expected(range(RUNS - 1 - DEFAULT_PAGE_SIZE, 29, -1))
    last = trainer_pb2.ListRunsRequest(page_size=120, page_token=second.next_page_token)
    final = connection.call("trainer", connection.trainer.ListRuns, last)
    assert ids(list(final.runs)) == expected(range(29, -1, -1)) and not final.next_page_token


def test_list_runs_walks_every_page_newest_first_whatever_the_kind(connection: Connection) -> None:
    assert ids(list_runs(connection).runs) == expected(range(RUNS - 1, -1, -1))
    assert ids(list_runs(connection, limit=130).runs) == expected(range(RUNS - 1, RUNS - 131, -1))


def test_a_status_filter_spans_pages(connection: Connection) -> None:
    failed = [i for i in range(RUNS - 1, -1, -1) if i % 3 == 0]
    assert ids(list_runs(connection, status="failed").runs) == expected(failed)
    assert ids(list_runs(connection, status="failed", limit=5).runs) == expected(failed[:5])


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_token": "run-20991231T000000-ffffff"}, "page_token"),
        ({"page_token": "../../etc/passwd"}, "page_token"),
        ({"status": 99}, "status"),
        ({"page_size": -1}, "page_size"),
        ({"limit": -5}, "limit"),
    ],
)
def test_bad_paging_requests_are_the_callers_error(
    connection: Connection, request_fields: dict[str, object], field: str
) -> None:
    request = trainer_pb2.ListRunsRequest(**request_fields)  # type: ignore[arg-type]
    with pytest.raises(UserError) as caught:
        connection.call("trainer", connection.trainer.ListRuns, request)
    assert field in caught.value.context["fields"]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_damaged_record_and_a_misnamed_directory_are_left_out_and_named(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    where = StoreSettings()  # the local store, under home
    if store == "s3":
        where = StoreSettings(
            backend="s3",
            s3_endpoint=request.getfixturevalue("s3_endpoint"),
            s3_bucket=f"test-{uuid4().hex}",
            s3_access_key="test-access-key",  # moto takes any pair
            s3_secret_key="test-secret-key",
        )
    settings = Settings(home=tmp_path, safety=SafetySettings(source="host"), store=where)
    with in_process_stack(settings, ["trainer"], start_workers=False) as stack:
        runs = stack.runtime.store
        for index in range(5):
            record = trainer_pb2.RunRecord(run_id=run_id(index))
            save_record(runs, run_record_key(record.run_id), record)
        damaged = run_record_key(run_id(3))
        runs.put_bytes(damaged, b'{"run_id": "run-trunc')  # cut short by a full disk
        runs.put_bytes(run_record_key(run_id(1)), b'["not", "a", "record"]')
        runs.put_bytes("runs/bad.name/run.json", b"{}")  # copied in by hand
        with connected(stack.address, ["trainer"]) as client:
            first = client.call(
                "trainer", client.trainer.ListRuns, trainer_pb2.ListRunsRequest(page_size=2)
            )
            listing = list_runs(client)
            with pytest.raises(ArtifactInvalidError) as unreadable:
                client.call(
                    "trainer", client.trainer.GetRun, trainer_pb2.GetRunRequest(run_id=run_id(3))
                )

    assert ids(list(first.runs)) == [run_id(4), run_id(2)]
    assert list(first.unreadable_records) == ["runs/bad.name/run.json", damaged]
    assert ids(list(listing.runs)) == [run_id(4), run_id(2), run_id(0)]
    assert list(listing.unreadable_records) == [
        "runs/bad.name/run.json",
        damaged,
        run_record_key(run_id(1)),
    ]
    assert unreadable.value.message.startswith(f"{damaged} is not a readable run record")
