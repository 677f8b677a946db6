"""The artifact store on S3 (MinIO in the stack), for services that run on different machines.

S3 makes an object visible only once its upload completes, so single objects need no temporary
names here; `put_dir`'s manifest-last commit does the rest.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error, ServerError

from backpropagate_api.disk_full import no_space_error
from backpropagate_api.errors import (
    ConfigError,
    NotFoundError,
    StoreUnavailableError,
)
from backpropagate_services.common.store.base import CHUNK_SIZE, ArtifactStore

if TYPE_CHECKING:
    from backpropagate_api.settings import StoreSettings

# MinIO's answer (HTTP 507) to a write once its drives reach their free-space threshold.
MINIO_STORAGE_FULL = "XMinioStorageFull"


class S3Store(ArtifactStore):
    def __init__(self, client: Minio, bucket: str) -> None:
        """Use `bucket` through `client`, creating the bucket on first use of a fresh server."""
        self._client = client
        self._bucket = bucket
        with self._translated():
            if not client.bucket_exists(bucket):
                try:
                    client.make_bucket(bucket)
                except S3Error as error:
                    # Another service starting at the same moment created it first.
                    if error.code != "BucketAlreadyOwnedByYou":
                        raise

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> S3Store:
        access_key, secret_key = _credentials(settings)
        client = Minio(
            settings.s3_endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        return cls(client, settings.s3_bucket)

    @contextmanager
    def _translated(self, key: str = "") -> Iterator[None]:
        """Turn minio's and urllib3's errors into ours, saying which key or bucket was involved."""
        try:
            yield
        except S3Error as error:
            if error.code == "NoSuchKey":
                raise NotFoundError(f"No artifact at {key}.", key=key) from error
            if error.code == MINIO_STORAGE_FULL:
                raise no_space_error(
                    f"S3 bucket {self._bucket!r} (its server's drives)",
                    str(error.message),
                    bucket=self._bucket,
                ) from error
            raise
        except (urllib3.exceptions.HTTPError, ServerError) as error:
            # urllib3's message names the host and port; it never carries the credentials.
            raise StoreUnavailableError(
                f"Cannot use S3 bucket {self._bucket!r}: {error}", bucket=self._bucket
            ) from error

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._translated(key):
            self._client.put_object(self._bucket, key, io.BytesIO(data), len(data))

    def put_file(self, key: str, path: Path) -> None:
        with self._translated(key):
            self._client.fput_object(self._bucket, key, str(path))

    def iter_chunks(
        self, key: str, chunk_size: int = CHUNK_SIZE, offset: int = 0
    ) -> Iterator[bytes]:
        with self._translated(key):
            if offset and offset >= self.size(key):
                return  # a ranged GET past the end is an error in S3; nothing is left to send
            response = self._client.get_object(self._bucket, key, offset=offset)
            try:
                yield from response.stream(chunk_size)
            finally:
                response.close()
                response.release_conn()

    def size(self, key: str) -> int:
        with self._translated(key):
            size = self._client.stat_object(self._bucket, key).size
        return int(size or 0)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        with self._translated(prefix):
            objects = self._client.list_objects(self._bucket, prefix=prefix, recursive=True)
            return sorted(obj.object_name for obj in objects if obj.object_name is not None)

    def delete_prefix(self, prefix: str) -> None:
        doomed = (DeleteObject(key) for key in self.list(prefix))
        with self._translated(prefix):
            # remove_objects is lazy: nothing is deleted until its error iterator is consumed.
            failures = list(self._client.remove_objects(self._bucket, doomed))
        if failures:
            first = failures[0]
            raise StoreUnavailableError(
                f"S3 refused to delete {len(failures)} object(s) under {prefix!r}, "
                f"first {first.name}: {first.code} {first.message}",
                bucket=self._bucket,
            )


def _credentials(settings: StoreSettings) -> tuple[str, str]:
    """The access and secret key; ConfigError naming each one unset, since the code assumes no
    pair (a stack must not run on a well-known default like MinIO's minioadmin)."""
    keys = {"ACCESS_KEY": settings.s3_access_key, "SECRET_KEY": settings.s3_secret_key}
    values = {name: key.get_secret_value() if key else "" for name, key in keys.items()}
    missing = [f"BACKPROPAGATE_STORE__S3_{name}" for name, value in values.items() if not value]
    if missing:
        raise ConfigError(
            f"The S3 store has no default credentials: set {' and '.join(missing)}.",
            hint="Set them to the S3 / MinIO key pair, in the environment or .env (`make env` "
            "writes MinIO's as MINIO_ROOT_USER and MINIO_ROOT_PASSWORD, which "
            "docker-compose.yml passes on), or use BACKPROPAGATE_STORE__BACKEND=local.",
            fields=", ".join(missing),
        )
    return values["ACCESS_KEY"], values["SECRET_KEY"]
