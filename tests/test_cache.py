"""The on-disk chunk cache: verification, LRU eviction, sharing between processes, full disks."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from commitfs.cache import DiskChunkCache, default_cache_dir, parse_size
from commitfs.errors import InputError
from commitfs.model.ids import hash_bytes
from core_fixtures import mounted_tmpfs
from commitfs.ops.browse import lookup_path
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.reader import FileReader
from commitfs.repo.repository import Repository
from commitfs.storage.faulty import FaultyStore
from commitfs.storage.local import LocalStore


def bundle_of(cache: DiskChunkCache, oid: bytes) -> Path:
    """The bundle file holding a chunk write-behind wrote (module doc of cache/disk.py)."""
    index, names = cache._bidx
    return cache.path / "v1" / "bundles" / names[index[hash(oid)] >> 64]


def chunk(i: int, size: int = 10_000) -> tuple[bytes, bytes]:
    data = (f"chunk {i} ".encode() * (size // 8 + 1))[:size]
    return hash_bytes(data), data


def test_put_get_roundtrip_and_miss(tmp_path):
    cache = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    oid, data = chunk(1)
    assert cache.get(oid) is None
    cache.put(oid, data)
    assert oid in cache
    assert cache.get(oid) == data
    assert (cache.stats.hits, cache.stats.misses, cache.stats.puts) == (1, 1, 1)
    # A second cache object on the same directory (a remount) sees it.
    assert DiskChunkCache(tmp_path / "c", max_bytes=1 << 20).get(oid) == data


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_chunk_is_a_miss_and_removed(tmp_path, damage):
    cache = DiskChunkCache(tmp_path, max_bytes=1 << 20)
    oid, data = chunk(2)
    cache.put(oid, data)
    path = cache._file(oid)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-1]
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    assert cache.get(oid) is None
    assert not path.exists()
    assert cache.stats.corrupt == 1
    cache.put(oid, data)
    assert cache.get(oid) == data


def test_eviction_keeps_recently_used(tmp_path):
    cap = 200_000
    cache = DiskChunkCache(tmp_path, max_bytes=cap)
    items = [chunk(i) for i in range(15)]  # 150 kB: under the cap
    now = time.time()
    for age, (oid, data) in enumerate(items):
        cache.put(oid, data)
        # Older items have older mtimes; item 0 is made the most recent "hit".
        t = now - 1000 + age
        os.utime(cache._file(oid), (t, t))
    os.utime(cache._file(items[0][0]), (now, now))
    assert cache.stats.evictions == 0
    extra = [chunk(i) for i in range(100, 110)]  # +100 kB: over the cap
    for oid, data in extra:
        cache.put(oid, data)
    assert cache.stats.evictions >= 1
    assert cache.size() <= cap
    assert cache.get(items[0][0]) == items[0][1]  # recently used: kept
    assert cache.get(items[1][0]) is None  # least recently used: gone
    assert cache.get(extra[-1][0]) == extra[-1][1]  # just written: kept


def test_write_behind_serves_pending_chunks_from_memory_and_writes_them_all(tmp_path, monkeypatch):
    """A write-behind put returns before the chunk's file exists; the chunk is served
    (and counted a hit) from memory until written; beyond ``max_pending`` bytes a put
    writes in the caller's thread; close writes everything pending."""
    import threading

    cache = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    gate = threading.Event()
    real = cache._put_bundle

    def held(batch):
        # Only the writer thread writes bundles; the caller's own write (a chunk file)
        # goes through.
        assert gate.wait(60)
        return real(batch)
    monkeypatch.setattr(cache, "_put_bundle", held)
    cache.write_behind(max_pending=25_000)  # two 10 kB chunks wait, the third is written at once
    chunks = [chunk(i) for i in range(3)]
    for oid, data in chunks[:2]:
        cache.put(oid, data)
        assert not cache._file(oid).exists()  # the writer is held: only memory has it
        assert oid in cache and cache.get(oid) == data
    assert cache.stats.hits == 2 and cache.stats.puts == 0
    cache.put(*chunks[2])  # past max_pending: written in the caller's thread, not held
    assert cache._file(chunks[2][0]).exists() and cache.stats.puts == 1
    gate.set()
    cache.close()
    assert cache.stats.puts == 3 and cache._pending is None
    fresh = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    assert all(fresh.get(oid) == data for oid, data in chunks)
    # Closed: puts write in the caller's thread again.
    oid, data = chunk(9)
    cache.put(oid, data)
    assert cache._file(oid).exists()



def test_a_writer_close_gave_up_on_never_touches_the_next_writers_chunks(tmp_path, monkeypatch):
    """close waits a bounded time for a writer stuck on the disk, then gives up on
    what it still holds; write-behind turned on again gets a writer of its own.
    When the stuck one comes back it must neither fail (its queue was cleared) nor
    take the new writer's chunks: every chunk put after the restart is written."""
    import threading

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    cache = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    stuck_oid, stuck_data = chunk(100)
    entered, gate = threading.Event(), threading.Event()
    real = cache._put_bundle

    def held(batch):
        if any(oid == stuck_oid for oid, _ in batch):
            entered.set()
            assert gate.wait(60)
        return real(batch)
    monkeypatch.setattr(cache, "_put_bundle", held)
    cache.write_behind(max_pending=1 << 20)
    cache.put(stuck_oid, stuck_data)
    cache.put(*chunk(101))  # queued behind the stuck one: given up on at close
    assert entered.wait(60)
    cache.close(timeout_s=0.05)  # the writer is stuck: close gives up on it
    cache.write_behind(max_pending=1 << 20)
    later = [chunk(i) for i in range(5)]
    for oid, data in later:
        cache.put(oid, data)
    gate.set()  # the stuck writer comes back
    cache.close()
    for t in threading.enumerate():
        if t.name == "commitfs-cache-writer":
            t.join(60)
    assert not errors
    fresh = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    assert all(fresh.get(oid) == data for oid, data in later)
    assert fresh.get(stuck_oid) == stuck_data  # (its write finished after all)

def test_chunk_larger_than_a_quarter_of_the_cap_is_not_cached(tmp_path):
    cache = DiskChunkCache(tmp_path, max_bytes=30_000)
    oid, data = chunk(3, 10_000)
    cache.put(oid, data)
    assert cache.get(oid) is None


def _hammer(path: str, seed: int, rounds: int, behind: bool = False) -> int:
    """Put and get overlapping chunks (with write-behind: into bundles); return the
    number of wrong bytes served."""
    cache = DiskChunkCache(path, max_bytes=300_000)
    if behind:
        cache.write_behind()
    wrong = 0
    for r in range(rounds):
        oid, data = chunk((r * 7 + seed) % 60)
        got = cache.get(oid)
        if got is None:
            cache.put(oid, data)
        elif got != data:
            wrong += 1
        if behind and r % 10 == 9:
            assert cache.flush(60)  # (written, so that evictions and other processes meet them)
    cache.close()
    return wrong


@pytest.mark.parametrize("behind", [False, True], ids=["chunk-files", "bundles"])
def test_two_processes_share_a_small_cache(tmp_path, behind):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        wrong = pool.starmap(_hammer, [(str(tmp_path), s, 400, behind) for s in range(3)])
    assert wrong == [0, 0, 0]
    cache = DiskChunkCache(tmp_path, max_bytes=300_000)
    # Approximate cap: each process may add an eighth of the cap (and a chunk, or a
    # bundle of at most a 16th of the cap) unseen by the others.
    assert cache.size() <= 300_000 + 3 * (300_000 // 8 + (300_000 // 16 if behind else 10_000))
    assert not list((tmp_path / "v1" / "tmp").iterdir())
    for i in range(60):
        oid, data = chunk(i)
        assert cache.get(oid) in (None, data)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "tiny", "256k") as where:
        yield where


def test_full_disk_evicts_instead_of_failing(tiny_tmpfs):
    # The cap (10 MB) is far above what the disk holds (256 kB): only ENOSPC stops writes.
    cache = DiskChunkCache(tiny_tmpfs / "c", max_bytes=10_000_000)
    items = [chunk(i, 30_000) for i in range(40)]  # 1.2 MB
    for oid, data in items:
        cache.put(oid, data)  # never raises
    assert cache.stats.evictions >= 1
    served = [cache.get(oid) for oid, _ in items]
    assert all(got in (None, data) for got, (_, data) in zip(served, items))
    assert served[-1] == items[-1][1]  # the newest chunk made it after eviction


def test_repository_reads_through_the_cache(tmp_path):
    """A cached chunk is served even when the store fails; a fresh cache object reuses it."""
    repo = Repository.init(str(tmp_path / "repo"))
    payload = os.urandom(3 * 1024 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(payload)
    cid = commit_directory(repo, src, message="one").commit_id
    fid = lookup_path(repo, cid, "big.bin").id

    def open_cached(cache):
        store = FaultyStore(LocalStore(tmp_path / "repo"))
        return store, Repository(store, repo.config, cache)

    cache = DiskChunkCache(tmp_path / "cache", max_bytes=64 << 20)
    store, r1 = open_cached(cache)
    reader = FileReader.open(r1, fid)
    assert reader.read(0, len(payload)) == payload
    assert cache.stats.puts == len(reader.manifest.chunk_ids)
    store2, r2 = open_cached(DiskChunkCache(tmp_path / "cache", max_bytes=64 << 20))
    reader2 = FileReader(r2, reader.manifest)
    store2.fail_on = {"load_range"}
    assert reader2.read(0, len(payload)) == payload
    assert store2.calls["load_range"] == 0


def test_parse_size_and_default_dir(monkeypatch, tmp_path):
    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_size("64kb") == 64 << 10
    for bad in ("", "ten", "5X", "-1G"):
        with pytest.raises(InputError):
            parse_size(bad)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "commitfs"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "commitfs"


@pytest.fixture
def opens(monkeypatch):
    """The paths os.open is called with, of chunk files of the cache (its v1/XX/ directories)."""
    calls: list[str] = []
    real = os.open

    def counting(path, *args, **kwargs):
        parts = str(path).split(os.sep)
        if len(parts) >= 3 and parts[-3] == "v1" and (len(parts[-2]) == 2 or parts[-2] == "bundles"):
            calls.append(str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", counting)
    return calls


def test_write_behind_serves_recent_chunks_and_known_misses_without_opening_files(tmp_path, opens):
    """With write-behind, chunks just written are served from memory, and a miss of a
    chunk the cache's listing lacks costs no open; both stay bounded (recent_bytes)."""
    cache = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    cache.write_behind(recent_bytes=25_000)  # the last two 10 kB chunks stay in memory
    items = [chunk(i) for i in range(5)]
    for oid, data in items:
        cache.put(oid, data)
    assert cache.flush(60)
    assert all(bundle_of(cache, oid).exists() for oid, _ in items)
    assert not any(cache._file(oid).exists() for oid, _ in items)  # bundles, not a file each
    assert cache._listing is not None
    del opens[:]
    for oid, data in items[-2:]:
        assert cache.get(oid) == data
        assert cache.get_from_memory(oid) == data
    absent, _ = chunk(99)
    assert cache.get(absent) is None and cache.get_from_memory(absent) is None
    assert opens == []
    assert cache.stats.listed_misses == 1 and cache.stats.memory_hits == 4
    assert cache.get_from_memory(items[0][0]) is None  # dropped from memory (the cap): on disk
    assert cache.get(items[0][0]) == items[0][1]
    assert len(opens) == 1
    assert sum(len(d) for d in cache._recent.values()) <= 25_000
    cache.close()
    # Without write-behind every get looks at the disk again (other processes' chunks).
    del opens[:]
    assert cache.get(absent) is None and len(opens) == 1


def test_listing_follows_own_writes_and_deletions_and_finds_others_at_a_scan(tmp_path, opens):
    """The listing is this process's scan plus its own puts minus its own deletions: a
    chunk put after the scan is found; a chunk another process put after it is a miss
    (best effort) until the next scan; one another process deleted is a miss, once opened."""
    cache = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    cache.put(*chunk(1))  # there before write-behind's scan
    cache.write_behind(recent_bytes=0)  # nothing kept in memory: gets go to the files
    assert cache.flush(60)
    oid2, data2 = chunk(2)
    cache.put(oid2, data2)
    assert cache.flush(60)
    assert cache.get(chunk(1)[0]) == chunk(1)[1]  # found by the scan
    assert cache.get(oid2) == data2  # our own put
    other = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)  # another process
    oid3, data3 = chunk(3)
    other.put(oid3, data3)
    del opens[:]
    assert cache.get(oid3) is None and opens == []  # not seen until a scan
    bundle_of(cache, oid2).unlink()
    assert cache.get(oid2) is None and len(opens) == 1  # listed, gone: opened once...
    assert cache.get(oid2) is None and len(opens) == 1  # ...and then known to be absent
    cache.evict(target=1 << 20)  # an eviction scans (and deletes nothing here)
    assert cache.get(oid3) == data3
    # A chunk of ours that fails its check is deleted and unlisted.
    path = cache._file(oid3)
    path.write_bytes(b"x" + path.read_bytes()[1:])
    assert cache.get(oid3) is None and cache.stats.corrupt == 1
    del opens[:]
    assert cache.get(oid3) is None and opens == []
    cache.close()


def test_listing_is_dropped_for_a_cache_of_too_many_files(tmp_path, opens, monkeypatch):
    """The bundle index holds at most LISTING_MAX chunks and the writer writes chunk
    files past it; a cache of more than LISTING_MAX chunk files keeps no listing
    (bounded memory either way): misses open, every chunk is still served."""
    import commitfs.cache.disk as disk

    monkeypatch.setattr(disk, "LISTING_MAX", 3)
    cache = DiskChunkCache(tmp_path / "c", max_bytes=1 << 20)
    cache.write_behind(recent_bytes=0)
    for i in range(8):
        cache.put(*chunk(i))
    assert cache.flush(60)
    assert len(cache._bidx[0]) <= 3
    assert sum(cache._file(chunk(i)[0]).exists() for i in range(8)) >= 5
    assert cache._listing is None
    del opens[:]
    assert cache.get(chunk(99)[0]) is None and len(opens) == 1
    assert all(cache.get(chunk(i)[0]) == chunk(i)[1] for i in range(8))
    cache.close()


def test_engine_reads_chunks_a_cache_holds_in_memory_without_a_thread(tmp_path):
    """The read engine's from-memory forms (the mount's event loop) answer from the
    chunk cache's memory (write-behind's recent chunks); a chunk it lacks makes
    them None (a worker thread then reads it), with no store request either way."""
    repo = Repository.init(str(tmp_path / "repo"))
    payload = os.urandom(600_000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(payload)
    cid = commit_directory(repo, src, message="one").commit_id
    fid = lookup_path(repo, cid, "f.bin").id
    store = FaultyStore(LocalStore(tmp_path / "repo"))
    cache = DiskChunkCache(tmp_path / "cache", max_bytes=64 << 20)
    cache.write_behind()
    r = Repository(store, repo.config, cache)
    manifest = r.load_manifest(fid)
    ids = list(manifest.chunk_ids)
    assert len(ids) > 1
    assert r.chunks_from_memory(ids) is None
    assert r.file_from_memory(fid, manifest) is None
    assert b"".join(r.load_chunks(ids[:-1])) == payload[:sum(manifest.chunk_sizes[:-1])]
    assert r.chunks_from_memory(ids) is None  # the last one is not in memory
    assert r.chunks_from_memory(ids[:-1], manifest.chunk_sizes[:-1]) is not None
    r.load_chunks(ids[-1:])
    assert cache.flush(60)  # written: now served from write-behind's recent chunks
    calls = store.calls["load_range"]
    assert b"".join(r.chunks_from_memory(ids)) == payload
    assert bytes(r.file_from_memory(fid, manifest)) == payload
    assert store.calls["load_range"] == calls
    cache.close()
    assert r.chunks_from_memory(ids) is None  # (write-behind off: nothing in memory)


def bundled(tmp_path: Path, items: list[tuple[bytes, bytes]], monkeypatch) -> DiskChunkCache:
    """A cache whose write-behind wrote ``items`` as one bundle (its writer lingers
    until all of them wait), closed."""
    import commitfs.cache.disk as disk

    monkeypatch.setattr(disk, "BUNDLE_MIN_BYTES", sum(len(data) for _, data in items))
    monkeypatch.setattr(disk, "BUNDLE_LINGER_S", 60.0)
    cache = DiskChunkCache(tmp_path / "c", max_bytes=64 << 20)  # (a bundle holds up to a 16th of it)
    cache.write_behind()
    for oid, data in items:
        cache.put(oid, data)
    assert cache.flush(60)
    cache.close()
    return cache


def test_write_behind_writes_its_chunks_as_few_bundles_another_process_reads(tmp_path, monkeypatch):
    """A cold read's chunks cost a file create each no more: write-behind writes what
    waits as one bundle (cache/disk.py, "Bundles"), and another cache object on the
    directory (another mount) finds every chunk in them by their headers, verified."""
    items = [chunk(i) for i in range(60)]
    cache = bundled(tmp_path, items, monkeypatch)
    bundles = list((tmp_path / "c" / "v1" / "bundles").iterdir())
    assert len(bundles) == 1
    assert not any(cache._file(oid).exists() for oid, _ in items)
    assert cache.stats.puts == 60
    other = DiskChunkCache(tmp_path / "c", max_bytes=8 << 20)
    assert all(other.get(oid) == data for oid, data in items)
    assert other.stats.hits == 60 and other.stats.corrupt == 0
    assert other.size() == sum(p.stat().st_size for p in bundles)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_bundle_never_serves_wrong_bytes(tmp_path, damage, monkeypatch):
    """A bundle whose chunk bytes were flipped serves that chunk as a miss and is
    removed; one cut short (a crash before its bytes reached the disk) or with a bad
    header is not indexed: its chunks are misses, fetched and cached again."""
    items = [chunk(i) for i in range(5)]
    bundled(tmp_path, items, monkeypatch)
    (bundle,) = (tmp_path / "c" / "v1" / "bundles").iterdir()
    raw = bytearray(bundle.read_bytes())
    if damage == "flip":
        raw[-5_000] ^= 0x01  # in the last chunk
    elif damage == "truncate":
        raw = raw[:-1]
    else:
        raw[0] ^= 0xFF
    bundle.write_bytes(bytes(raw))
    other = DiskChunkCache(tmp_path / "c", max_bytes=8 << 20)
    got = [other.get(oid) for oid, _ in items]
    assert all(g is None or g == data for g, (_, data) in zip(got, items))
    assert got[-1] is None
    if damage == "flip":
        assert got[:-1] == [data for _, data in items[:-1]]  # (read before the last one failed)
        assert other.stats.corrupt == 1 and not bundle.exists()
    else:
        assert got == [None] * 5
    other.write_behind()
    for oid, data in items:
        other.put(oid, data)
    assert other.flush(60)
    assert all(other.get(oid) == data for oid, data in items)
    other.close()


def test_write_behind_bundles_are_evicted_whole_and_the_cap_holds(tmp_path):
    """Eviction counts and deletes bundles as units, least recently used first, and
    the index forgets what it deleted: every chunk served is right, the cap holds."""
    cap = 400_000
    cache = DiskChunkCache(tmp_path / "c", max_bytes=cap)
    cache.write_behind(recent_bytes=0)
    items = [chunk(i) for i in range(100)]  # 1 MB: over the cap, in batches
    for n in range(0, 100, 10):
        for oid, data in items[n:n + 10]:
            cache.put(oid, data)
        assert cache.flush(60)
    assert cache.stats.evictions >= 1
    assert cache.size() <= cap
    got = [cache.get(oid) for oid, _ in items]
    assert all(g is None or g == data for g, (_, data) in zip(got, items))
    assert got[-1] == items[-1][1]  # the newest bundle is kept
    assert sum(g is not None for g in got) * 10_000 <= cap
    cache.close()


def test_an_index_entry_naming_another_chunks_place_is_a_miss_not_damage(tmp_path, monkeypatch):
    """The bundle index keys chunks by the hash of their ids: were two to collide, the
    one looked up would find the other's bytes. That is a miss (its entry dropped), not
    damage: the bundle, whose header names the other chunk there, stays."""
    items = [chunk(i) for i in range(3)]
    bundled(tmp_path, items, monkeypatch)
    other = DiskChunkCache(tmp_path / "c", max_bytes=8 << 20)
    index, _ = other._load_bundles()
    stranger, _ = chunk(99)
    index[hash(stranger)] = index[hash(items[1][0])]  # a collision, made by hand
    assert other.get(stranger) is None
    assert other.stats.corrupt == 0 and hash(stranger) not in index
    assert all(other.get(oid) == data for oid, data in items)  # the bundle is intact


def test_a_cache_without_write_behind_finds_new_bundles_reading_their_headers_alone(tmp_path, monkeypatch):
    """A reader without write-behind (the Python API's, beside a mount writing the
    same cache) finds another process's new bundle on a miss, reading that bundle's
    header alone; it looks at most once per _BUNDLE_RECHECK_S, so a busy writer
    does not make every miss list the cache."""
    import commitfs.cache.disk as disk

    def write(items):
        monkeypatch.setattr(disk, "BUNDLE_MIN_BYTES", sum(len(data) for _, data in items))
        writer = DiskChunkCache(tmp_path / "c", max_bytes=64 << 20)
        writer.write_behind()
        for oid, data in items:
            writer.put(oid, data)
        assert writer.flush(60)
        writer.close()

    first = [chunk(i) for i in range(3)]
    bundled(tmp_path, first, monkeypatch)
    reader = DiskChunkCache(tmp_path / "c", max_bytes=8 << 20)
    assert all(reader.get(oid) == data for oid, data in first)
    headers: list[str] = []
    real = reader._read_header
    monkeypatch.setattr(reader, "_read_header", lambda name: headers.append(name) or real(name))
    monkeypatch.setattr(disk, "_BUNDLE_RECHECK_S", 0.0)
    later = [chunk(i) for i in range(10, 13)]
    write(later)
    assert all(reader.get(oid) == data for oid, data in later)
    assert len(headers) == 1  # the new bundle's
    monkeypatch.setattr(disk, "_BUNDLE_RECHECK_S", 3600.0)
    last = [chunk(i) for i in range(20, 23)]
    write(last)
    assert reader.get(last[0][0]) is None  # looked less than an hour ago: not yet seen
    assert len(headers) == 1
