"""The composition root: how a repository URL becomes a store, a chunk cache
and a repository.  Every front end (the mount daemon, fsspec, the Python API,
the CLI, the web UI) opens repositories here and nowhere else, so the rules
are written once:

* a local repository is read in place and gets no chunk cache (its packs are
  already files on a local disk: a cache would copy them);
* a remote one (S3) gets the verified on-disk chunk cache under
  ``cache_dir/chunks``, ``cache_dir`` defaulting to :func:`cache_root`;
  ``cache_dir=False`` opens it without one;
* ``endpoint_url`` is the only store option a front end passes (S3-compatible
  servers).
"""

from __future__ import annotations

import os
from pathlib import Path

from commitfs.cache.disk import DEFAULT_MAX_BYTES, DiskChunkCache, default_cache_dir
from commitfs.errors import CommitfsError
from commitfs.repo.repository import Repository


def cache_root() -> Path:
    """The root of commitfs's local caches and state (chunks, workspaces,
    logs, stat caches, lineage indexes): ``$XDG_CACHE_HOME/commitfs`` when
    that is an absolute path, else ``~/.cache/commitfs``."""
    return default_cache_dir()


def store_options(endpoint_url: str | None = None) -> dict:
    return {"endpoint_url": endpoint_url} if endpoint_url else {}


def open_repository(url: str | os.PathLike, *, cache_dir: str | os.PathLike | bool | None = None,
                    cache_size: int | None = None, endpoint_url: str | None = None,
                    cache_optional: bool = False) -> Repository:
    """Open the repository at ``url`` with the chunk cache its kind calls for
    (module doc).  ``cache_optional``: a cache that cannot be created (an
    unwritable directory) is done without (slower, not wrong) instead of
    failing the open."""
    repo = Repository.open(os.fspath(url), **store_options(endpoint_url))
    if repo.is_local or cache_dir is False:
        return repo
    root = cache_root() if cache_dir is None or cache_dir is True else Path(cache_dir)
    try:
        repo.chunk_cache = DiskChunkCache(root / "chunks", cache_size or DEFAULT_MAX_BYTES)
    except CommitfsError:
        if not cache_optional:
            repo.close()
            raise
    return repo


def init_repository(url: str | os.PathLike, *, endpoint_url: str | None = None) -> Repository:
    """Create a repository at ``url`` (RepositoryError if one is there)."""
    return Repository.init(os.fspath(url), **store_options(endpoint_url))
