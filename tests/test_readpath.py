"""The read engine's request counts (repo/engine.py, repo/index.py), counted
through a store wrapper: what a cold read or a commit costs in storage requests."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from core_fixtures import _FreshView, shared_store, write_file
from commitfs.ops.snapshot import commit_directory
from commitfs.repo import index as index_mod
from commitfs.repo.repository import CONFIG_KEY, Repository
from commitfs.storage.faulty import FaultyStore

pytestmark = pytest.mark.timeout(120)


class KeyCountingStore(FaultyStore):
    """A FaultyStore that also counts reads per key prefix (``index/``, ``packs/``)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.reads_of: Counter = Counter()

    def _count(self, key: str) -> None:
        with self._lock:
            self.reads_of[key.split("/", 1)[0]] += 1

    def load_range(self, key, offset, length):
        self._count(key)
        return super().load_range(key, offset, length)

    def load_object(self, key):
        self._count(key)
        return super().load_object(key)


def counting_repository(url: str) -> Repository:
    store = KeyCountingStore(shared_store(url))
    return _FreshView(store, json.loads(store.inner.load_object(CONFIG_KEY)))


def _files(root, rng, n, size=24_000, prefix="f"):
    for i in range(n):
        write_file(root / f"{prefix}{i:03}.bin", rng.randbytes(size))


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_commit_to_s3_makes_no_index_request_per_new_chunk(store_url, tmp_path, cache_home, monkeypatch):
    """Dedup questions against an index segment too large to hold whole cost one
    ranged read of its ids for the whole commit (Segment.contains), not two ranged
    reads per new blob one after another (the lookup path: fan-out, then bucket)."""
    monkeypatch.setattr(index_mod, "_WHOLE_LOAD_LIMIT", 256)  # every segment here is "large"
    rng = random.Random(41)
    n = 30
    with Repository.init(store_url) as repo:
        _files(tmp_path / "a", rng, n)
        commit_directory(repo, tmp_path / "a", message="first")
    _files(tmp_path / "b", rng, n, prefix="g")
    repo = counting_repository(store_url)
    commit_directory(repo, tmp_path / "b", message="second")
    segments = len(repo.index.segments())
    index_reads = repo.store.reads_of["index"]
    # header + pack table + ids per segment known before the commit; the new blobs
    # (n chunks, n manifests, a tree) asked nothing each.
    assert index_reads <= 3 * segments, (index_reads, segments)
    assert index_reads < n
    # And the commit is whole and readable.
    with Repository.open(store_url) as fresh:
        head = fresh.resolve("main")
        assert len(fresh.load_tree(fresh.load_commit(head).tree).entries) == n


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_cold_s3_read_of_a_directorys_small_files_costs_one_request_each(store_url, tmp_path, cache_home):
    """Through the file-system core over S3 with a chunk cache, as a mount reads:
    the first file's manifest read brings its directory neighbours' manifests in the
    same ranged read (Loader.manifest), so each further small file costs one
    request, for its chunk; the bytes are exact."""
    import trio

    from mount_fixtures import fs_of, vfs_read_all
    from test_vfs import lookup_path_ino
    from commitfs.cache import DiskChunkCache

    rng = random.Random(43)
    n = 20
    files = {f"img{i:03}.bin": rng.randbytes(30_000 + i) for i in range(n)}
    for name, data in files.items():
        write_file(tmp_path / "src" / "train" / name, data)
    with Repository.init(store_url) as repo:
        commit = commit_directory(repo, tmp_path / "src", message="m").commit_id
    repo = counting_repository(store_url)
    repo.chunk_cache = DiskChunkCache(tmp_path / "cache")

    async def main():
        async with fs_of(repo, commit) as fs:
            inos = {name: await lookup_path_ino(fs, f"train/{name}") for name in files}
            before = repo.store.reads_of["packs"]
            for name, ino in inos.items():
                assert await vfs_read_all(fs, ino) == files[name]
            return repo.store.reads_of["packs"] - before
    pack_reads = trio.run(main)
    assert pack_reads <= n + 1, pack_reads  # one per file's chunk, one for all the manifests
