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
        async with fs_of(repo, commit, dir_read_ahead=False) as fs:  # (tested below)
            inos = {name: await lookup_path_ino(fs, f"train/{name}") for name in files}
            before = repo.store.reads_of["packs"]
            for name, ino in inos.items():
                assert await vfs_read_all(fs, ino) == files[name]
            return repo.store.reads_of["packs"] - before
    pack_reads = trio.run(main)
    assert pack_reads <= n + 1, pack_reads  # one per file's chunk, one for all the manifests


def _dir_repo(store_url, tmp_path, n, size=30_000):
    rng = random.Random(44)
    files = {f"img{i:03}.bin": rng.randbytes(size + i) for i in range(n)}
    for name, data in files.items():
        write_file(tmp_path / "src" / "train" / name, data)
    with Repository.init(store_url) as repo:
        commit = commit_directory(repo, tmp_path / "src", message="m").commit_id
    return files, commit


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_directory_read_ahead_fetches_the_next_small_files_together_and_a_jump_cancels_it(
        store_url, tmp_path, cache_home):
    """A reader of a directory's small files in order from S3: the next files' chunks
    come ahead in coalesced ranged reads into the chunk cache (vfs/dirahead.py), so
    the reads cost far fewer requests than files; a jump elsewhere in the directory
    cancels the window and starts one where the reader went; the bytes are exact."""
    import trio

    from mount_fixtures import fs_of, vfs_read_all
    from test_vfs import lookup_path_ino
    from commitfs.cache import DiskChunkCache
    from commitfs.vfs import dirahead

    n = 40
    files, commit = _dir_repo(store_url, tmp_path, n)
    names = sorted(files)
    repo = counting_repository(store_url)
    repo.chunk_cache = DiskChunkCache(tmp_path / "cache")

    async def main():
        async with fs_of(repo, commit) as fs:
            inos = {name: await lookup_path_ino(fs, f"train/{name}") for name in names}
            before = repo.store.reads_of["packs"]
            for name in names[:24]:
                assert await vfs_read_all(fs, inos[name]) == files[name]
                await trio.sleep(0)  # (a reader does other work between files)
            in_order = repo.store.reads_of["packs"] - before
            ahead = fs._dir_ahead
            assert ahead.jumps == 0 and ahead.files_started >= 20
            # A jump: the window moves to where the reader went.
            started = ahead.files_started
            old = next(iter(ahead._states.values()))
            scopes = list(old.scopes)
            assert scopes
            assert await vfs_read_all(fs, inos[names[2]]) == files[names[2]]  # back to the start
            assert ahead.jumps == 1 and all(s.cancel_called for s in scopes) and not old.scopes
            state = next(iter(ahead._states.values()))
            assert state.first == 2 and state.until <= 2 + 1 + dirahead.AHEAD_FILES
            assert ahead.files_started == started  # one read is no stream: a shuffled reader fetches nothing ahead
            for name in names[24:]:  # everything still exact, wherever it came from
                assert await vfs_read_all(fs, inos[name]) == files[name]
            return in_order
    in_order = trio.run(main)
    # Many files per request (one per file without it: 24).  Not exact: a read that
    # arrives while the read-ahead of its file is still in flight fetches it itself.
    assert in_order <= 24 // 2, in_order
    assert dirahead.AHEAD_FILES >= 16


def test_the_limiter_is_sized_for_the_storage(store_url, cache_home):
    """Many storage calls in flight for S3 (latency-bound), fewer for a local disk."""
    from commitfs.vfs import loader

    Repository.init(store_url).close()
    with Repository.open(store_url) as repo:
        got = loader.Loader(repo, None, 10.0)._limiter.total_tokens
        want = loader.LOCAL_IO_THREADS if repo.is_local else loader.REMOTE_IO_THREADS
        assert got == want and loader.REMOTE_IO_THREADS > loader.LOCAL_IO_THREADS
        assert loader.Loader(repo, 5, 10.0)._limiter.total_tokens == 5
