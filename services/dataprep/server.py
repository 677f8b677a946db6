"""DataprepService: receives uploads, validates them, stores prepared datasets."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from backpropagate_api.errors import UserError
from backpropagate_api.grpc_errors import translate_errors
from backpropagate_api.uploads import prepared_dataset_id
from backpropagate_api.v1 import dataprep_pb2, dataprep_pb2_grpc
from backpropagate_services.common.datasets import (
    DatasetRecord,
    DatasetWriter,
    LeftOut,
    find_record,
    load_record,
)
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.common.service import ServiceHandle
from backpropagate_services.dataprep.duplicates import DuplicateFilter
from backpropagate_services.dataprep.formats import parse_records
from backpropagate_services.dataprep.languages import LanguageFilter
from backpropagate_services.dataprep.limits import ByteBudget
from backpropagate_services.dataprep.records import file_records

SERVICE_NAME = dataprep_pb2.DESCRIPTOR.services_by_name["DataprepService"].full_name


def to_proto(record: DatasetRecord, reused: bool = False) -> dataprep_pb2.DatasetInfo:
    return dataprep_pb2.DatasetInfo(
        reused=reused,
        dataset_id=record.dataset_id,
        format=record.format,
        num_examples=record.num_examples,
        num_turns=record.num_turns,
        size_bytes=record.size_bytes,
        filename=record.filename,
        # Sorted like the stored info.json, so UploadDataset and a later InspectDataset of the
        # same dataset answer the same bytes.
        preview_json=json.dumps(record.preview, ensure_ascii=False, sort_keys=True),
        rows_read=record.rows_read,
        rejections=[dataprep_pb2.RowRejection(**asdict(row)) for row in record.rejections],
        removed=[dataprep_pb2.RowRejection(**asdict(row)) for row in record.removed],
        rows_rejected=record.rows_rejected,
        rows_removed=record.rows_removed,
    )


class DataprepServicer(dataprep_pb2_grpc.DataprepServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.store = runtime.store
        self.max_upload_bytes = runtime.settings.dataprep.max_upload_bytes

    @translate_errors
    def UploadDataset(
        self,
        request_iterator: Iterator[dataprep_pb2.UploadDatasetRequest],
        context: grpc.ServicerContext,
    ) -> dataprep_pb2.DatasetInfo:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise UserError("An upload must start with a header message.")
        header = first.header
        digest = hashlib.sha256()
        received = ByteBudget(header.filename, self.max_upload_bytes)
        with tempfile.TemporaryDirectory(prefix="bp-upload-") as tmp:
            path = Path(tmp) / "upload.jsonl"
            with path.open("wb") as handle:
                for message in request_iterator:
                    received.spend(len(message.chunk))
                    digest.update(message.chunk)
                    handle.write(message.chunk)
            dataset_id = prepared_dataset_id(digest.hexdigest(), header)
            prepared = find_record(self.store, dataset_id)
            if prepared is not None:  # the same bytes, prepared the same way: done before
                return to_proto(prepared, reused=True)
            filename = header.filename or "dataset"
            records = file_records(path, filename, dict(header.columns), self.max_upload_bytes)
            # Language first: a row in another language never becomes the kept original that
            # a later duplicate is measured against.
            filters = (
                LanguageFilter(header.languages),
                DuplicateFilter(header.dedup, header.near_duplicate_threshold),
            )
            removed = LeftOut()
            with DatasetWriter(Path(tmp)) as writer:

                def keep(row: dict[str, Any], line: int) -> None:
                    removal = next(
                        filter(None, (each.removal(row, line) for each in filters)), None
                    )
                    if removal is None:
                        writer.add(row)
                    else:
                        removed.add(removal)

                parsed = parse_records(
                    records, filename, header.format, strict=header.strict, keep=keep
                )
                record = writer.save(
                    self.store,
                    dataset_id,
                    parsed.format,
                    header.filename,
                    path.stat().st_size,
                    parsed.invalid,
                    removed,
                )
        return to_proto(record)

    @translate_errors
    def InspectDataset(
        self, request: dataprep_pb2.InspectDatasetRequest, context: grpc.ServicerContext
    ) -> dataprep_pb2.DatasetInfo:
        return to_proto(load_record(self.store, request.dataset_id))


def create(runtime: Runtime) -> ServiceHandle:
    servicer = DataprepServicer(runtime)
    return ServiceHandle(
        name="dataprep",
        grpc_service_name=SERVICE_NAME,
        register=lambda server: dataprep_pb2_grpc.add_DataprepServiceServicer_to_server(
            servicer, server
        ),
    )
