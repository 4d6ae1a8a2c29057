"""Property tests for issue 20: random bytes, truncations and crafted objects
through every decoder and every reader, and a store that cuts its answers.

The contract each test holds: a decoder returns an object whose canonical
encoding is exactly the input, or raises DecodeError (a ValueError); a reader
returns exactly the right bytes, or raises a CommitfsError.  Never another
exception (a traceback for the user), never other bytes.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from core_fixtures import faulty_repository, reopen, shared_store, write_file
from commitfs.errors import CommitfsError, CorruptObjectError, StorageError
from commitfs.model import objects as objects_mod
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import Commit, DecodeError, FileManifest, Kind, Tree, TreeEntry, symlink_entry
from commitfs.model.splittree import IndexEntry, TreeIndex, decode_tree_node
from commitfs.ops.browse import lookup_path, walk
from commitfs.ops.fsck import fsck
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.index import Index, encode_segment, segment_key
from commitfs.repo.pack import BlobKind, Compression, Location, parse_pack_table
from commitfs.repo.reader import FileReader
from commitfs.repo.refs import decode_ref
from commitfs.repo.remotes import Remote
from commitfs.repo.repository import Repository

pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.binary(min_size=32, max_size=32)


def _valid_samples() -> list[bytes]:
    e = [TreeEntry("a", Kind.FILE, 5, b"\1" * 32), TreeEntry("d", Kind.DIR, 9, b"\2" * 32),
         symlink_entry("l", b"target"), TreeEntry("x", Kind.EXEC, 300_000, b"\3" * 32)]
    return [
        Tree.build(e).encode(),
        FileManifest((b"\4" * 32, b"\5" * 32), (100, 2_000_000)).encode(),
        Commit(b"\6" * 32, (b"\7" * 32,), "a", 1, "m\u00e9", {"k": "v"}).encode(),
        TreeIndex(2, (IndexEntry("a", 70, 300, b"\10" * 32), IndexEntry("m\u00e9", 1, 2_000_000, b"\11" * 32))).encode(),
    ]


def mutated(data: bytes, rnd: random.Random) -> bytes:
    """A truncation, a bit flip, an insertion or a deletion of ``data``."""
    roll = rnd.randrange(4)
    i = rnd.randrange(len(data) + 1)
    if roll == 0:
        return data[:i]
    if roll == 1 and data:
        i = min(i, len(data) - 1)
        return data[:i] + bytes([data[i] ^ (1 << rnd.randrange(8))]) + data[i + 1:]
    if roll == 2:
        return data[:i] + bytes([rnd.randrange(256)]) + data[i:]
    return data[:i] + data[i + 1:]


def _decodes_canonically_or_refuses(decode, data: bytes) -> None:
    try:
        obj = decode(data)
    except DecodeError:
        return
    assert obj.encode() == data  # accepted: only its own canonical encoding


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 2**32))
def test_every_object_decoder_on_random_and_mutated_bytes(raw, seed):
    rnd = random.Random(seed)
    samples = [raw, *(mutated(v, rnd) for v in _valid_samples())]
    for data in samples:
        for decode in (Tree.decode, FileManifest.decode, Commit.decode, TreeIndex.decode, decode_tree_node):
            _decodes_canonically_or_refuses(decode, data)
        # The compiled tree decoder decides nothing: same entries, or None.
        if objects_mod._fastdecode is not None:
            fast = objects_mod._fastdecode.tree_entries(data, TreeEntry, objects_mod._KIND_BY_BYTE, Kind.SYMLINK)
            if fast is not None:
                assert Tree(fast).encode() == data


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 2**32))
def test_refs_remotes_and_pack_tables_on_random_bytes(raw, seed):
    rnd = random.Random(seed)
    good = (b"\x8a" * 32).hex().encode() + b"\n"
    for value in (raw, mutated(good, rnd)):
        try:
            cid = decode_ref("branches/x", value)
        except CommitfsError:
            pass
        else:
            assert value in (cid.hex().encode(), cid.hex().encode() + b"\n")
        try:
            Remote.decode("origin", value)
        except CommitfsError:
            pass
    pack = bytes(40) + b"".join([b"\1" * 32, bytes([1, 0]), (0).to_bytes(4, "little")])  # any bytes
    for data in (raw, mutated(pack, rnd)):
        try:
            entries = parse_pack_table(data)
        except ValueError:
            continue
        for _, loc in entries:  # what it accepts lies inside the pack
            assert 0 <= loc.offset and loc.offset + loc.stored <= len(data)


@FUZZ
@given(st.lists(st.tuples(ids, st.integers(0, 2**31), st.integers(1, 2**20)), min_size=1, max_size=20),
       st.integers(0, 2**32))
def test_index_segments_crafted_or_mutated_answer_or_refuse(tmp_path, entries, seed):
    """A segment with a valid checksum but crafted content (a hostile repository can
    make any): lookups answer, say "not here", or raise CommitfsError."""
    rnd = random.Random(seed)
    locs = [(oid, Location(b"\x09" * 32, off, n, n, BlobKind.CHUNK, Compression.NONE)) for oid, off, n in entries]
    data = encode_segment(locs)
    body = mutated(data[:-32], rnd)
    crafted = body + hash_bytes(body)  # re-checksummed: only the content is hostile
    store = shared_store(str(tmp_path / f"seg-{seed}"))
    store.save_object(segment_key(crafted), crafted)
    index = Index(store)
    for oid in [oid for oid, _ in locs[:5]] + [bytes(rnd.randbytes(32))]:
        try:
            index.lookup(oid)
        except CommitfsError:
            pass


# --- readers -----------------------------------------------------------------------------
@pytest.fixture
def fuzz_repo(tmp_path, cache_home):
    src = tmp_path / "src"
    rng = random.Random(5)
    write_file(src / "small.txt", b"hello\n")
    write_file(src / "big.bin", rng.randbytes(3 << 20))
    write_file(src / "d" / "mid.bin", rng.randbytes(200_000))
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        cid = commit_directory(repo, src, message="m").commit_id
    return url, cid, src


@FUZZ
@given(st.lists(st.integers(1, 1 << 21), min_size=1, max_size=8), st.integers(0, 2**32))
def test_readers_of_crafted_manifests_serve_the_right_bytes_or_fail(fuzz_repo, sizes, seed):
    """A manifest naming real chunks with random declared sizes: every reader gives
    exactly the chunks' bytes (when the sizes are right) or CorruptObjectError."""
    url, cid, src = fuzz_repo
    r = reopen(url)
    real = r.load_manifest(lookup_path(r, cid, "big.bin").id)
    rnd = random.Random(seed)
    picks = [rnd.randrange(len(real.chunk_ids)) for _ in sizes]
    chunk_ids = tuple(real.chunk_ids[i] for i in picks)
    declared = tuple(real.chunk_sizes[i] if rnd.random() < 0.5 else s for i, s in zip(picks, sizes))
    truth = b"".join(r.load_chunks(list(chunk_ids)))
    honest = declared == tuple(real.chunk_sizes[i] for i in picks)
    m = FileManifest(chunk_ids, declared)
    data = m.encode()
    fid = hash_bytes(data)
    with r.writer() as w:
        w.add(fid, BlobKind.MANIFEST, data)
    r = reopen(url)
    reads = [lambda: r.load_file(fid), lambda: b"".join(FileReader.open(r, fid).iter_chunks())]
    for read in reads:  # whole-file readers: the bytes, or an error
        try:
            got = read()
        except CorruptObjectError:
            assert not honest
            continue
        assert honest and bytes(got) == truth
    # A ranged read (the mount's): the chunks it touches, placed at the declared
    # offsets, only if each of them is as long as declared; else an error.
    off = rnd.randrange(sum(declared))
    reader = FileReader.open(r, fid)
    first, last = reader.chunk_range(off, 1000)
    touched = range(first, last)
    ok = all(declared[i] == real.chunk_sizes[picks[i]] for i in touched)
    try:
        got = reader.read(off, 1000)
    except CorruptObjectError:
        assert not ok
    else:
        assert ok
        placed = b"".join(r.load_chunks([chunk_ids[i] for i in touched]))
        start = reader.chunk_start(first)
        assert got == placed[off - start:off - start + 1000]


@FUZZ
@given(st.integers(0, 2**32), st.floats(0.1, 0.9))
def test_a_store_that_cuts_its_answers_gives_errors_never_wrong_bytes(fuzz_repo, seed, probability):
    """FaultyStore.cut: reads return a random prefix of the truth (a response cut
    short that a backend failed to notice): readers never pass on such bytes."""
    url, cid, src = fuzz_repo
    truth = {p: (src / p).read_bytes() for p in ("small.txt", "big.bin", "d/mid.bin")}
    r = faulty_repository(url)
    r.store.cut_probability, r.store.cut_seed = probability, seed
    rnd = random.Random(seed)
    for _ in range(6):
        path = rnd.choice(sorted(truth))
        try:
            entry = lookup_path(r, cid, path)
            if rnd.random() < 0.5:
                got = bytes(r.load_file(entry.id))
                assert got == truth[path]
            else:
                off = rnd.randrange(len(truth[path]))
                assert FileReader.open(r, entry.id).read(off, 70_000) == truth[path][off:off + 70_000]
        except CommitfsError:
            pass
    report = fsck(reopen(url), read_data=True)
    assert report.problems == []  # nothing was changed in storage


def test_walk_and_fsck_of_random_tree_dags(tmp_path, cache_home):
    """Random DAGs of shared trees (names, sizes, depths): walks agree with fsck's
    count of distinct trees and never exceed the bound; fsck reports no problem."""
    rng = random.Random(11)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        empty = FileManifest((), ()).encode()
        fid = hash_bytes(empty)
        trees: list[bytes] = []
        with repo.writer() as w:
            w.add(fid, BlobKind.MANIFEST, empty)
            for level in range(12):
                entries = {f"f{level}": TreeEntry(f"f{level}", Kind.FILE, 0, fid)}
                for k in range(rng.randrange(0, 4)):
                    if trees:
                        name = f"d{k}"
                        entries[name] = TreeEntry(name, Kind.DIR, 0, rng.choice(trees))
                trees.append(w.add_tree(Tree.build(entries.values())))
        root = trees[-1]
        cid = repo.save_commit(Commit(root, (), "t", 0, "dag", {}))
        repo.refs.set_branch_if_equals("main", cid, None)
    r = reopen(url)
    items = list(walk(r, cid))
    assert len(items) == len(set(i.path for i in items))
    assert fsck(r).problems == []
