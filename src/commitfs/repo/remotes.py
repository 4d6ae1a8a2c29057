"""Remotes: names for other repositories this one pushes to and pulls from.

A remote is a reference ``remotes/<name>`` whose value is a small JSON
object, ``{"url": ..., "endpoint_url": ...}`` (the S3 endpoint only when one
was given), so it lives in the repository itself, works the same in a local
directory and in a bucket, and changes by compare-and-swap like any other
reference: two people adding the same name at once cannot both succeed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from commitfs.errors import CommitfsError, InputError, RefConflictError, RepositoryError
from commitfs.repo.refs import check_ref_name
from commitfs.storage.base import Store

REMOTES = "remotes/"
DEFAULT_REMOTE = "origin"


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint_url: str | None = None

    def encode(self) -> bytes:
        doc = {"url": self.url}
        if self.endpoint_url:
            doc["endpoint_url"] = self.endpoint_url
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, name: str, value: bytes) -> Remote:
        try:
            doc = json.loads(value)
            url = doc["url"]
            endpoint = doc.get("endpoint_url")
            if not isinstance(url, str) or not (endpoint is None or isinstance(endpoint, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RepositoryError(f"remote {name!r} is unreadable (remove it and add it again)") from None
        return cls(name, url, endpoint)


def normalize_url(url: str) -> str:
    """An S3 URL as given; a local path made absolute, so the remote still
    names the same directory when commitfs runs from elsewhere."""
    if "://" in url and not url.startswith("file://"):
        return url
    path = url.removeprefix("file://")
    if path.startswith("~") and os.path.expanduser(path) == path:
        raise InputError(f"cannot find the home directory in {path!r}")
    return os.path.abspath(os.path.expanduser(path))


class Remotes:
    def __init__(self, store: Store):
        self.store = store

    def lookup(self, name: str) -> Remote | None:
        value = self.store.load_ref(REMOTES + check_ref_name(name, "remote"))
        return None if value is None else Remote.decode(name, value)

    def get(self, name: str) -> Remote:
        remote = self.lookup(name)
        if remote is None:
            known = ", ".join(sorted(r.name for r in self.list())) or "none"
            raise CommitfsError(f"no remote named {name!r} (known: {known}; add one with: commitfs remote add NAME URL)")
        return remote

    def list(self) -> list[Remote]:
        return sorted(
            (Remote.decode(n[len(REMOTES):], v) for n, v in self.store.iter_refs(REMOTES)),
            key=lambda r: r.name,
        )

    def add(self, name: str, url: str, endpoint_url: str | None = None) -> Remote:
        remote = Remote(check_ref_name(name, "remote"), normalize_url(url), endpoint_url or None)
        try:
            self.store.save_ref_if_equals(REMOTES + name, remote.encode(), None)
        except RefConflictError:
            existing = self.lookup(name)
            where = f" (it points to {existing.url})" if existing else ""
            raise CommitfsError(f"remote {name!r} already exists{where}; remove it first") from None
        return remote

    def remove(self, name: str) -> Remote:
        value = self.store.load_ref(REMOTES + check_ref_name(name, "remote"))
        if value is None:
            raise CommitfsError(f"no remote named {name!r}")
        try:
            self.store.save_ref_if_equals(REMOTES + name, None, value)
        except RefConflictError:
            raise RefConflictError(f"remote {name!r} changed meanwhile; try again") from None
        return Remote.decode(name, value)
