"""Where datasets live: fsspec filesystems for local paths and URLs, S3 credentials from the environment only
(never from a file that could be committed), and a sink that hashes shards as they are written."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import fsspec


def storage_options_from_env(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` from the environment (never from config files or the manifest).

    S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and an endpoint from RSD_S3_ENDPOINT_URL or
    AWS_ENDPOINT_URL (for seaweedfs/MinIO); unset values fall through to botocore's defaults.
    """
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options: dict[str, Any] = {}
    if key := os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = key
    if secret := os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options["secret"] = secret
    if endpoint := os.environ.get("RSD_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def filesystem(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    options = storage_options if storage_options is not None else storage_options_from_env(uri)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def is_local(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def resolve_relative(uri: str, reference: str) -> str:
    """``reference`` as given if absolute (URL or absolute path), else relative to ``uri``."""
    if "://" in reference or reference.startswith("/"):
        return reference
    if "://" in uri:
        return f"{uri.rstrip('/')}/{reference}"
    return os.path.join(uri, reference)


class HashingSink:
    """A write-only file wrapper that hashes and counts bytes as pyarrow streams them out."""

    def __init__(self, raw: Any):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.sha256.update(chunk)
        self.size += len(chunk)
        self._raw.write(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False
