"""``commitfs://REV/PATH``: an fsspec file system over a repository, without FUSE.

    import fsspec, pandas as pd
    with fsspec.open("commitfs://main/labels.csv", repo="s3://bucket/datasets") as f:
        header = f.readline()
    df = pd.read_csv("commitfs://v2/labels.csv", storage_options={"repo": "/data/repo"})
    fs = fsspec.filesystem("commitfs", repo="/data/repo")
    fs.ls("main/train")

Registered under the ``fsspec.specs`` entry point, so pandas, PyArrow,
Hugging Face ``datasets`` and PyTorch code that take fsspec URLs read
commits directly, lazily, on machines where FUSE is not available.

Storage options: ``repo`` (the repository URL; default ``$COMMITFS_REPO``),
``endpoint_url`` (S3), ``cache_dir`` (as ``commitfs mount --cache-dir``:
chunks of non-local repositories are cached, verified, in DIR/chunks;
default the user's commitfs cache directory, ``False`` for no cache).

Paths are ``REV/PATH``: REV is a branch, a tag or a commit id (a branch name
containing '/' is found by trying the shortest prefix that names a
revision).  A branch is resolved the first time an instance meets it and then
pinned, so one process reads one consistent commit (``invalidate_cache()``
re-resolves).  ``ls("")`` lists the branches and tags.  Files open lazily:
``read``/``seek`` fetch only the chunks a range touches (through
repo.reader.FileReader, neighbouring chunks in one ranged request), in blocks
of ``block_size`` (default 2 MiB) read ahead; ``cat_file(path, start, end)``
reads exactly that range.  Symlinks that stay inside the commit are followed;
entries carry the content id (``id``, also ``ukey``) and the commit id.

The file system is read-only.  Repository calls are serialised by a lock
(its object caches are not thread-safe); after a fork (DataLoader workers)
the repository is reopened in the child.
"""

from __future__ import annotations

import os
import posixpath
import threading

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from commitfs.errors import (
    CommitfsError,
    IsADirectoryError_,
    NotADirectoryError_,
    PathNotFoundError,
    RevisionError,
)
from commitfs.model.objects import Kind, TreeEntry
from commitfs.ops import browse
from commitfs.ops.root import open_repository
from commitfs.repo.reader import FileReader
from commitfs.repo.repository import Repository

DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
# Symlink hops followed before giving up (as the kernel's ELOOP limit).
_MAX_LINKS = 40


def _translate(exc: CommitfsError, path: str) -> OSError:
    if isinstance(exc, (PathNotFoundError, RevisionError)):
        return FileNotFoundError(f"{path}: {exc}")
    if isinstance(exc, NotADirectoryError_):
        return NotADirectoryError(f"{path}: {exc}")
    if isinstance(exc, IsADirectoryError_):
        return IsADirectoryError(f"{path}: {exc}")
    return OSError(f"{path}: {exc}")


class CommitfsFileSystem(AbstractFileSystem):
    protocol = "commitfs"
    root_marker = ""

    def __init__(self, repo: str | None = None, endpoint_url: str | None = None, cache_dir=None, **kwargs):
        super().__init__(repo=repo, endpoint_url=endpoint_url, cache_dir=cache_dir, **kwargs)
        url = repo or os.environ.get("COMMITFS_REPO")
        if not url:
            raise ValueError('commitfs:// needs the repository: storage_options={"repo": URL} (or $COMMITFS_REPO)')
        self.repo_url = os.fspath(url)
        self.endpoint_url = endpoint_url
        self.cache_dir = cache_dir
        self._lock = threading.RLock()
        self._repo: Repository | None = None
        self._repo_pid: int | None = None
        self._revs: dict[str, bytes] = {}

    # --- the repository -------------------------------------------------------------
    @property
    def repo(self) -> Repository:
        with self._lock:
            if self._repo is None or self._repo_pid != os.getpid():
                try:
                    repo = open_repository(self.repo_url, cache_dir=self.cache_dir, endpoint_url=self.endpoint_url,
                                           cache_optional=True)
                except CommitfsError as exc:
                    raise OSError(f"commitfs: {exc}") from None
                self._repo, self._repo_pid = repo, os.getpid()
            return self._repo

    def invalidate_cache(self, path=None) -> None:
        with self._lock:
            self._revs.clear()
        super().invalidate_cache(path)

    def _lookup_rev(self, rev: str) -> bytes | None:
        cid = self._revs.get(rev)
        if cid is None:
            try:
                cid = self.repo.resolve(rev)
            except (CommitfsError, ValueError):
                return None
            self._revs[rev] = cid
        return cid

    def _split(self, path: str) -> tuple[str, bytes, str]:
        """'REV/PATH' -> (REV, commit id, PATH)."""
        path = self._strip_protocol(path)
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise FileNotFoundError("commitfs paths start with a revision: commitfs://REV/PATH")
        for i in range(1, len(parts) + 1):
            rev = "/".join(parts[:i])
            cid = self._lookup_rev(rev)
            if cid is not None:
                return rev, cid, "/".join(parts[i:])
        raise FileNotFoundError(f"{path}: no revision (branch, tag or commit id) at its start")

    def _entry(self, cid: bytes, inner: str, follow: bool) -> tuple[str, TreeEntry]:
        """The entry at ``inner`` (following symlinks inside the commit if ``follow``)."""
        for _ in range(_MAX_LINKS):
            entry = browse.lookup_path(self.repo, cid, inner)
            if not follow or entry.kind is not Kind.SYMLINK:
                return inner, entry
            target = entry.target.decode("utf-8", "surrogateescape")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(inner), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise PathNotFoundError(f"{inner} is a symlink to {target}, outside the commit")
            inner = "" if resolved == "." else resolved
        raise PathNotFoundError(f"{inner}: too many levels of symbolic links")

    def _info(self, name: str, entry: TreeEntry, cid: bytes) -> dict:
        if entry.is_dir:
            kind = "directory"
        elif entry.kind is Kind.SYMLINK:
            kind = "other"
        else:
            kind = "file"
        out = {"name": name, "size": 0 if entry.is_dir else entry.size, "type": kind,
               "id": entry.id.hex(), "commit": cid.hex()}
        if entry.is_dir:
            out["tree_size"] = entry.size
        elif entry.kind is Kind.SYMLINK:
            out["islink"] = True
            out["destination"] = entry.target.decode("utf-8", "surrogateescape")
        else:
            out["executable"] = entry.executable
        return out

    # --- fsspec API ------------------------------------------------------------------
    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        with self._lock:
            if not path:
                refs = self.repo.refs
                names = sorted({**refs.tags(), **refs.branches()}.items())
                out = [{"name": n, "size": 0, "type": "directory", "commit": c.hex()} for n, c in names]
            else:
                rev, cid, inner = self._split(path)
                try:
                    inner, entry = self._entry(cid, inner, follow=True)
                    base = f"{rev}/{inner}" if inner else rev
                    if entry.is_dir:
                        out = [self._info(f"{base}/{e.name}", e, cid) for e in self.repo.load_tree(entry.id).entries]
                    else:
                        out = [self._info(base, entry, cid)]
                except CommitfsError as exc:
                    raise _translate(exc, path) from None
        return out if detail else [e["name"] for e in out]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        with self._lock:
            if not path:
                return {"name": "", "size": 0, "type": "directory"}
            rev, cid, inner = self._split(path)
            try:
                entry = browse.lookup_path(self.repo, cid, inner)
            except CommitfsError as exc:
                raise _translate(exc, path) from None
            return self._info(f"{rev}/{inner}" if inner else rev, entry, cid)

    def ukey(self, path):
        """The content id: equal ids mean equal bytes."""
        return self.info(path)["id"]

    def checksum(self, path):
        return int(self.ukey(path)[:16], 16)

    def _reader(self, path: str) -> tuple[FileReader, str]:
        with self._lock:
            rev, cid, inner = self._split(path)
            try:
                inner, entry = self._entry(cid, inner, follow=True)
                if entry.is_dir:
                    raise IsADirectoryError_(f"{inner or '/'} is a directory")
                return FileReader.open(self.repo, entry.id), f"{rev}/{inner}"
            except CommitfsError as exc:
                raise _translate(exc, path) from None

    def _read(self, reader: FileReader, offset: int, size: int) -> bytes:
        with self._lock:
            try:
                return reader.read(offset, size)
            except CommitfsError as exc:
                raise OSError(f"commitfs: {exc}") from None

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise PermissionError(f"commitfs:// is read-only (cannot open {path} with mode {mode!r})")
        reader, name = self._reader(path)
        return CommitfsFile(self, name, reader, block_size=block_size or DEFAULT_BLOCK_SIZE,
                            cache_options=cache_options, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        reader, _ = self._reader(path)
        size = reader.size
        start = 0 if start is None else (max(size + start, 0) if start < 0 else min(start, size))
        end = size if end is None else (max(size + end, 0) if end < 0 else min(end, size))
        if end <= start:
            return b""
        return self._read(reader, start, end - start)

    # read-only: every writing call fails the same way
    def _read_only(self, *args, **kwargs):
        raise PermissionError("commitfs:// is read-only: commit with `commitfs commit` instead")

    mkdir = makedirs = rm = rm_file = _rm = rmdir = mv = cp_file = pipe_file = put_file = touch = _read_only


class CommitfsFile(AbstractBufferedFile):
    """A read-only file whose ranges come from a FileReader."""

    def __init__(self, fs: CommitfsFileSystem, path: str, reader: FileReader, **kwargs):
        self.reader = reader
        kwargs.setdefault("cache_type", "readahead")
        super().__init__(fs, path, mode="rb", size=reader.size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self.fs._read(self.reader, start, end - start)
