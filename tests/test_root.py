"""The composition root (ops/root.py): the one place a URL becomes a store, a
chunk cache and a repository, and the only one front ends use."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from commitfs.cache import DiskChunkCache
from commitfs.errors import InputError
from commitfs.ops.root import cache_root, init_repository, open_repository

from test_layers import SRC

pytestmark = pytest.mark.timeout(60)


def test_local_repository_is_read_in_place(tmp_path, cache_home):
    init_repository(tmp_path / "repo").close()
    with open_repository(tmp_path / "repo", cache_dir=tmp_path / "c") as repo:
        assert repo.is_local and repo.chunk_cache is None
    assert not (tmp_path / "c").exists()


def test_remote_repository_gets_the_chunk_cache(s3_url, tmp_path, cache_home):
    init_repository(s3_url).close()
    with open_repository(s3_url, cache_dir=tmp_path / "c", cache_size=1 << 20) as repo:
        assert isinstance(repo.chunk_cache, DiskChunkCache)
        assert repo.chunk_cache.path == tmp_path / "c" / "chunks" and repo.chunk_cache.max_bytes == 1 << 20
    with open_repository(s3_url) as repo:  # the default root
        assert repo.chunk_cache.path == cache_root() / "chunks"
    with open_repository(s3_url, cache_dir=False) as repo:
        assert repo.chunk_cache is None
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(InputError):
        open_repository(s3_url, cache_dir=blocker)
    with open_repository(s3_url, cache_dir=blocker, cache_optional=True) as repo:
        assert repo.chunk_cache is None  # slower, not wrong


def test_cache_root_has_one_rule(monkeypatch, tmp_path):
    """The stat cache, the lineage index and the chunk cache agree on the root
    (they used two functions with different rules for a relative $XDG_CACHE_HOME)."""
    from commitfs.ops import lineage_index, statcache

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_root() == Path(os.path.expanduser("~")) / ".cache" / "commitfs"
    assert statcache.cache_root is cache_root and lineage_index.cache_root is cache_root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "commitfs"


FRONT_ENDS = ("fuse/", "cli/", "web/", "vfs/", "api.py", "fsspec.py")


def _calls_outside_root():
    """(file, line, what) for each front-end call that builds a repository or a
    chunk cache itself instead of asking ops/root.py."""
    found = []
    for file in sorted(SRC.rglob("*.py")):
        rel = file.relative_to(SRC).as_posix()
        if not rel.startswith(FRONT_ENDS):
            continue
        for node in ast.walk(ast.parse(file.read_text(), rel)):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("DiskChunkCache", "open_store"):
                found.append((rel, node.lineno, f.id))
            elif (isinstance(f, ast.Attribute) and f.attr in ("open", "init")
                  and isinstance(f.value, ast.Name) and f.value.id in ("Repository", "_Repo")):
                found.append((rel, node.lineno, f"{f.value.id}.{f.attr}"))
    return found


def test_front_ends_open_repositories_only_through_the_root():
    assert _calls_outside_root() == []


def test_storage_protocol_imports_no_backend():
    """storage/base.py is the protocol the backends import: it imports none of them."""
    tree = ast.parse((SRC / "storage" / "base.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in mods if m and m.startswith("commitfs.storage")}
