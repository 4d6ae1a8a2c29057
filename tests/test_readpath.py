"""The read engine's request counts (repo/engine.py, repo/index.py), counted
through a store wrapper: what a cold read or a commit costs in storage requests."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter

import pytest

from core_fixtures import _FreshView, shared_store, write_file
from commitfs.ops.snapshot import commit_directory
from commitfs.errors import StorageError
from commitfs.repo import index as index_mod
from commitfs.repo.repository import CONFIG_KEY, Repository
from commitfs.repo.resident import ResidentReader
from commitfs.storage.faulty import FaultyStore
from commitfs.storage.local import LocalStore

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


def count_verifications(monkeypatch) -> Counter:
    """Count, per chunk id, every verification the read engine makes from now on."""
    from commitfs.repo import engine as engine_mod
    verified = Counter()
    verify = engine_mod.verify_blob

    def counting_verify(oid, loc, stored, base=None):
        verified[oid] += 1
        return verify(oid, loc, stored, base)
    monkeypatch.setattr(engine_mod, "verify_blob", counting_verify)
    return verified


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


def test_a_local_segment_answers_a_few_dedup_questions_by_lookup_then_builds_its_table(
        tmp_path, cache_home, monkeypatch):
    """Over a local store a large segment answers a writer's first questions by
    lookup (two preads each) and builds its table of ids only once they are many
    (Segment.contains): a small commit into a large repository does not wait for
    a table of every id.  The answers are the same either way."""
    monkeypatch.setattr(index_mod, "_WHOLE_LOAD_LIMIT", 256)  # every segment here is "large"
    monkeypatch.setattr(index_mod, "_TABLE_AFTER_MIN", 8)
    rng = random.Random(43)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        _files(tmp_path / "a", rng, 40, size=2000)
        commit_directory(repo, tmp_path / "a", message="first")
    with Repository.open(url) as repo:
        (seg,) = repo.index.segments()
        seg.load_header()
        assert not seg.in_memory and seg.count > 80
        stored = [oid for oid, _ in seg.iter_entries()]
        absent = [rng.randbytes(32) for _ in range(len(stored))]
        asked = [(oid, True) for oid in stored] + [(oid, False) for oid in absent]
        rng.shuffle(asked)
        for k, (oid, want) in enumerate(asked):
            assert seg.contains(oid) is want, k
            assert (seg._ids is None) == (k < 8), k  # the table from the ninth question on


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_commit_to_s3_of_data_already_stored_makes_no_index_request_per_chunk(
        store_url, tmp_path, cache_home, monkeypatch):
    """A commit of data the repository already holds (a re-commit, a copy, a push)
    asks a large segment about every chunk and every answer is yes: that costs the
    one ranged read of its ids for the whole commit, not a lookup per chunk to
    confirm a matching id prefix (two ranged GETs one after another)."""
    monkeypatch.setattr(index_mod, "_WHOLE_LOAD_LIMIT", 256)  # every segment here is "large"
    rng = random.Random(42)
    n = 30
    with Repository.init(store_url) as repo:
        _files(tmp_path / "a", rng, n)
        commit_directory(repo, tmp_path / "a", message="first")
    # The same files under new names, and a few new ones.
    for i in range(n):
        write_file(tmp_path / "b" / f"copy{i:03}.bin", (tmp_path / "a" / f"f{i:03}.bin").read_bytes())
    _files(tmp_path / "b", rng, 3, prefix="new")
    repo = counting_repository(store_url)
    stats = commit_directory(repo, tmp_path / "b", message="second").write
    assert stats.blobs_dedup >= n, stats  # every old chunk was found stored
    segments = len(repo.index.segments())
    index_reads = repo.store.reads_of["index"]
    assert index_reads <= 3 * segments, (index_reads, segments)
    assert index_reads < n
    with Repository.open(store_url) as fresh:
        tree = fresh.load_tree(fresh.load_commit(fresh.resolve("main")).tree)
        assert len(tree.entries) == n + 3
        entry = next(e for e in tree.entries if e.name == "copy007.bin")
        assert bytes(fresh.load_file(entry.id)) == (tmp_path / "a" / "f007.bin").read_bytes()


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


def _read_in_order(store_url, tmp_path, files, commit, order, **options):
    """Read ``order`` (names in train/) through the file-system core over the counting
    S3 store with a chunk cache, one file at a time as a shuffled reader does:
    (pack reads, the directory read-ahead's counters, pack bytes read)."""
    import trio

    from mount_fixtures import fs_of, vfs_read_all
    from test_vfs import lookup_path_ino
    from commitfs.cache import DiskChunkCache

    repo = counting_repository(store_url)
    repo.chunk_cache = DiskChunkCache(tmp_path / "cache")

    async def main():
        async with fs_of(repo, commit, **options) as fs:
            inos = {name: await lookup_path_ino(fs, f"train/{name}") for name in order}
            before, bytes_before = repo.store.reads_of["packs"], repo.store.bytes_read
            for name in order:
                assert await vfs_read_all(fs, inos[name]) == files[name]
                await trio.sleep(0)
            ahead = fs._dir_ahead
            never_read = sum(s.outstanding for s in ahead._sweeps.values())  # swept, and not read
            return (repo.store.reads_of["packs"] - before, (ahead.sweeps, ahead.swept_files, never_read),
                    repo.store.bytes_read - bytes_before)
    return trio.run(main)


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_shuffled_reader_of_a_directory_gets_its_files_swept_in_blocks(store_url, tmp_path, cache_home):
    """A reader of all of a directory's small files in a shuffled order (a DataLoader's)
    jumps at every read: after dirahead.SWEEP_AFTER_JUMPS jumps, a jump fetches the
    aligned block of SWEEP_FILES files around it in one task (coalesced ranged reads
    into the chunk cache), so the reads cost far fewer requests than files (one each
    without: test_a_cold_s3_read_of_a_directorys_small_files_costs_one_request_each)."""
    from commitfs.vfs import dirahead

    n = 128
    files, commit = _dir_repo(store_url, tmp_path, n, size=6_000)
    order = sorted(files)
    random.Random(5).shuffle(order)
    pack_reads, (sweeps, swept, never_read), _ = _read_in_order(store_url, tmp_path, files, commit, order)
    assert sweeps >= 4 and swept >= 4 * (dirahead.SWEEP_FILES // 2), (sweeps, swept)
    assert never_read == 0  # it read them all
    # The first SWEEP_AFTER_JUMPS reads cost one request each, then blocks come whole.
    assert pack_reads <= n // 2, (pack_reads, sweeps, swept)


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_sparse_reader_of_a_directory_gets_a_bounded_overfetch(store_url, tmp_path, cache_home):
    """A shuffled reader of a random eighth of a directory's files would have sweeps
    fetch nearly every file of the directory (each block eight times what it reads):
    swept files not read yet stay within PROBE_FILES + SWEPT_PER_READ x the files read
    (vfs/dirahead.py, "Density"), so what it fetched and never read stays within that
    plus one block, in files and in bytes."""
    from commitfs.vfs import dirahead

    n, size = 1024, 2_000
    files, commit = _dir_repo(store_url, tmp_path, n, size=size)
    order = random.Random(6).sample(sorted(files), n // 8)
    pack_reads, (sweeps, swept, never_read), got = _read_in_order(store_url, tmp_path, files, commit, order)
    bound = dirahead.PROBE_FILES + dirahead.SWEEP_FILES + dirahead.SWEPT_PER_READ * len(order)
    assert sweeps >= 1 and never_read <= swept  # it did sweep
    assert never_read <= bound, (sweeps, swept, never_read, bound)
    wanted = sum(len(files[name]) for name in order)
    # (+ the manifests' reads: up to MANIFEST_BATCH neighbours' per miss, a few hundred bytes each)
    assert got <= wanted + bound * (size + n) + 512 * 1024, (got, wanted)
    assert pack_reads <= len(order) + 8  # and it costs no more requests than without sweeps


def test_a_chunk_in_flight_is_fetched_once_when_read_ahead_and_a_reader_ask_for_it_together(
        tmp_path, cache_home, monkeypatch):
    """The directory read-ahead and a file's reader ask the loader for overlapping
    chunks at the same time (vfs/loader.py, "Chunks in flight"): the chunks the
    first fetch has in a worker thread are fetched and verified once, the second
    waiting for them; so too when the first was cancelled meanwhile (a jump), its
    thread still running; and when the first fails, the second fetches them itself
    and gets the exact bytes, not the other fetch's error."""
    import trio

    from commitfs.vfs.loader import Loader

    data = random.Random(47).randbytes(3 * 1024 * 1024)
    write_file(tmp_path / "src" / "big.bin", data)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        fid = next(e.id for e in repo.load_tree(repo.load_commit(
            commit_directory(repo, tmp_path / "src", message="m").commit_id).tree).entries)
    repo = counting_repository(url)  # every chunk a storage read (FaultyStore: nothing in memory)
    store = repo.store
    manifest = repo.load_manifest(fid)
    ids = list(manifest.chunk_ids)
    assert len(ids) >= 8
    truth = {}
    at = 0
    for cid, size in zip(ids, manifest.chunk_sizes):
        truth[cid] = data[at:at + size]
        at += size
    verified = count_verifications(monkeypatch)
    ahead, mine = ids[0:6], ids[3:8]  # the read-ahead's and the reader's: 3 chunks in common

    async def together(cancel_first: bool):
        loader = Loader(repo, None, 10.0)
        got = {}
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def first():
                with scope:
                    try:
                        got["ahead"] = await loader.chunks(ahead)
                    except StorageError as exc:  # (a read-ahead's errors are only logged)
                        got["ahead_error"] = exc

            nursery.start_soon(first)
            await trio.sleep(0.1)  # its worker thread is in the store's stall
            if cancel_first:
                scope.cancel()  # as a jump cancels a read-ahead: its thread runs on
            got["mine"] = await loader.chunks(mine)
        return got, loader.chunks_joined

    for cancel_first in (False, True):
        verified.clear()
        store.stall_s = 0.5
        before = store.reads_of["packs"]
        got, joined = trio.run(together, cancel_first)
        store.stall_s = 0.0
        assert [bytes(c) for c in got["mine"]] == [truth[c] for c in mine]
        if not cancel_first:
            assert [bytes(c) for c in got["ahead"]] == [truth[c] for c in ahead]
        assert joined == 3, (cancel_first, joined)
        assert set(verified) == set(ahead) | set(mine) and all(n == 1 for n in verified.values()), \
            (cancel_first, sorted(verified.values()))
        # Two ranged reads: the first fetch's run, the reader's chunks past it (main: a
        # third of the reader's in common, or its run over them: overlap re-read).
        assert store.reads_of["packs"] - before == 2, (cancel_first, store.reads_of["packs"] - before)

    # The first fetch fails, after a while: the reader waited for it, then its own
    # fetch decides, and that works.
    slow = [0.5]

    def fail_slowly(key):
        time.sleep(slow.pop() if slow else 0)  # (the first call: while the reader comes)
        return True
    store.fail_on, store.fail_count, store.fail_keys = {"load_range"}, 1, fail_slowly
    got, joined = trio.run(together, False)
    store.fail_on, store.fail_keys = set(), None
    assert "injected failure" in str(got["ahead_error"]) and joined == 3
    assert [bytes(c) for c in got["mine"]] == [truth[c] for c in mine]


def test_a_read_ahead_window_is_fetched_in_pieces_each_ending_its_files_wait(cache_home):
    """A window of small files is fetched in pieces of at most dirahead.PIECE_BYTES,
    all at once (vfs/dirahead.py, "Pieces"): a read of a file in the first piece
    waits for that piece alone, not for the rest of the window (one load of the whole
    window kept every reader of its files waiting for all of it)."""
    import trio

    from commitfs.model.objects import Kind, TreeEntry
    from commitfs.vfs import dirahead

    size = 300 * 1024
    per_piece = dirahead.PIECE_BYTES // size
    assert per_piece >= 2
    entries = [TreeEntry(f"img{i:03}", Kind.FILE, size, bytes([i]) * 32) for i in range(40)]

    class Manifest:
        def __init__(self, fid):
            self.chunk_ids = [b"c" + fid]

    class FakeLoader:
        def __init__(self):
            self.calls: list[tuple[list[bytes], trio.Event]] = []

        async def manifest(self, fid, neighbours=()):
            return Manifest(fid)

        async def chunks(self, ids):
            release = trio.Event()
            self.calls.append((list(ids), release))
            await release.wait()
            return [b"x"] * len(ids)

    async def main():
        loader = FakeLoader()
        async with trio.open_nursery() as nursery:
            ahead = dirahead.DirReadAhead(loader, nursery, 1024 * 1024)
            ahead.on_read(1, entries, 0)
            ahead.on_read(1, entries, 1)  # follows: a window from file 2 on
            with trio.fail_after(5):
                while not loader.calls:
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
            started = ahead.files_started
            assert started >= 2 * per_piece, started
            calls = list(loader.calls)
            # The window's files, in pieces of at most per_piece files, all in flight at once.
            assert len(calls) == -(-started // per_piece), (len(calls), started)
            assert all(len(ids) <= per_piece for ids, _ in calls)
            first, later = entries[2].id, entries[2 + per_piece].id
            wait_first, wait_later = ahead.pending(first), ahead.pending(later)
            assert wait_first is not None and wait_later is not None
            # The piece holding the first file lands (trio may start the pieces' tasks
            # in any order, so it is found by its chunk, not by its place in the list).
            (own,) = [c for c in calls if b"c" + first in c[0]]
            assert b"c" + later not in own[0]
            own[1].set()
            with trio.fail_after(5):
                await wait_first.wait()
            assert not wait_later.is_set() and ahead.pending(later) is wait_later
            assert ahead.pending(first) is None
            for _, release in calls:
                release.set()
            with trio.fail_after(5):
                await wait_later.wait()
            ahead.close()
    trio.run(main)


def test_the_limiter_is_sized_for_the_storage(store_url, cache_home):
    """Many storage calls in flight for S3 (latency-bound), fewer for a local disk."""
    from commitfs.vfs import loader

    Repository.init(store_url).close()
    with Repository.open(store_url) as repo:
        got = loader.Loader(repo, None, 10.0)._limiter.total_tokens
        want = loader.LOCAL_IO_THREADS if repo.is_local else loader.REMOTE_IO_THREADS
        assert got == want and loader.REMOTE_IO_THREADS > loader.LOCAL_IO_THREADS
        assert loader.Loader(repo, 5, 10.0)._limiter.total_tokens == 5


# --- reads from memory: the page cache of a local repository's packs (repo/resident.py) ---
def _resident_pages(path) -> int:
    """How many of a file's pages are in the page cache (mincore(2) on a mapping)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        start = ctypes.c_char.from_buffer(m)  # a private mapping: writable, so ctypes can take its address
        vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec)
        del start  # releases the buffer, so the mapping can close
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec.raw)


def _resident_pages_of_path(path, offset: int, length: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _resident_pages_of(fd, offset, length)
    finally:
        os.close(fd)


def _resident_pages_of(fd: int, offset: int, length: int) -> int:
    """How many pages of [offset, offset + length) of an open file are in the page cache
    (``offset`` page-aligned; mincore(2) on a private mapping, which reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    with mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=offset) as m:
        start = ctypes.c_char.from_buffer(m)
        vec = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(length), vec)
        del start
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec.raw)


def _evict(path) -> None:
    """Drop a file's pages from the page cache, and check that they went.

    POSIX_FADV_DONTNEED skips a page that is busy at that instant (still in a per-CPU
    LRU batch, say), so it is retried, then backed by a global drop of clean pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back first, so the pages can go
        for attempt in range(50):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if _resident_pages(path) == 0:
                return
            if attempt >= 2:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1")
            time.sleep(0.02)
    finally:
        os.close(fd)
    raise AssertionError(f"{path}: {_resident_pages(path)} pages still in the page cache after eviction")



def test_resident_reads_serve_only_what_is_in_memory(tmp_path):
    """The engine's memory path reads a local pack's bytes only if the page cache
    holds them all; anything else is None (the caller goes to a worker thread)."""
    store = LocalStore(tmp_path)
    data = os.urandom(256 * 1024)
    store.save_object("packs/ab/abcdef", data)
    # Not opened yet, but its name and bytes are in memory (just written): opened on the spot.
    first = ResidentReader(store)
    assert bytes(first.load_range("packs/ab/abcdef", 10, 20)) == data[10:30]
    first.close()  # an open descriptor would pin the name in the cache
    # Names dropped from the dentry cache: opening would read a directory, so it is refused.
    fresh = ResidentReader(store)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    assert fresh.load_range("packs/ab/abcdef", 0, 10) is None
    assert store.load_range("packs/ab/abcdef", 0, len(data)) == data
    reader = ResidentReader(store)
    assert bytes(reader.load_range("packs/ab/abcdef", 1000, 5000)) == data[1000:6000]
    # On disk, not in memory: None.  The kernel's readahead of the reads above may still
    # bring pages back after the eviction; an answer is then allowed only if the range is
    # indeed in memory at that moment, and the eviction is tried again.
    path = store.local_path("packs/ab/abcdef")
    for _ in range(10):
        _evict(path)
        got = reader.load_range("packs/ab/abcdef", 100_000, 5000)
        if got is None:
            break
        assert bytes(got) == data[100_000:105_000]
        assert _resident_pages_of_path(path, 100_000 // 4096 * 4096, 8192) > 0, "answered from disk"
    assert got is None
    assert store.load_range("packs/ab/abcdef", 100_000, 5000) == data[100_000:105_000]
    assert reader.load_range("packs/ab/abcdef", len(data) - 10, 20) is None  # past the end: the store answers
    assert reader.load_range("packs/ab/missing", 0, 10) is None
    # A store that is not a local directory (the test wrapper counts every read) has nothing in memory.
    assert ResidentReader(FaultyStore(store)).load_range("packs/ab/abcdef", 0, 3) is None
    reader.close()
    store.close()


def test_resident_reads_from_many_threads_through_few_descriptors_get_the_right_bytes(tmp_path, monkeypatch):
    from commitfs.repo import resident
    monkeypatch.setattr(resident, "MAX_OPEN", 2)  # far fewer descriptors than objects: constant eviction
    store = LocalStore(tmp_path)
    objects = {f"packs/{i:02d}/obj": bytes([i]) * 65536 + os.urandom(4096) for i in range(12)}
    for key, data in objects.items():
        store.save_object(key, data)
    reader = ResidentReader(store)
    before = len(os.listdir("/proc/self/fd"))
    errors, served = [], []

    def read(seed: int) -> None:
        rng = random.Random(seed)
        keys = sorted(objects)
        for _ in range(1500):
            key = rng.choice(keys)
            off = rng.randrange(0, 60000)
            try:
                got = reader.load_range(key, off, 1000)
                if got is not None:
                    served.append(1)
                    if bytes(got) != objects[key][off:off + 1000]:
                        errors.append(f"wrong bytes from {key}")
            except Exception as exc:  # a closed or reused descriptor
                errors.append(repr(exc))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and served
    assert len(reader._fds) <= 2
    reader.close()
    store.close()
    assert len(os.listdir("/proc/self/fd")) <= before  # nothing leaked


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_pack_read_in_order_is_read_ahead_by_a_thread_and_random_reads_are_not(tmp_path):
    """repo/resident.py, "Read-ahead": reads of a pack one after another (a reader
    of a directory's images) have the read-ahead thread bring the pack's next
    bytes into the page cache, where the memory path then finds them; reads at
    random places read nothing ahead; a reader that read one pack to its end has
    the next pack it starts read ahead at once; close stops the thread and
    leaks no descriptor."""
    from commitfs.repo import resident

    store = LocalStore(tmp_path)
    size = 12 * 1024 * 1024
    packs = {key: os.urandom(size) for key in ("packs/aa/first", "packs/bb/second", "packs/cc/random")}
    for key, data in packs.items():
        store.save_object(key, data)
        _evict(store.local_path(key))
    before = len(os.listdir("/proc/self/fd"))
    reader = ResidentReader(store)
    step = 128 * 1024
    far = 6 * 1024 * 1024  # well past anything read, and past the kernel's own read-ahead of it
    key = "packs/aa/first"
    for off in range(0, resident.AHEAD_AFTER * step + 1, step):  # in order: the last read continues twice
        got = reader.load_range(key, off, step)  # None while cold: the stream is followed anyway
        assert got is None or bytes(got) == packs[key][off:off + step]
    assert _wait_for(lambda: reader.ahead.done >= 1), "nothing was read ahead"
    assert _resident_pages_of_path(store.local_path(key), far, 1024 * 1024) == 256
    assert bytes(reader.load_range(key, far, step)) == packs[key][far:far + step]  # from memory now

    # Random reads of another pack: no stream, nothing read ahead.
    done = reader.ahead.done
    rng = random.Random(7)
    key = "packs/cc/random"
    for off in rng.sample(range(0, size - step, 512 * 1024), 12):
        got = reader.load_range(key, off, 4096)
        assert got is None or bytes(got) == packs[key][off:off + 4096]
    time.sleep(0.2)
    assert reader.ahead.done == done

    # The first pack read to its end in order; the second's first read is read ahead at once.
    key = "packs/aa/first"
    for off in range(size - resident.AHEAD_AFTER * step, size, step):
        reader.load_range(key, off, step)
    second = store.local_path("packs/bb/second")
    assert _resident_pages_of_path(second, far, 1024 * 1024) == 0
    got = reader.load_range("packs/bb/second", 0, step)
    assert got is None or bytes(got) == packs["packs/bb/second"][:step]
    assert _wait_for(lambda: _resident_pages_of_path(second, far, 1024 * 1024) == 256), \
        "the next pack was not read ahead"
    # A child forked now (a DataLoader's worker) gets a read-ahead thread of its own.
    _evict(store.local_path("packs/cc/random"))
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            for off in range(0, (resident.AHEAD_AFTER + 1) * step, step):
                reader.load_range("packs/cc/random", off, step)
            ok = _wait_for(lambda: _resident_pages_of_path(store.local_path("packs/cc/random"), far, 4096) == 1)
        finally:
            os._exit(0 if ok else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the forked child read nothing ahead"
    reader.close()
    assert not reader.ahead.running
    store.close()
    assert len(os.listdir("/proc/self/fd")) <= before  # the thread's duplicates closed too


def test_the_read_ahead_thread_ends_when_idle_and_starts_again(tmp_path, monkeypatch):
    """An idle mount holds no read-ahead thread (repo/resident.py): it ends after
    AHEAD_IDLE_S without a range, and the next range starts one again."""
    from commitfs.repo import resident

    monkeypatch.setattr(resident, "AHEAD_IDLE_S", 0.3)
    store = LocalStore(tmp_path)
    store.save_object("packs/aa/one", os.urandom(4 * 1024 * 1024))
    reader = ResidentReader(store)
    step = 64 * 1024

    def read_in_order():
        for off in range(0, (resident.AHEAD_AFTER + 1) * step, step):
            reader.load_range("packs/aa/one", off, step)
        reader._streams.clear()  # the next round is a new stream again

    read_in_order()
    assert reader.ahead.running
    assert _wait_for(lambda: not reader.ahead.running, 5.0), "the idle thread did not end"
    done = reader.ahead.done
    read_in_order()
    assert reader.ahead.running
    assert _wait_for(lambda: reader.ahead.done > done, 5.0)
    reader.close()
    assert not reader.ahead.running
    store.close()


def test_read_ahead_follows_streams_and_bounds_them():
    """The stream rule of repo/resident.py alone: a stream reads ahead after
    AHEAD_AFTER reads continuing it, once per half window; out-of-order reads a
    little behind still continue it; a pack keeps at most AHEAD_STREAMS streams."""
    from commitfs.repo import resident

    streams: list = []
    mib = 1024 * 1024
    assert resident.follow(streams, 0, 100_000) is None  # one read is no stream
    got = [resident.follow(streams, 100_000 * i, 100_000) for i in range(1, resident.AHEAD_AFTER + 1)]
    assert got[:-1] == [None] * (resident.AHEAD_AFTER - 1)
    end = 100_000 * (resident.AHEAD_AFTER + 1)
    assert got[-1] == (end, resident.AHEAD_BYTES)
    assert resident.follow(streams, end - 150_000, 100_000) is None  # a little behind: the same stream, no new range
    assert len(streams) == 1
    # Going on: the next range only once less than half of the window lies ahead.
    off = end
    ranges = []
    while off < end + resident.AHEAD_BYTES:
        r = resident.follow(streams, off, mib)
        if r is not None:
            ranges.append(r)
        off += mib
    assert len(ranges) == 1 and ranges[0][0] == end + resident.AHEAD_BYTES
    assert ranges[0][1] == resident.AHEAD_BYTES // 2 + mib  # up to AHEAD_BYTES past the reader
    # Reads far apart start streams of their own, and no more than AHEAD_STREAMS are kept.
    for i in range(10):
        assert resident.follow(streams, (1000 + 10 * i) * mib, 4096) is None
    assert len(streams) == resident.AHEAD_STREAMS
    # A stream carried over from another pack reads ahead on its first read.
    assert resident.follow([], 4096, 100_000, carried=True) == (104_096, resident.AHEAD_BYTES)
    # Reads behind a stream's end keep it but do not count towards a read-ahead.
    streams = []
    resident.follow(streams, 10 * mib, mib)
    assert all(resident.follow(streams, 11 * mib - 200_000 + i, 1000) is None for i in range(20))
    assert len(streams) == 1 and streams[0].reads == 0


def test_read_ahead_starts_for_readers_in_order_and_almost_never_for_shuffled_ones():
    """The module doc's figures, by the stream rule alone: a shuffled reader of
    200,000 small files in 800 packs starts (almost) no read-ahead; 4 parallel
    workers reading consecutive files slightly out of order start one early in
    every pack, and a single reader in order at its AHEAD_AFTER + 1st read."""
    from commitfs.repo import resident

    rng = random.Random(3)
    size, per = 130_000, 250
    files = [(p, i) for p in range(800) for i in range(per)]
    rng.shuffle(files)
    streams: dict = {}
    started = sum(resident.follow(streams.setdefault(p, []), i * size, size) is not None for p, i in files)
    assert started <= 5, f"a shuffled reader started {started} read-aheads"
    first = {}
    streams = {}
    for p in range(20):
        order = list(range(per))
        for k in range(0, per, 4):
            window = order[k:k + 4]
            rng.shuffle(window)
            order[k:k + 4] = window
        for i in order:
            if resident.follow(streams.setdefault(p, []), i * size, size) is not None:
                first.setdefault(p, i)
    assert len(first) == 20 and max(first.values()) < 40
    streams = []
    got = [resident.follow(streams, i * size, size) for i in range(resident.AHEAD_AFTER + 1)]
    assert got[:-1] == [None] * resident.AHEAD_AFTER and got[-1] is not None


# --- random reads of a large file: recently verified chunks kept (vfs/loader.py) --------
def test_random_small_reads_within_a_few_chunks_fetch_and_verify_each_chunk_once(tmp_path, cache_home,
                                                                               monkeypatch):
    """2,000 random 4 KiB reads (by inode, as the kernel sends them) within a few
    chunks of a large file: each chunk is fetched and hashed once, not once per
    read; the bytes are exact."""
    import trio

    from mount_fixtures import fs_of
    from test_vfs import lookup_path_ino

    data = random.Random(45).randbytes(6 * 1024 * 1024)
    write_file(tmp_path / "src" / "weights.bin", data)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit = commit_directory(repo, tmp_path / "src", message="m").commit_id
    repo = counting_repository(url)  # nothing of it is in memory: every fetch is a storage read
    verified = count_verifications(monkeypatch)

    async def main():
        async with fs_of(repo, commit) as fs:
            ino = await lookup_path_ino(fs, "weights.bin")
            manifest = await fs.loader.manifest(fs._node(ino).entry.id)
            ends = [sum(manifest.chunk_sizes[:i + 1]) for i in range(len(manifest.chunk_sizes))]
            k = 4  # the reads fall in chunks 10..13
            lo, hi = ends[9], ends[9 + k]
            chunks = set(manifest.chunk_ids[10:10 + k])
            verified.clear()
            before = repo.store.reads_of["packs"]
            rng = random.Random(46)
            for _ in range(2000):
                off = rng.randrange(lo, hi - 4096)
                assert await fs.read_inode(ino, off, 4096) == data[off:off + 4096]
            return repo.store.reads_of["packs"] - before, chunks
    pack_reads, chunks = trio.run(main)
    # Each chunk hashed once (besides the few reads' chunks, read-ahead of a read that
    # looked sequential to a stream may hash the chunks after them, once too).
    assert chunks <= set(verified) and all(n == 1 for n in verified.values()), sorted(verified.values())
    assert pack_reads <= 2 * len(chunks), pack_reads


def test_random_reads_publish_their_verified_chunks_and_sequential_reads_do_not(tmp_path, cache_home):
    """A read away from a stream fetches the chunk it overlaps whole; the file system
    hands those verified bytes, at their file offset, to ``page_store`` (the FUSE
    adapter's notify-store) in a worker thread, once per chunk; a sequential reader
    publishes nothing (the kernel's read-ahead has what it reads)."""
    import trio

    from mount_fixtures import fs_of
    from test_vfs import lookup_path_ino

    data = random.Random(47).randbytes(6 * 1024 * 1024)
    write_file(tmp_path / "src" / "weights.bin", data)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit = commit_directory(repo, tmp_path / "src", message="m").commit_id
    stored: list[tuple[int, int, bytes]] = []

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                fs.page_store = lambda ino, off, got: stored.append((ino, off, bytes(got)))
                ino = await lookup_path_ino(fs, "weights.bin")
                for off in range(0, len(data), 128 * 1024):  # a sequential reader
                    assert await fs.read_inode(ino, off, 128 * 1024) == data[off:off + 128 * 1024]
                await trio.sleep(0.2)
                assert stored == []
                manifest = await fs.loader.manifest(fs._node(ino).entry.id)
                ends = [sum(manifest.chunk_sizes[:i + 1]) for i in range(len(manifest.chunk_sizes))]
                fs._close(fs._by_inode.pop(ino))  # a new read state: the next reads are seeks
                # Seeks (more than the back tolerance and a window apart), and one read
                # close after the first (it continues that stream: sequential).
                offs = [ends[5] + 100, ends[40] + 5000, ends[5] + 7000, ends[70] + 1]
                for off in offs:
                    assert await fs.read_inode(ino, off, 4096) == data[off:off + 4096]
                    await trio.sleep(0.05)
                with trio.fail_after(10):
                    while len(stored) < 3:
                        await trio.sleep(0.01)
                await trio.sleep(0.1)
                return ino, ends
    ino, ends = trio.run(main)
    # Chunks 6, 41 and 71, each once; the read close after the first publishes nothing.
    assert sorted(off for _, off, _ in stored) == [ends[5], ends[40], ends[70]], stored
    for i, off, got in stored:
        assert i == ino and got == data[off:off + len(got)] and len(got) >= 1024
