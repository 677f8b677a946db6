"""Read-only calls answered from this machine's files, without starting the embedded stack.

In the embedded default the run and export records are files under the home directory and the
safety readings are this machine's. `runs list`, `runs show`, `exports show`, `info` and the GPU
checks only read those: starting the four servicers for them imported torch and took about 4 s
of CPU before the first line. These stand-ins answer the same requests with the code the
servicers run (the store, the record layout, the download check, the safety source), so a
reader sees what a connected stack would show. Only these methods exist: a command that needs
more (submit, watch, cancel) opens a full connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any, TypeVar

from backpropagate.in_process import STACK_EXTRAS, services_needed
from backpropagate_api.layout import export_record_key, run_record_key
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import export_pb2, safety_pb2, trainer_pb2

Record = TypeVar("Record", trainer_pb2.RunRecord, export_pb2.ExportResult)


@dataclass(frozen=True)
class ServiceCode:
    """The service modules the stand-ins run, imported together (`local_stubs`), so that a
    missing package is named as the extra to install, not met halfway through a command."""

    records: ModuleType
    downloads: ModuleType
    run_listing: ModuleType
    safety_server: ModuleType
    safety_levels: ModuleType
    safety_sources: ModuleType


class _LocalReads:
    """Reads from the local artifact store through the services' own code."""

    def __init__(self, store: Any, code: ServiceCode) -> None:
        self.store = store
        self.code = code

    def _record(self, key: str, kind: type[Record], what: str) -> Record:
        record: Record = self.code.records.load_record(self.store, key, kind, what)
        return record


class LocalTrainer(_LocalReads):
    def GetRun(self, request: trainer_pb2.GetRunRequest, **_: Any) -> trainer_pb2.RunRecord:
        return self._record(run_record_key(request.run_id), trainer_pb2.RunRecord, "run")

    def ListRuns(
        self, request: trainer_pb2.ListRunsRequest, **_: Any
    ) -> trainer_pb2.ListRunsResponse:
        page: trainer_pb2.ListRunsResponse = self.code.run_listing.list_runs_page(
            self.store, request
        )
        return page


class LocalExport(_LocalReads):
    def GetExport(self, request: export_pb2.GetExportRequest, **_: Any) -> export_pb2.ExportResult:
        key = export_record_key(request.export_id)
        return self._record(key, export_pb2.ExportResult, "export")

    def DownloadArtifact(
        self, request: export_pb2.DownloadArtifactRequest, **_: Any
    ) -> Iterator[export_pb2.ArtifactChunk]:
        chunks: Iterator[export_pb2.ArtifactChunk] = self.code.downloads.artifact_chunks(
            self.store, request
        )
        return chunks


class LocalSafety:
    """This machine's readings; the source (NVML, host memory) opens on the first Snapshot."""

    def __init__(self, settings: Settings, code: ServiceCode) -> None:
        self.settings = settings
        self.code = code

    @cached_property
    def _source_and_thresholds(self) -> tuple[Any, Any]:
        safety = self.settings.safety
        source = self.code.safety_sources.make_source(safety.source, safety.replay_file)
        return source, self.code.safety_levels.Thresholds.from_settings(safety)

    def Snapshot(self, request: safety_pb2.SnapshotRequest, **_: Any) -> safety_pb2.SafetySnapshot:
        snapshot: safety_pb2.SafetySnapshot = self.code.safety_server.snapshot_of(
            *self._source_and_thresholds
        )
        return snapshot


def local_stubs(settings: Settings) -> dict[str, Any]:
    """The read-only stand-ins of the trainer, export and safety services, by service name."""
    with services_needed("With no endpoint set, Backpropagate", STACK_EXTRAS, or_endpoint=True):
        from backpropagate_services.common import records
        from backpropagate_services.common.store import make_store
        from backpropagate_services.export import downloads
        from backpropagate_services.safety import levels, sources
        from backpropagate_services.safety import server as safety_server
        from backpropagate_services.trainer import run_listing

        code = ServiceCode(records, downloads, run_listing, safety_server, levels, sources)
        store = make_store(settings)
    return {
        "trainer": LocalTrainer(store, code),
        "export": LocalExport(store, code),
        "safety": LocalSafety(settings, code),
    }
