"""Issue 21: re-commits whose cost follows the change, and bytes_stored that
counts everything a commit adds.

The stat cache keeps each directory's tree id with its rows (ops/statcache.py);
these tests count what a re-commit does (trees encoded, blobs offered to the
writer, files read, objects stored) and hold every reused tree id to the id a
commit without any cache computes.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil

import pytest

from commitfs.model.objects import Tree
from commitfs.ops.snapshot import commit_directory
from commitfs.ops.statcache import cache_root
from commitfs.repo.repository import BlobWriter, Repository
from core_fixtures import age_tree, assert_fsck_clean, cli_ok, describe, reopen, store_state, write_file
from commitfs.ops.checkout import checkout

pytestmark = pytest.mark.timeout(120)


class Counts:
    def __init__(self, monkeypatch):
        self.encodes = 0
        self.adds = 0
        encode, add = Tree.encode, BlobWriter.add

        def counting_encode(tree, *a, **kw):
            self.encodes += 1
            return encode(tree, *a, **kw)

        def counting_add(writer, *a, **kw):
            self.adds += 1
            return add(writer, *a, **kw)

        monkeypatch.setattr(Tree, "encode", counting_encode)
        monkeypatch.setattr(BlobWriter, "add", counting_add)

    def reset(self):
        self.encodes = self.adds = 0


def _tree(root, rng, dirs=12, files=8):
    """Nested directories: d0..d{dirs-1}, every third one inside the previous."""
    parent = root
    for i in range(dirs):
        d = (parent if i % 3 else root) / f"d{i}"
        for j in range(files):
            write_file(d / f"f{j}.bin", rng.randbytes(rng.choice([0, 7, 300, 5000])), executable=(j == 3))
        parent = d
    os.symlink("d0/f1.bin", root / "link")
    (root / "empty").mkdir()


def _fresh_tree_id(tmp_path, src) -> bytes:
    """The tree id of ``src`` committed to a new repository with no stat cache."""
    saved = cache_root().with_name("commitfs-saved")
    if cache_root().exists():
        shutil.move(cache_root(), saved)
    try:
        url = str(tmp_path / f"fresh-{random.getrandbits(32):08x}")
        other = Repository.init(url)
        try:
            return commit_directory(other, src, message="fresh", allow_empty=True).tree_id
        finally:
            other.close()
    finally:
        shutil.rmtree(cache_root(), ignore_errors=True)
        if saved.exists():
            shutil.move(saved, cache_root())


def test_no_change_recommit_reads_and_encodes_nothing(local_repo, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _tree(src, random.Random(1))
    age_tree(src)
    first = commit_directory(local_repo, src, message="v1")
    counts = Counts(monkeypatch)
    before = store_state(local_repo.url)
    again = commit_directory(local_repo, src, message="v2", allow_empty=True)
    assert again.tree_id == first.tree_id
    assert (again.files_read, again.bytes_read) == (0, 0)
    assert counts.encodes == 0  # no tree built, not even the root's
    assert counts.adds == 0  # nothing offered to the writer (not even to be deduplicated)
    assert (again.write.blobs_new, again.write.blobs_dedup, again.write.packs) == (0, 0, 0)
    after = store_state(local_repo.url)
    new_keys = set(after[0]) - set(before[0])
    assert all(k.startswith("commits/") for k in new_keys) and len(new_keys) == 1


def test_one_change_encodes_only_its_directory_and_ancestors(local_repo, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _tree(src, random.Random(2))
    age_tree(src)
    commit_directory(local_repo, src, message="v1")
    counts = Counts(monkeypatch)
    # d5 sits in d4 which sits in d3 (at the root): root, d3, d4, d5 are rebuilt.
    target = src / "d3" / "d4" / "d5" / "f2.bin"
    target.write_bytes(b"changed")
    t = target.stat().st_mtime - 1800  # out of the racy window (touching only this file's ctime)
    os.utime(target, (t, t))
    changed = commit_directory(local_repo, src, message="v2")
    assert changed.files_read == 1
    assert counts.encodes == 4
    assert changed.write.blobs_new == 6  # one chunk, one manifest, four trees
    assert changed.tree_id == _fresh_tree_id(tmp_path, src)


def test_a_changed_large_directory_re_cuts_only_near_its_changes(local_repo, tmp_path, monkeypatch,
                                                                 small_split):
    """A split directory committed from disk is stored as an edit of its previous
    tree (the stat cache's row names it): only the leaves near the changed, added
    and removed entries, and a changed subdirectory, are encoded again, not all
    of them; the ids are those of encoding it whole."""
    rng = random.Random(11)
    src = tmp_path / "src"
    big = src / "big"
    for i in range(600):
        write_file(big / f"f{i:04d}.bin", rng.randbytes(rng.randrange(50)))
    write_file(big / "sub" / "x.bin", b"x")
    age_tree(src)
    first = commit_directory(local_repo, src, message="v1")
    leaves = sum(1 for _ in local_repo.load_tree(local_repo.load_tree(first.tree_id).get("big").id).iter_leaves())
    assert leaves > 40
    (big / "f0100.bin").write_bytes(b"changed")
    (big / "f0300.bin").unlink()
    (big / "f0450x.bin").write_bytes(b"added")
    (big / "sub" / "x.bin").write_bytes(b"y")
    old = os.stat(big / "f0000.bin").st_mtime
    for p in ("f0100.bin", "f0450x.bin", "sub/x.bin"):
        os.utime(big / p, (old, old))
    counts = Counts(monkeypatch)
    changed = commit_directory(local_repo, src, message="v2")
    assert changed.files_read == 3
    # The root, sub, and the leaves near three edits (each perhaps with a neighbour),
    # not the ~45 leaves of big.
    assert counts.encodes <= 2 + 3 * 3
    assert changed.tree_id == _fresh_tree_id(tmp_path, src)
    assert_fsck_clean(local_repo.url)


def test_a_large_directory_whose_files_match_but_a_subdirectory_changed_is_edited_too(
        local_repo, tmp_path, monkeypatch, small_split):
    """Every file of a split directory unchanged, one of its subdirectories changed deep
    down: the directory is still stored as an edit of its previous tree (the leaf naming
    that subdirectory re-cut), not split whole again."""
    rng = random.Random(12)
    src = tmp_path / "src"
    big = src / "big"
    for i in range(600):
        write_file(big / f"f{i:04d}.bin", rng.randbytes(rng.randrange(50)))
    write_file(big / "sub" / "deep" / "x.bin", b"x")
    age_tree(src)
    first = commit_directory(local_repo, src, message="v1")
    leaves = sum(1 for _ in local_repo.load_tree(local_repo.load_tree(first.tree_id).get("big").id).iter_leaves())
    assert leaves > 40
    old = os.stat(big / "f0000.bin").st_mtime
    (big / "sub" / "deep" / "x.bin").write_bytes(b"y")
    os.utime(big / "sub" / "deep" / "x.bin", (old, old))
    counts = Counts(monkeypatch)
    changed = commit_directory(local_repo, src, message="v2")
    assert changed.files_read == 1
    # The root, sub, deep, and the leaf (perhaps with a neighbour) naming sub, and the
    # index nodes above it: not the ~45 leaves of big.
    assert counts.encodes <= 3 + 3 * 3, counts.encodes
    assert changed.tree_id == _fresh_tree_id(tmp_path, src)
    assert_fsck_clean(local_repo.url)


def _big_with_every_file_touched(root, seed: int):
    """A split directory ``root/big`` of 600 small files committed once, then every
    file touched (new mtime, same bytes): a re-commit's edits fall in every leaf."""
    rng = random.Random(seed)
    big = root / "big"
    for i in range(600):
        write_file(big / f"f{i:04d}.bin", rng.randbytes(rng.randrange(50)))
    age_tree(root)
    return big


def _touch_all(big):
    t = os.stat(big / "f0000.bin").st_mtime - 60  # still out of the racy window
    for p in big.iterdir():
        os.utime(p, (t, t))


def _old_leaf_loads(repo, monkeypatch, tree_id: bytes) -> list:
    """Record every load of a leaf of ``big`` in commit ``tree_id`` from now on."""
    old = {leaf_id for leaf_id in _leaf_ids(repo, repo.load_tree(tree_id).get("big").id)}
    loads = []
    load_node = Repository.load_tree_node

    def counting(self, oid, *a, **kw):
        if oid in old:
            loads.append(oid)
        return load_node(self, oid, *a, **kw)
    monkeypatch.setattr(Repository, "load_tree_node", counting)
    return loads


def _leaf_ids(repo, big_id: bytes) -> set:
    """The ids of split directory ``big_id``'s leaves, from its index nodes."""
    out, todo = set(), [repo.load_tree(big_id).root]
    while todo:
        node = todo.pop()
        for c in node.children:
            if node.level == 1:
                out.add(c.id)
            else:
                todo.append(repo.load_tree_node(c.id))
    assert len(out) > 20
    return out


def test_a_touch_of_every_file_of_a_large_directory_splits_it_whole_loading_no_old_leaf(
        local_repo, tmp_path, monkeypatch, small_split):
    """A re-commit whose edits fall in most leaves of a split directory (every file
    touched) encodes it whole (splittree.edit_pays, decided from its index nodes):
    no old leaf is loaded (over S3 an edit would GET every one), and the ids are
    those of a commit without any cache."""
    src = tmp_path / "src"
    big = _big_with_every_file_touched(src, 13)
    first = commit_directory(local_repo, src, message="v1")
    _touch_all(big)
    loads = _old_leaf_loads(local_repo, monkeypatch, first.tree_id)
    again = commit_directory(local_repo, src, message="v2", allow_empty=True)
    assert again.files_read == 600
    assert loads == []
    assert again.tree_id == first.tree_id == _fresh_tree_id(tmp_path, src)


def test_a_large_directory_edited_or_encoded_whole_gets_the_same_ids(tmp_path, monkeypatch, small_split,
                                                                      cache_home):
    """The same re-commit (edits in every leaf, and a few files changed, added and
    removed), once forced to edit the old tree and once to encode it whole: the
    same tree ids, those of a commit without any cache; only the edit loads old leaves."""
    from commitfs.model import splittree

    src = tmp_path / "src"
    big = _big_with_every_file_touched(src, 14)
    repos = [Repository.init(str(tmp_path / name)) for name in ("edit", "whole")]
    try:
        firsts = [commit_directory(r, src, message="v1") for r in repos]
        _touch_all(big)
        (big / "f0100.bin").write_bytes(b"changed")
        (big / "f0300.bin").unlink()
        (big / "f0450x.bin").write_bytes(b"added")
        t = os.stat(big / "f0000.bin").st_mtime
        for p in ("f0100.bin", "f0450x.bin"):
            os.utime(big / p, (t, t))
        got = []
        for r, first, pays in zip(repos, firsts, (True, False)):
            with monkeypatch.context() as m:
                m.setattr(splittree, "edit_pays", lambda tree, names, pays=pays: pays)
                loads = _old_leaf_loads(r, m, first.tree_id)
                got.append(commit_directory(r, src, message="v2").tree_id)
            assert (len(loads) > 0) is pays, (pays, len(loads))
        assert got[0] == got[1] == _fresh_tree_id(tmp_path, src)
    finally:
        for r in repos:
            r.close()


def _edits(src: os.PathLike):
    """Changes a re-commit must see, each keeping sizes or names where it can."""
    def chmod_exec():
        os.chmod(src / "d0" / "f0.bin", 0o755)

    def same_size_rewrite():
        p = src / "d0" / "d1" / "f1.bin"
        data = p.read_bytes()
        st = p.stat()
        p.write_bytes(bytes(b ^ 1 for b in data) or b"")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the ctime tells

    def retarget_symlink():
        os.unlink(src / "link")
        os.symlink("d0/f2.bin", src / "link")

    def rename_within():
        d = src / "d0" / "d1" / "d2"
        os.rename(d / "f4.bin", d / "g4.bin")

    def new_empty_dir():
        (src / "d0" / "sub").mkdir()

    def remove_dir():
        shutil.rmtree(src / "empty")

    def swap_names():
        d = src / "d6"
        os.rename(d / "f0.bin", d / "tmp")
        os.rename(d / "f1.bin", d / "f0.bin")
        os.rename(d / "tmp", d / "f1.bin")

    def add_file_deep():
        write_file(src / "d3" / "d4" / "d5" / "new.bin", b"new")

    return [chmod_exec, same_size_rewrite, retarget_symlink, rename_within, new_empty_dir, remove_dir,
            swap_names, add_file_deep]


def test_reused_tree_ids_match_a_commit_without_cache(local_repo, tmp_path):
    src = tmp_path / "src"
    _tree(src, random.Random(3))
    age_tree(src)
    commit_directory(local_repo, src, message="v0")
    for edit in _edits(src):
        edit()
        age_tree(src, seconds=1800 + random.random())
        made = commit_directory(local_repo, src, message=edit.__name__, allow_empty=True)
        assert made.tree_id == _fresh_tree_id(tmp_path, src), edit.__name__
        # and once more, now every directory reused:
        assert commit_directory(local_repo, src, message="again", allow_empty=True).tree_id == made.tree_id
    out = tmp_path / "out"
    checkout(reopen(local_repo.url), made.commit_id, out)
    assert describe(out) == describe(src)


def test_same_size_rewrite_without_age_is_seen_through_ctime(local_repo, tmp_path):
    """A file rewritten in place to the same size with its mtime put back:
    only its ctime moved (and os.utime cannot set ctime)."""
    src = tmp_path / "src"
    write_file(src / "a" / "x.bin", b"aaaa")
    age_tree(src)
    first = commit_directory(local_repo, src, message="v1")
    p = src / "a" / "x.bin"
    st = p.stat()
    p.write_bytes(b"bbbb")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_ctime_ns != st.st_ctime_ns or pytest.skip("ctime did not move (coarse clock)")
    second = commit_directory(local_repo, src, message="v2")
    assert second.files_read == 1 and second.tree_id != first.tree_id


def _growth(before, after) -> int:
    b, a = before[0], after[0]
    return sum(a[k] or 0 for k in a.keys() - b.keys()) - sum(b[k] or 0 for k in b.keys() - a.keys())


def test_bytes_stored_counts_everything_the_commit_added(local_repo, tmp_path):
    src = tmp_path / "src"
    _tree(src, random.Random(4), dirs=6, files=30)
    age_tree(src)
    for i in range(3):
        before = store_state(local_repo.url)
        made = commit_directory(local_repo, src, message=f"v{i}", allow_empty=True)
        assert made.write.bytes_stored == _growth(before, store_state(local_repo.url)) > 0
        write_file(src / f"d{i}" / "more.bin", random.randbytes(2000))
        age_tree(src)


def test_commit_json_bytes_stored_is_the_repository_growth(local_url, tmp_path):
    Repository.init(local_url).close()
    src = tmp_path / "src"
    _tree(src, random.Random(5), dirs=4, files=50)
    age_tree(src)
    before = store_state(local_url)
    out = json.loads(cli_ok("-r", local_url, "commit", str(src), "-m", "one", "--json").stdout)
    growth = _growth(before, store_state(local_url))
    assert out["bytes_stored"] == growth


def test_writer_checkpoints_bound_its_session_and_keep_the_repository_valid(local_repo, tmp_path, monkeypatch):
    """A commit of many blobs indexes what it added every _CHECKPOINT_BLOBS blobs (several
    segments, the writer's session never larger than that), and the result reads back whole."""
    from commitfs.ops import snapshot
    from core_fixtures import assert_fsck_clean

    monkeypatch.setattr(snapshot, "_CHECKPOINT_BLOBS", 10)
    sizes = []
    add = BlobWriter.add

    def watching_add(writer, *a, **kw):
        sizes.append(len(writer._session))
        return add(writer, *a, **kw)

    monkeypatch.setattr(BlobWriter, "add", watching_add)
    src = tmp_path / "src"
    _tree(src, random.Random(6), dirs=6, files=10)
    age_tree(src)
    segments = len(list(local_repo.index.segments()))
    made = commit_directory(local_repo, src, message="many")
    assert max(sizes) <= 10 and len(sizes) > 60
    assert len(list(reopen(local_repo.url).index.segments())) > segments + 1  # merged or not: more than one
    assert made.tree_id == _fresh_tree_id(tmp_path, src)
    out = tmp_path / "out"
    checkout(reopen(local_repo.url), made.commit_id, out)
    assert describe(out) == describe(src)
    assert_fsck_clean(local_repo.url)


def test_decoded_tree_cache_is_capped_by_bytes(local_repo, monkeypatch):
    """Trees of big directories cost their entries: the cache keeps at most its byte cap,
    however few trees that is (it was 4,096 trees whatever their size), and never one
    tree larger than the whole cache."""
    from commitfs.model.objects import Kind, TreeEntry
    from commitfs.repo import repository

    monkeypatch.setattr(repository, "TREE_CACHE_BYTES", 2 * 1024 * 1024)
    repo = Repository.open(local_repo.url)
    try:
        for t in range(40):
            entries = tuple(TreeEntry(f"f{i:05d}", Kind.FILE, 1, bytes([t]) * 32) for i in range(1000))
            repo.remember_tree(bytes([t]) * 32, Tree(entries))
        assert repo._trees.currsize <= 2 * 1024 * 1024
        kept = len(repo._trees)
        assert 0 < kept < 40
        huge = Tree(tuple(TreeEntry(f"g{i:06d}", Kind.FILE, 1, bytes(32)) for i in range(20_000)))
        repo.remember_tree(b"\xff" * 32, huge)  # larger than the whole cache: not kept, nothing evicted
        assert b"\xff" * 32 not in repo._trees and len(repo._trees) == kept
    finally:
        repo.close()


def test_a_commit_failing_after_some_checkpoints_leaves_the_repository_valid(local_repo, tmp_path, monkeypatch):
    """The third index segment of a checkpointing commit cannot be stored: the commit
    fails, the branch stays, fsck finds the segments already written harmless
    (they name complete, unreferenced subtrees), and a re-run completes."""
    from commitfs.errors import StorageError
    from commitfs.ops import snapshot
    from core_fixtures import assert_fsck_clean, faulty_repository

    src = tmp_path / "src"
    write_file(src / "seed.bin", b"seed")
    age_tree(src)
    head = commit_directory(local_repo, src, message="v1").commit_id
    _tree(src, random.Random(7), dirs=6, files=10)
    age_tree(src)
    monkeypatch.setattr(snapshot, "_CHECKPOINT_BLOBS", 10)
    faulty = faulty_repository(local_repo.url)
    segments = []

    def third_segment(key: str) -> bool:
        if key.startswith("index/"):
            segments.append(key)
            return len(segments) == 3
        return False

    faulty.store.fail_on = {"save_object"}
    faulty.store.fail_keys = third_segment
    faulty.store.error = lambda message: StorageError(f"no space left on device ({message})")
    with pytest.raises(StorageError, match="no space left"):
        commit_directory(faulty, src, message="fails")
    assert len(segments) == 3
    assert_fsck_clean(local_repo.url, head=head)
    made = commit_directory(reopen(local_repo.url), src, message="v2")
    assert made.tree_id == _fresh_tree_id(tmp_path, src)
    assert_fsck_clean(local_repo.url, head=made.commit_id)


def test_first_commit_streams_directory_by_directory(local_repo, tmp_path, monkeypatch):
    """Trees go out as the walk finishes each directory (post-order): at no point are
    the entries of more directories held than the current path and the read-ahead
    window reach (the whole dataset's entries were held until the last tree before),
    and the stat cache's rows are staged as they are recorded."""
    from commitfs.ops import snapshot
    from commitfs.ops.statcache import StatCache

    monkeypatch.setattr(snapshot, "_READ_AHEAD_FILES", 3)
    src = tmp_path / "src"
    rng = random.Random(8)
    for i in range(40):
        for j in range(5):
            write_file(src / f"d{i:02d}" / f"e{j}" / f"f{j}.bin", rng.randbytes(rng.choice([0, 9, 700])))
    age_tree(src)
    scanned, live = [], []
    scan_dir = snapshot._scan_dir

    def watching_scan(d, *a, **kw):
        scanned.append(d)
        live.append(sum(1 for x in scanned if x.entries is not None))
        return scan_dir(d, *a, **kw)

    staged = []
    stage = StatCache._stage

    def watching_stage(cache):
        staged.append(len(cache._pending))
        return stage(cache)

    monkeypatch.setattr(snapshot, "_scan_dir", watching_scan)
    monkeypatch.setattr(StatCache, "_stage", watching_stage)
    monkeypatch.setattr("commitfs.ops.statcache._BATCH_ROWS", 16)
    made = commit_directory(local_repo, src, message="streamed")
    assert len(scanned) == 1 + 40 + 200
    # The root, the dNN being walked and the one before it (waiting for its last reads),
    # the eN whose files are among the 3 read ahead, the one being scanned: 7 of 241.
    assert max(live) <= 1 + 2 + 3 + 1
    assert max(staged) <= 16 and len(staged) > 241 // 16
    assert made.tree_id == _fresh_tree_id(tmp_path, src)
    again = commit_directory(reopen(local_repo.url), src, message="again", allow_empty=True)
    assert again.files_read == 0 and again.tree_id == made.tree_id


def test_segment_merge_streams_and_equals_encoding_the_entries(local_repo, monkeypatch):
    """An LSM merge reads its inputs a block at a time (ranged reads of large ones) and
    writes what encode_segment makes of all their entries (first segment's duplicate
    kept): it held a Python tuple per entry before (~300 B each: 240 MB for the merge of
    eight 100k-blob checkpoint segments, the peak of a million-file commit)."""
    from commitfs.repo import index as index_mod
    from commitfs.repo.pack import BlobKind, Compression, Location

    monkeypatch.setattr(index_mod, "_MERGE_BLOCK", 7)
    monkeypatch.setattr(index_mod, "_WHOLE_LOAD_LIMIT", 1024)  # most inputs read by ranges
    rng = random.Random(9)
    ids = [rng.randbytes(32) for _ in range(400)]
    groups = []
    for g in range(4):
        pack = rng.randbytes(32)
        chosen = rng.sample(ids, 150)
        groups.append([(oid, Location(pack, rng.randrange(1 << 30), 10 + g, 20, BlobKind(rng.randrange(3)),
                                      Compression(rng.randrange(2)))) for oid in chosen])
    keys = [local_repo.index.add_segment(entries) for entries in groups]
    segs = [s for k in keys for s in local_repo.index.segments() if s.key == k]
    assert len(segs) == 4
    expected = index_mod.encode_segment([e for entries in groups for e in entries])

    def merged(segments):  # the merge writes a file (stored with Store.save_object_from)
        out = io.BytesIO(b"stale bytes of an earlier use " * 100)
        size, digest = index_mod.merge_segments(segments, out)
        data = out.getvalue()
        assert size == len(data) and index_mod.INDEX_PREFIX + digest.hex() == index_mod.segment_key(data)
        return data

    assert merged(segs) == expected
    reads = []
    load_range = local_repo.store.load_range

    def counting(key, off, length):
        reads.append(length)
        return load_range(key, off, length)

    monkeypatch.setattr(local_repo.store, "load_range", counting)
    assert merged([index_mod.Segment(local_repo.store, k) for k in keys]) == expected
    assert reads and max(reads) <= 7 * index_mod.ENTRY.size + 4096
    assert local_repo.index.merge(segs)
    merged = [s for s in reopen(local_repo.url).index.segments()]
    assert len(merged) == 1 and len(list(merged[0].iter_entries())) == len({o for e in groups for o, _ in e})
