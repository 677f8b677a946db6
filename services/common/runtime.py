"""The shared dependencies of a service process, built once from settings."""

from __future__ import annotations

from dataclasses import dataclass

from backpropagate_api.settings import Settings
from backpropagate_services.common.queue import JobQueue, make_queue
from backpropagate_services.common.store import ArtifactStore, make_store


@dataclass
class Runtime:
    settings: Settings
    queue: JobQueue
    store: ArtifactStore

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        return cls(settings=settings, queue=make_queue(settings), store=make_store(settings))

    def close(self) -> None:
        self.queue.close()
