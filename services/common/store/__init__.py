"""The artifact store: one interface, a local-directory and an S3 (MinIO) implementation."""

from backpropagate_services.common.store.base import ArtifactStore, make_store

__all__ = ["ArtifactStore", "make_store"]
