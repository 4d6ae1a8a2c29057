"""From a repository URL to the store it names: a path, ``file://`` or ``s3://``.

Kept out of storage/base.py so that the protocol module imports no backend
(the backends import the protocol: one direction only)."""

from __future__ import annotations

from commitfs.errors import RepositoryError
from commitfs.storage.base import Store


def open_store(url: str, **options) -> Store:
    """Open the store a repository URL names: a path, ``file://`` or ``s3://``."""
    if url.startswith("s3://"):
        from commitfs.storage.s3 import S3Store

        return S3Store.from_url(url, **options)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise RepositoryError(f"unsupported repository URL scheme: {url!r} (use a path or s3://BUCKET/PREFIX)")
    from commitfs.storage.local import LocalStore

    return LocalStore(url)
