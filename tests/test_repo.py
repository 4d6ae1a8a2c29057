"""The repo layer: index segments, packs, ranged reads, refs, compression, opening."""

from __future__ import annotations

import json
import random

import pytest

from commitfs.errors import (
    CommitfsError,
    CorruptObjectError,
    ObjectNotFoundError,
    RefConflictError,
    RepositoryError,
    RepositoryNotFoundError,
    RevisionError,
)
from commitfs.cache.disk import DiskChunkCache
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import Commit
from commitfs.ops.browse import lookup_path
from commitfs.ops.snapshot import commit_directory
from commitfs.repo import index as index_mod
from commitfs.repo import pack as pack_mod
from commitfs.repo import engine as engine_mod
from commitfs.repo import repository as repository_mod
from commitfs.repo.index import INDEX_PREFIX, Index, encode_segment, segment_key
from commitfs.repo.pack import BlobKind, Compression, Location, pack_key, parse_pack_table
from commitfs.repo.reader import FileReader
from commitfs.repo.repository import CONFIG_KEY, Repository
from commitfs.storage.url import open_store
from core_fixtures import (
    PACK_ENTRY_SIZE,
    PACK_FOOTER_SIZE,
    assert_fsck_clean,
    faulty_repository,
    pack_bytes,
    reopen,
    write_file,
)


# --- helpers ------------------------------------------------------------------------------
def _entries(rng: random.Random, n: int, pack: bytes | None = None) -> list[tuple[bytes, Location]]:
    pack = pack or rng.randbytes(32)
    out = []
    for i in range(n):
        out.append((rng.randbytes(32), Location(pack, i * 100, 100, 120 + i % 7, BlobKind(i % 3),
                                                 Compression(i % 2))))
    return out


def _absent_ids(rng: random.Random, present: list[bytes]) -> list[bytes]:
    near = [oid[:-1] + bytes([(oid[-1] + 1) % 256]) for oid in present[:50]]
    return [b"\0" * 32, b"\xff" * 32] + [rng.randbytes(32) for _ in range(50)] + \
        [oid for oid in near if oid not in set(present)]


@pytest.fixture
def store(store_url, cache_home):
    s = open_store(store_url)
    yield s
    s.close()


def _commit_tree(repo: Repository, where, files: dict[str, bytes], message: str = "m", **kw):
    for name, data in files.items():
        write_file(where / name, data)
    return commit_directory(repo, where, message=message, **kw)


# --- index segments --------------------------------------------------------------------------
@pytest.mark.parametrize("n,whole", [(1, True), (50, True), (5000, True), (5000, False)])
def test_segment_lookup_present_and_absent(store, monkeypatch, n, whole):
    if not whole:  # force the lazy path: header, fan-out words and one bucket by ranged reads
        monkeypatch.setattr(index_mod, "_WHOLE_LOAD_LIMIT", 0)
    rng = random.Random(n)
    entries = _entries(rng, n) + _entries(rng, n // 3 + 1)  # two packs
    index = Index(store)
    key = index.add_segment(entries)
    assert key is not None and key.startswith(INDEX_PREFIX)
    fresh = Index(store)  # no cached answers
    # Lazy lookups are two requests each: sample them (every bucket is still hit).
    sample = entries if whole else rng.sample(entries, min(len(entries), 60))
    for oid, loc in sample:
        assert fresh.lookup(oid) == loc
    for oid in _absent_ids(rng, [oid for oid, _ in entries])[:None if whole else 15]:
        assert fresh.lookup(oid) is None
    seg = fresh.segments()[0]
    assert seg.count == len(entries)
    assert sorted(oid for oid, _ in seg.iter_entries()) == sorted(oid for oid, _ in entries)


def test_segment_encoding_is_canonical():
    rng = random.Random(1)
    entries = _entries(rng, 300)
    shuffled = list(entries)
    rng.shuffle(shuffled)
    assert encode_segment(entries) == encode_segment(shuffled)
    # Of duplicate ids the first location wins.
    oid, loc = entries[0]
    other = Location(b"\x07" * 32, 1, 2, 3, BlobKind.TREE, Compression.NONE)
    assert encode_segment(entries + [(oid, other)]) == encode_segment(entries)


def test_many_segments_merge_and_stay_findable(store):
    rng = random.Random(2)
    index = Index(store)
    all_entries = []
    for _ in range(20):
        batch = _entries(rng, 10)
        all_entries += batch
        index.add_segment(batch)
    stored = sorted(store.iter_keys(INDEX_PREFIX))
    # 8 segments of one size class merge into one: 20 additions leave 2 merged + 4 small.
    assert len(stored) == 6
    assert sorted(s.key for s in index.segments()) == stored
    fresh = Index(store)
    for oid, loc in all_entries:
        assert fresh.lookup(oid) == loc
    assert sum(s.count for s in fresh.segments()) == len(all_entries)


def test_full_merge_keeps_every_entry(store):
    rng = random.Random(3)
    index = Index(store)
    batches = [_entries(rng, rng.randint(1, 40)) for _ in range(5)]
    dup_oid, dup_loc = batches[0][0]
    batches[1].append((dup_oid, dup_loc))  # one blob indexed twice
    for b in batches:
        index.add_segment(b)
    assert index.merge() is True
    assert len(list(store.iter_keys(INDEX_PREFIX))) == 1
    fresh = Index(store)
    for b in batches:
        for oid, loc in b:
            assert fresh.lookup(oid) == loc
    assert fresh.segments()[0].count == sum(map(len, batches)) - 1
    assert fresh.merge() is False  # nothing left to merge


@pytest.mark.parametrize("whole", [True, False])
def test_lookup_after_a_concurrent_merge_removed_a_segment(store, monkeypatch, whole):
    if not whole:
        monkeypatch.setattr(index_mod, "_WHOLE_LOAD_LIMIT", 0)
    rng = random.Random(4)
    writer = Index(store)
    batches = [_entries(rng, 200) for _ in range(3)]
    for b in batches:
        writer.add_segment(b)
    reader = Index(store)  # lists the three segments
    assert len(reader.segments()) == 3
    reader.segments()[0].load_header()  # one of them already opened
    other = Index(store)
    assert other.merge() is True  # another process merges and removes the three
    assert len(list(store.iter_keys(INDEX_PREFIX))) == 1
    for b in batches:
        for oid, loc in b[::25]:
            assert reader.lookup(oid) == loc
    assert reader.lookup(rng.randbytes(32)) is None


def test_lookup_finds_blobs_another_writer_added_later(store):
    rng = random.Random(5)
    reader = Index(store)
    late = _entries(rng, 10)
    Index(store).add_segment(late)
    # A miss re-lists the segments once, so a reader sees new commits.
    assert reader.lookup(late[0][0]) == late[0][1]
    assert reader.lookup(rng.randbytes(32), refresh=False) is None


def test_corrupt_segment_is_reported(store):
    rng = random.Random(6)
    data = bytearray(encode_segment(_entries(rng, 20)))
    data[60] ^= 0x01
    store.save_object(segment_key(bytes(data)), bytes(data))
    with pytest.raises(CorruptObjectError):
        Index(store).lookup(rng.randbytes(32))


# --- blobs, packs and ranged reads ---------------------------------------------------------
def test_pack_sizes_account_for_every_stored_byte(repo, tmp_path, monkeypatch):
    monkeypatch.setattr(pack_mod, "TARGET_PACK_SIZE", 256 * 1024)
    import commitfs.repo.repository as repository_mod
    monkeypatch.setattr(repository_mod, "TARGET_PACK_SIZE", 256 * 1024)
    rng = random.Random(7)
    result = _commit_tree(repo, tmp_path / "d", {"a.bin": rng.randbytes(1 << 20), "b.bin": rng.randbytes(300_000)})
    w = result.write
    assert w.packs >= 4  # closed at 256 KiB, so 1.3 MiB of chunks make several packs
    assert pack_bytes(repo.url) == w.bytes_new_stored + PACK_ENTRY_SIZE * w.blobs_new + PACK_FOOTER_SIZE * w.packs
    # Every pack is self-describing: its table lists exactly the blobs the index points into it.
    store = repo.store
    fresh = reopen(repo.url)
    listed = 0
    for key in store.iter_keys("packs/"):
        table = parse_pack_table(store.load_object(key))
        listed += len(table)
        for oid, loc in table:
            found = fresh.locate(oid)
            assert pack_key(found.pack) == key and found.offset == loc.offset and found.stored == loc.stored
    assert listed == w.blobs_new
    assert_fsck_clean(repo.url)


def test_writer_dedups_within_and_across_sessions(repo):
    with repo.writer() as w:
        assert w.add(hash_bytes(b"x" * 100), BlobKind.CHUNK, b"x" * 100) is True
        assert w.add(hash_bytes(b"x" * 100), BlobKind.CHUNK, b"x" * 100) is False
    assert (w.stats.blobs_new, w.stats.blobs_dedup) == (1, 1)
    with reopen(repo.url).writer() as w2:
        assert w2.add(hash_bytes(b"x" * 100), BlobKind.CHUNK, b"x" * 100) is False
    assert w2.stats.blobs_new == 0
    assert reopen(repo.url).load_blob(hash_bytes(b"x" * 100)) == b"x" * 100


def test_abandoned_writer_indexes_nothing(repo):
    blob = b"abandoned" * 50
    with pytest.raises(RuntimeError):
        with repo.writer() as w:
            w.add(hash_bytes(blob), BlobKind.CHUNK, blob)
            raise RuntimeError("caller failed")
    with pytest.raises(ObjectNotFoundError):
        reopen(repo.url).load_blob(hash_bytes(blob))


def test_sequential_read_of_a_multi_chunk_file_coalesces(store_url, cache_home, tmp_path):
    Repository.init(store_url).close()
    data = random.Random(8).randbytes(3 << 20)
    with reopen(store_url) as r:
        res = _commit_tree(r, tmp_path / "d", {"big.bin": data, "small.txt": b"hello"})
    repo = faulty_repository(store_url)
    entry = lookup_path(repo, res.commit_id, "big.bin")
    reader = FileReader.open(repo, entry.id)
    nchunks = len(reader.manifest.chunk_ids)
    assert nchunks >= 20
    repo.store.calls.clear()
    step = 1 << 20
    out = b"".join(reader.read(off, step) for off in range(0, len(data), step))
    assert out == data
    # One ranged read per 1 MiB request (the chunks of a file lie together in a
    # pack), plus at most one more where a request straddles two chunks' reads.
    assert repo.store.calls["load_range"] <= 2 * (len(data) // step + 1)
    assert repo.store.calls["load_range"] < nchunks // 3
    repo.store.calls.clear()
    assert b"".join(reader.iter_chunks()) == data
    assert repo.store.calls["load_range"] == 1
    # Chunks far apart in the pack are not fetched with everything in between.
    repo.store.calls.clear()
    first_last = repo.load_chunks([reader.manifest.chunk_ids[0], reader.manifest.chunk_ids[-1]])
    assert b"".join(first_last) == data[:reader.ends[0]] + data[reader.ends[-2]:]
    assert repo.store.calls["load_range"] == 2


def test_reads_at_every_offset(repo, tmp_path):
    data = random.Random(9).randbytes(700_000)
    res = _commit_tree(repo, tmp_path / "d", {"f": data})
    reader = FileReader.open(repo, lookup_path(repo, res.commit_id, "f").id)
    rng = random.Random(10)
    for _ in range(30):
        off = rng.randrange(len(data) + 10)
        size = rng.choice([0, 1, 100, 70_000, 300_000, 2_000_000])
        assert reader.read(off, size) == data[off:off + size]
    boundary = reader.ends[0]
    assert reader.read(boundary - 1, 2) == data[boundary - 1:boundary + 1]


def test_chunk_cache_is_consulted_and_filled(local_repo, tmp_path):
    data = random.Random(11).randbytes(500_000)
    res = _commit_tree(local_repo, tmp_path / "d", {"f": data})

    class DictCache:
        def __init__(self):
            self.d, self.gets, self.puts = {}, 0, 0

        def get(self, oid):
            self.gets += 1
            return self.d.get(oid)

        def put(self, oid, chunk):
            self.puts += 1
            self.d[oid] = chunk

    repo = faulty_repository(local_repo.url)
    repo.chunk_cache = cache = DictCache()
    reader = FileReader.open(repo, lookup_path(repo, res.commit_id, "f").id)
    assert reader.read(0, len(data)) == data
    assert cache.puts == len(reader.manifest.chunk_ids) and set(cache.d) == set(reader.manifest.chunk_ids)
    repo.store.calls.clear()
    assert reader.read(0, len(data)) == data
    assert repo.store.calls["load_range"] == 0  # every chunk came from the cache


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("content", ["random", "csv"])
def test_flipped_pack_byte_raises_corrupt_object_error(local_repo, tmp_path, content):
    if content == "random":
        data = random.Random(12).randbytes(200_000)
    else:
        data = b"".join(f"{i},cat,{i * 7 % 13}\n".encode() for i in range(20_000))
    res = _commit_tree(local_repo, tmp_path / "d", {"f": data})
    manifest = local_repo.load_manifest(lookup_path(local_repo, res.commit_id, "f").id)
    cid = manifest.chunk_ids[0]
    loc = local_repo.locate(cid)
    assert (loc.compression is Compression.ZSTD) == (content == "csv")
    _flip(local_repo.store.local_path(pack_key(loc.pack)), loc.offset + loc.stored // 2)
    repo = reopen(local_repo.url)
    with pytest.raises(CorruptObjectError, match=cid.hex()):
        repo.load_chunks([cid])
    with pytest.raises(CorruptObjectError):
        FileReader.open(repo, lookup_path(repo, res.commit_id, "f").id).read(0, 10)
    # Other chunks still read fine.
    assert repo.load_chunks([manifest.chunk_ids[-1]])[0] == data[-manifest.chunk_sizes[-1]:]


def test_reads_from_memory_give_the_same_verified_bytes_or_none(local_repo, tmp_path):
    """The event loop's reads (``*_from_memory``) answer from memory exactly what the
    blocking reads answer, verified the same way; anything not in memory is None."""
    data = random.Random(14).randbytes(400_000)
    res = _commit_tree(local_repo, tmp_path / "d", {"f": data, "g": b"small"})
    fid = lookup_path(local_repo, res.commit_id, "f").id
    repo = reopen(local_repo.url)
    assert repo.manifest_from_memory(fid) is None  # nothing read yet: the index segment is not loaded
    manifest = repo.load_manifest(fid)
    ids = list(manifest.chunk_ids)
    repo.load_chunks(ids[:1])  # opens the pack; the page cache holds it (just written)
    fresh = reopen(local_repo.url)
    fresh.load_chunks(ids[:1])
    assert fresh.manifest_from_memory(fid) == manifest
    got = fresh.chunks_from_memory(ids)
    assert b"".join(got) == data
    # A chunk cache lives on disk: with one, reads from memory always go to a thread.
    fresh.chunk_cache = DiskChunkCache(tmp_path / "cache", 1 << 20)
    assert fresh.chunks_from_memory(ids) is None
    # Corruption is caught on this path too: an error, never wrong bytes.
    loc = repo.locate(ids[1])
    _flip(repo.store.local_path(pack_key(loc.pack)), loc.offset + 5)
    again = reopen(local_repo.url)
    again.load_chunks(ids[:1])
    with pytest.raises(CorruptObjectError, match=ids[1].hex()):
        again.chunks_from_memory(ids)


@pytest.fixture(params=["compiled", "python"])
def load_file_path(request, monkeypatch):
    """Repository.file_from_memory with its compiled path (commitfs.repo._fastread),
    counting the calls it answers, then without it."""
    answered = []
    if request.param == "python":
        monkeypatch.setattr(engine_mod, "_fastread", None)
    else:
        fast = engine_mod._fastread
        assert fast is not None, "commitfs.repo._fastread is not built (pip install -e .)"

        class Counting:
            @staticmethod
            def load_file(*args):
                got = fast.load_file(*args)
                answered.append(got is not None)
                return got
        monkeypatch.setattr(engine_mod, "_fastread", Counting)
    return request.param, answered


def test_load_file_reads_a_whole_file_in_one_ranged_read_verified(repo, tmp_path, load_file_path):
    """Repository.load_file: a file's chunks lying uncompressed one after another in
    one pack are one ranged read, checked chunk by chunk; anything else (compressed,
    or a chunk stored by an earlier commit) still gives the file's exact bytes.  The
    form from memory (a mount's) gives the same bytes, compiled or not."""
    path_name, answered = load_file_path
    rng = random.Random(15)
    shared = rng.randbytes(300_000)
    first = _commit_tree(repo, tmp_path / "a", {"old.bin": shared})
    csv = b"".join(f"{i},class_{i % 10}\n".encode() for i in range(30_000))
    new = rng.randbytes(200_000)
    solo = rng.randbytes(250_000)
    files = {"new.bin": new, "labels.csv": csv, "mixed.bin": new[:100_000] + shared, "empty": b"", "solo.bin": solo}
    res = _commit_tree(repo, tmp_path / "b", files)
    assert first.commit_id != res.commit_id
    local = repo.store.local_path(CONFIG_KEY) is not None
    for name, data in files.items():
        fid = lookup_path(repo, res.commit_id, name).id
        counted = faulty_repository(repo.url)
        manifest = counted.load_manifest(fid)  # loads the index; the manifest is then kept
        counted.store.calls.clear()
        got = counted.load_file(fid)
        assert bytes(got) == data, name
        if name == "solo.bin":
            assert len(manifest.chunk_ids) > 1
            assert counted.store.calls["load_range"] == 1, counted.store.calls  # every chunk in one read
        if local:  # the form from memory reads the page cache (a remote store's: always None)
            fresh = reopen(repo.url)
            fresh.load_file(fid)  # loads the index segment, and the bytes into the page cache
            answered.clear()
            assert bytes(fresh.file_from_memory(fid)) == data, name
            if path_name == "compiled":
                # The compiled path takes the one-read case (new.bin shares chunks stored
                # with mixed.bin) and leaves the rest to Python.
                assert answered == [name == "solo.bin"], name
    # A flipped byte in any chunk fails the whole file, never wrong bytes; from memory too.
    fid = lookup_path(repo, res.commit_id, "solo.bin").id
    ids = repo.load_manifest(fid).chunk_ids
    locs = [repo.locate(c) for c in ids]  # the one-read case: uncompressed, one after another
    assert all(b.pack == a.pack and b.offset == a.offset + a.stored for a, b in zip(locs, locs[1:]))
    assert all(loc.compression is Compression.NONE for loc in locs)
    loc = locs[-1]
    path = repo.store.local_path(pack_key(loc.pack))
    if path is None:  # S3: the same code reads through the chunk cache (load_chunks), tested there
        return
    _flip(path, loc.offset + 7)
    fresh = reopen(repo.url)
    with pytest.raises(CorruptObjectError, match=ids[-1].hex()):
        fresh.load_file(fid)
    answered.clear()
    with pytest.raises(CorruptObjectError, match=ids[-1].hex()):
        fresh.file_from_memory(fid)
    if path_name == "compiled":
        assert answered == [False]  # the compiled path declined; Python's reported it


def test_compiled_load_file_declines_anything_it_cannot_verify(local_repo, tmp_path):
    """commitfs.repo._fastread returns a file's bytes only when its manifest hashes to
    the file id and every chunk to its id; malformed segments, bytes that do not
    match, an altered manifest: None (Python then decides), never a crash or wrong bytes."""
    fast = engine_mod._fastread
    assert fast is not None, "commitfs.repo._fastread is not built (pip install -e .)"
    rng = random.Random(21)
    data = rng.randbytes(180_000)
    res = _commit_tree(local_repo, tmp_path / "f", {"img.jpg": data})
    fid = lookup_path(local_repo, res.commit_id, "img.jpg").id
    repo = reopen(local_repo.url)
    repo.load_file(fid)  # loads the index segment; the packs are in the page cache
    segments = repo.index.loaded_segments()
    assert segments
    read_into, hasher = repo.reads._read_pack_resident, engine_mod.HASHER
    assert fast.load_file(fid, segments, read_into, hasher) == data
    assert fast.load_file(bytes(32), segments, read_into, hasher) is None  # not in the index
    assert fast.load_file(fid, (), read_into, hasher) is None  # no segment held in memory

    def garbage(pack, offset, buf):
        buf[:] = rng.randbytes(len(buf))
    assert fast.load_file(fid, segments, garbage, hasher) is None

    def failing(pack, offset, buf):
        raise engine_mod.NotInMemory("pack")
    with pytest.raises(engine_mod.NotInMemory):
        fast.load_file(fid, segments, failing, hasher)

    # Segments of random bytes, with fan-out and entry offsets in and out of range.
    data_seg, packs, fan, base, bits = segments[0]
    for _ in range(300):
        blob = bytearray(data_seg)
        for _ in range(rng.randrange(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        seg = (bytes(blob) if rng.random() < 0.7 else rng.randbytes(rng.randrange(0, 400)), packs,
               rng.choice([fan, base, 0, rng.randrange(-5, len(blob) + 50)]),
               rng.choice([base, fan, rng.randrange(-5, len(blob) + 50)]),
               rng.choice([bits, 0, 1, 24, 32, 33, -1]))
        got = fast.load_file(fid, (seg,), read_into, hasher)
        assert got is None or got == data
    for bad in [(data_seg,), (data_seg, packs, fan, base), ("x", packs, fan, base, bits),
                (data_seg, [], fan, base, bits)]:
        assert fast.load_file(fid, (bad,), read_into, hasher) is None

    # A flipped byte in the manifest: the compiled path declines, Python reports it.
    loc = repo.locate(fid)
    _flip(repo.store.local_path(pack_key(loc.pack)), loc.offset + 9)
    fresh = reopen(local_repo.url)
    with pytest.raises(CorruptObjectError):
        fresh.load_file(fid)
    assert fast.load_file(fid, fresh.index.loaded_segments(), fresh.reads._read_pack_resident, hasher) is None
    with pytest.raises(CorruptObjectError):
        fresh.file_from_memory(fid)


def test_truncated_pack_raises_corrupt_object_error(local_repo, tmp_path):
    data = random.Random(13).randbytes(300_000)
    res = _commit_tree(local_repo, tmp_path / "d", {"f": data})
    manifest = local_repo.load_manifest(lookup_path(local_repo, res.commit_id, "f").id)
    loc = local_repo.locate(manifest.chunk_ids[-1])
    path = local_repo.store.local_path(pack_key(loc.pack))
    with open(path, "r+b") as f:
        f.truncate(loc.offset + 10)
    with pytest.raises(CorruptObjectError, match="truncated"):
        reopen(local_repo.url).load_chunks([manifest.chunk_ids[-1]])


def test_compression_applies_to_csv_not_random_bytes(repo, tmp_path):
    csv = b"id,label,score\n" + b"".join(f"{i},class_{i % 10},{(i * 37) % 1000 / 1000:.3f}\n".encode()
                                          for i in range(40_000))
    noise = random.Random(14).randbytes(600_000)
    res = _commit_tree(repo, tmp_path / "d", {"labels.csv": csv, "weights.bin": noise})
    repo2 = reopen(repo.url)

    def chunk_locations(name):
        m = repo2.load_manifest(lookup_path(repo2, res.commit_id, name).id)
        return [repo2.locate(c) for c in m.chunk_ids]

    csv_locs, noise_locs = chunk_locations("labels.csv"), chunk_locations("weights.bin")
    assert all(loc.compression is Compression.ZSTD for loc in csv_locs)
    assert sum(loc.stored for loc in csv_locs) < 0.5 * len(csv)
    assert all(loc.compression is Compression.NONE and loc.stored == loc.raw for loc in noise_locs)
    assert res.write.bytes_new_stored < len(noise) + 0.5 * len(csv)
    for name, data in [("labels.csv", csv), ("weights.bin", noise)]:
        reader = FileReader.open(repo2, lookup_path(repo2, res.commit_id, name).id)
        assert reader.read(0, len(data)) == data


def test_unknown_blob_is_not_found(repo):
    with pytest.raises(ObjectNotFoundError):
        repo.load_blob(hash_bytes(b"never stored"))
    with pytest.raises(RevisionError):
        repo.load_commit(hash_bytes(b"no such commit"))


# --- references -------------------------------------------------------------------------------
def test_branch_compare_and_swap_between_two_writers(repo):
    a, b = reopen(repo.url), reopen(repo.url)
    c1, c2, c3 = (hash_bytes(bytes([i])) for i in range(3))
    a.refs.set_branch_if_equals("main", c1, None)
    with pytest.raises(RefConflictError, match="already exists"):
        b.refs.set_branch_if_equals("main", c2, None)
    seen_by_a = a.refs.lookup_branch("main")
    seen_by_b = b.refs.lookup_branch("main")
    b.refs.set_branch_if_equals("main", c2, seen_by_b)
    with pytest.raises(RefConflictError, match="moved meanwhile"):
        a.refs.set_branch_if_equals("main", c3, seen_by_a)  # A's view is stale
    assert reopen(repo.url).refs.lookup_branch("main") == c2
    a.refs.set_branch_if_equals("main", None, c2)  # delete, by CAS too
    assert a.refs.lookup_branch("main") is None and a.refs.branches() == {}


def test_commit_loses_a_race_and_its_retry_stores_nothing_twice(repo, tmp_path):
    rng = random.Random(15)
    _commit_tree(repo, tmp_path / "base", {"f": b"base"})
    other = reopen(repo.url)
    raced = {}

    def meanwhile(progress):
        if not raced:  # after A read the head, B moves the branch
            raced["b"] = _commit_tree(other, tmp_path / "b", {"g": rng.randbytes(1000)}, "B").commit_id

    with pytest.raises(RefConflictError, match="moved"):
        _commit_tree(repo, tmp_path / "a", {"h": rng.randbytes(300_000)}, "A", progress=meanwhile)
    assert reopen(repo.url).refs.lookup_branch("main") == raced["b"]
    assert_fsck_clean(repo.url)
    retry = commit_directory(reopen(repo.url), tmp_path / "a", message="A again")
    assert retry.created and retry.write.blobs_new == 0  # everything was stored and indexed
    repo2 = reopen(repo.url)
    assert repo2.load_commit(retry.commit_id).parents == (raced["b"],)
    assert_fsck_clean(repo.url)


def test_tags_never_move(repo):
    c1, c2 = hash_bytes(b"1"), hash_bytes(b"2")
    repo.refs.create_tag("v1", c1)
    with pytest.raises(RevisionError, match="never move"):
        reopen(repo.url).refs.create_tag("v1", c2)
    assert reopen(repo.url).refs.lookup_tag("v1") == c1
    assert repo.refs.tags() == {"v1": c1}


@pytest.mark.parametrize("name", ["", "-x", "a..b", "a//b", "/a", "a/", "a.lock", "a~1", "a b", "a:b", "ä"])
def test_invalid_ref_names(local_repo, name):
    with pytest.raises(CommitfsError, match="invalid"):
        local_repo.refs.set_branch_if_equals(name, hash_bytes(b"x"), None)
    with pytest.raises(CommitfsError, match="invalid"):
        local_repo.refs.create_tag(name, hash_bytes(b"x"))
    assert local_repo.refs.branches() == {} and local_repo.refs.tags() == {}


# --- revisions -------------------------------------------------------------------------------
def _chain(repo: Repository, n: int, branch: str = "main") -> list[bytes]:
    """n commits on ``branch`` (empty trees are fine for resolve), oldest first."""
    out, parent = [], None
    for i in range(n):
        cid = repo.save_commit(Commit(hash_bytes(b"tree"), (parent,) if parent else (), "t", i, f"c{i}"))
        repo.refs.set_branch_if_equals(branch, cid, parent)
        out.append(cid)
        parent = cid
    return out


def test_every_revision_form(repo):
    c = _chain(repo, 4)
    repo.refs.create_tag("v0", c[0])
    repo.refs.set_branch_if_equals("feature/x", c[1], None)
    r = reopen(repo.url)
    assert r.resolve("main") == c[3]
    assert r.resolve("v0") == c[0]
    assert r.resolve("feature/x") == c[1]
    assert r.resolve(c[2].hex()) == c[2]
    assert r.resolve(c[2].hex().upper()) == c[2]
    assert r.resolve(c[2].hex()[:12]) == c[2]
    assert r.resolve("main~1") == c[2]
    assert r.resolve("main~") == c[2]
    assert r.resolve("main~3") == c[0]
    assert r.resolve("main~1~2") == c[0]
    assert r.resolve("main~0") == c[3]
    assert r.resolve(f"{c[3].hex()[:10]}~2") == c[1]
    assert r.resolve("feature/x~1") == c[0]
    with pytest.raises(RevisionError, match="not that long"):
        r.resolve("main~4")
    with pytest.raises(RevisionError, match="not that long"):
        r.resolve("v0~")
    for bad in ["nope", "abc", "0" * 64, "main~x", "~1", "", "..", "../x", "a/../../config", "/etc", "a//b"]:
        with pytest.raises(RevisionError):
            r.resolve(bad)


def test_branch_shadows_tag_shadows_commit_prefix(repo):
    c = _chain(repo, 2)
    repo.refs.create_tag("main", c[0])  # a tag named like the branch: the branch wins
    assert reopen(repo.url).resolve("main") == c[1]
    prefix = c[0].hex()[:8]
    repo.refs.create_tag(prefix, c[1])  # a tag named like a commit prefix: the tag wins
    assert reopen(repo.url).resolve(prefix) == c[1]


def test_ambiguous_prefix(repo):
    # Find two commits whose ids share 4 hex digits (birthday bound: ~300 tries).
    seen: dict[str, Commit] = {}
    for i in range(100_000):
        commit = Commit(hash_bytes(b"t"), (), "t", i, "m")
        p = commit.id.hex()[:4]
        if p in seen:
            pair = (seen[p], commit)
            break
        seen[p] = commit
    ids = [repo.save_commit(c) for c in pair]
    prefix = ids[0].hex()[:4]
    assert ids[1].hex().startswith(prefix)
    with pytest.raises(RevisionError, match="ambiguous"):
        reopen(repo.url).resolve(prefix)
    # A longer prefix that tells them apart resolves.
    n = next(i for i in range(5, 64) if ids[0].hex()[:i] != ids[1].hex()[:i])
    assert reopen(repo.url).resolve(ids[0].hex()[:n]) == ids[0]
    assert reopen(repo.url).resolve(ids[1].hex()[:n]) == ids[1]


# --- opening and the format marker -------------------------------------------------------------
def test_init_twice_is_refused(repo):
    with pytest.raises(RepositoryError, match="already"):
        Repository.init(repo.url)


def test_open_missing_repository(tmp_path, cache_home):
    with pytest.raises(RepositoryNotFoundError, match="commitfs init"):
        Repository.open(str(tmp_path / "nowhere"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("not a repository")
    with pytest.raises(RepositoryNotFoundError):
        Repository.open(str(tmp_path / "plain"))


def test_open_unknown_url_scheme(cache_home):
    with pytest.raises(RepositoryError, match="scheme"):
        Repository.open("gs://bucket/x")


def test_unknown_format_version_is_refused(repo):
    config = json.loads(repo.store.load_object(CONFIG_KEY))
    config["version"] = 99
    repo.store.save_object(CONFIG_KEY, json.dumps(config).encode())
    with pytest.raises(RepositoryError, match="format version 99.*version 1"):
        Repository.open(repo.url)


@pytest.mark.parametrize("config,match", [
    ({"format": "commitfs", "version": 4, "id": "x"}, "format version 4.*version 1"),
    ({"format": "commitfs", "version": "1", "id": "x"}, "format version"),
    ({"format": "restic", "version": 1, "id": "x"}, "not a commitfs repository"),
    ({"version": 1}, "unreadable"),
    ([1, 2], "unreadable"),
    (b"\x00garbage", "unreadable"),
])
def test_format_marker_is_checked(local_repo, config, match):
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    local_repo.store.save_object(CONFIG_KEY, raw)
    with pytest.raises(RepositoryError, match=match):
        Repository.open(local_repo.url)


def test_file_url_opens_local_repository(local_repo):
    with Repository.open("file://" + local_repo.url) as r:
        assert r.id == local_repo.id and r.is_local


def test_nested_ref_names_are_refused_clearly(store_url, cache_home, tmp_path):
    from commitfs.errors import CommitfsError
    from commitfs.model.objects import Commit

    repo = Repository.init(store_url)
    cid = repo.save_commit(Commit(b"\0" * 32, (), "t", 1, "m"))
    repo.refs.set_branch_if_equals("feature", cid, None)
    with pytest.raises(CommitfsError, match="cannot exist beside branch 'feature'"):
        repo.refs.set_branch_if_equals("feature/x", cid, None)
    repo.refs.create_tag("v1/rc", cid)
    with pytest.raises(CommitfsError, match="cannot exist beside tag 'v1/rc'"):
        repo.refs.create_tag("v1", cid)
    assert set(repo.refs.branches()) == {"feature"}
    assert set(repo.refs.tags()) == {"v1/rc"}


def test_a_merge_that_fails_in_the_store_fails_no_segment_addition(store, monkeypatch):
    """A merge is an optimisation of segments already saved: a store that fails while it
    saves the merged segment (or a full temporary disk) leaves every input segment in
    place and every entry findable, and the addition that triggered it succeeds."""
    from commitfs.errors import StorageError
    rng = random.Random(5)
    index = Index(store)
    calls = []

    def failing_save_from(key, f, size):
        calls.append(key)
        raise StorageError("the store said no")

    monkeypatch.setattr(store, "save_object_from", failing_save_from)
    all_entries = []
    for _ in range(10):  # 8 of one size class: a merge is due (and fails) at the 8th
        batch = _entries(rng, 10)
        all_entries += batch
        assert index.add_segment(batch) is not None
    assert calls, "no merge was attempted: the test would prove nothing"
    assert len(list(store.iter_keys(INDEX_PREFIX))) == 10  # no input removed
    fresh = Index(store)
    for oid, loc in all_entries:
        assert fresh.lookup(oid) == loc


def test_the_batched_add_of_one_chunk_files_stores_what_adds_one_by_one_store(tmp_path, cache_home, monkeypatch):
    """BlobWriter.add_one_chunk_files (a commit's small files, a batch at a time) is
    ``add`` of each chunk and then of its manifest, inlined: the same packs byte for
    byte (so the same pack ids), the same index, stats and checkpoints, with blobs
    already indexed, repeated within the batch, compressed or not, and packs closing
    and checkpoints falling in the middle of a batch."""
    from commitfs.model.objects import FileManifest
    from commitfs.repo.repository import BlobWriter

    monkeypatch.setattr(repository_mod, "TARGET_PACK_SIZE", 20_000)
    monkeypatch.setattr(BlobWriter, "META_PACK_SIZE", 3_000)
    rng = random.Random(21)
    contents = [rng.randbytes(rng.choice([1, 64, 700, 2000])) for _ in range(250)]
    contents += [b"compressible " * 40, contents[3], contents[7], b"x" * 30]  # repeats within the batch
    pre = [contents[10], contents[11]]  # indexed beforehand: chunk and manifest
    pre_chunk_only = contents[12]  # its chunk indexed, its manifest not

    def prepared(data):
        cid = hash_bytes(data)
        stored, comp = pack_mod.maybe_compress(data, BlobKind.CHUNK)
        mdata = FileManifest((cid,), (len(data),)).encode()
        return (cid, data, stored, comp, hash_bytes(mdata), mdata)

    items = [prepared(c) for c in contents]
    results = []
    for name in ("one-by-one", "batched"):
        url = str(tmp_path / name)
        Repository.init(url).close()
        with Repository.open(url) as r:
            with r.writer() as w:
                for data in pre:
                    w.add_manifest(FileManifest((hash_bytes(data),), (len(data),)))
                    w.add(hash_bytes(data), BlobKind.CHUNK, data)
                w.add(hash_bytes(pre_chunk_only), BlobKind.CHUNK, pre_chunk_only)
        with Repository.open(url) as r:
            w = BlobWriter(r, checkpoint_blobs=70)
            if name == "one-by-one":
                for cid, chunk, stored, comp, fid, mdata in items:
                    new = w.add(cid, BlobKind.CHUNK, chunk, stored=stored, compression=comp)
                    w.add(fid, BlobKind.MANIFEST, mdata, stored=mdata, compression=Compression.NONE, above_new=new)
            else:
                for i in range(0, len(items), 64):
                    w.add_one_chunk_files(items[i:i + 64])
            w.finish()
            stats = w.stats
        packs = sorted(p.name for p in (tmp_path / name / "packs").rglob("*") if p.is_file())
        segments = sorted(p.name for p in (tmp_path / name / "index").rglob("*") if p.is_file())
        with Repository.open(url) as r:
            for data, (cid, *_rest, fid, mdata) in zip(contents, items):
                assert r.load_blob(cid) == data and r.load_blob(fid) == mdata
        results.append((stats, packs, segments))
    assert results[0] == results[1]
    stats = results[1][0]
    # pre's chunks and manifests, pre_chunk_only's chunk, the repeats' (and the random
    # one-byte files' repeats)
    assert stats.blobs_dedup >= 2 * 2 + 1 + 2 * 2 and stats.blobs_new + stats.blobs_dedup == 2 * len(items)
