"""Tree deltas (issue 21, format version 3): a re-commit stores a changed
directory's tree as a delta of the tree it had before.

docs/FORMAT.md, "Tree deltas", is the contract; repo/pack.py (encode_delta,
verify_blob), repo/engine.py (reading) and BlobWriter.add_tree (writing) the
code.  A delta's raw bytes, and so the tree's id, are the whole tree's: only
what is stored differs.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from commitfs.errors import CorruptObjectError, ObjectNotFoundError
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import Commit, Kind, Tree, TreeEntry
from commitfs.ops import sync
from commitfs.ops.checkout import checkout
from commitfs.ops.diff import diff_trees
from commitfs.ops.fsck import fsck
from commitfs.ops.gc import collect
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.pack import DELTA_BASE_SIZE, BlobKind, Compression, encode_delta, pack_key
from commitfs.repo.repository import CONFIG_KEY, Repository
from core_fixtures import age_tree, assert_fsck_clean, cli_ok, describe, reopen, write_file

DIRS, FILES = 12, 200


def _dataset(root: Path, rng: random.Random) -> Path:
    for d in range(DIRS):
        for f in range(FILES):
            write_file(root / f"d{d:02d}" / f"f{f:04d}.bin", rng.randbytes(300))
    write_file(root / "top.txt", b"top")
    age_tree(root, 7200)
    return root


def _change(root: Path, rng: random.Random, per_dir: int) -> list[str]:
    changed = []
    for d in range(DIRS):
        for f in rng.sample(range(FILES), per_dir):
            rel = f"d{d:02d}/f{f:04d}.bin"
            write_file(root / rel, rng.randbytes(300))
            changed.append(rel)
    age_tree(root, 3600)
    return changed


def _stored(repo: Repository, oid: bytes):
    loc = repo.locate(oid)
    return loc, repo.store.load_range(pack_key(loc.pack), loc.offset, loc.stored)


def _subtrees(repo: Repository, cid: bytes) -> dict[str, bytes]:
    root = repo.load_tree(repo.load_commit(cid).tree)
    return {e.name: e.id for e in root.entries if e.kind is Kind.DIR}


@pytest.fixture
def two_versions(tmp_path, cache_home):
    """A local repository with a dataset committed, then committed again with
    3 files changed in each directory: (url, source, first, second, changed)."""
    rng = random.Random(21)
    url = str(tmp_path / "repo")
    src = _dataset(tmp_path / "src", rng)
    with Repository.init(url) as r:
        first = commit_directory(r, src, message="one").commit_id
    changed = _change(src, rng, 3)
    with reopen(url) as r:
        result = commit_directory(r, src, message="two")
    return url, src, first, result, changed


def test_a_re_commit_stores_each_changed_directory_as_a_small_delta_of_its_tree(two_versions, tmp_path):
    url, src, first, second, changed = two_versions
    assert second.write.tree_deltas == DIRS  # every changed directory; the root has a subdirectory built anew
    with reopen(url) as r:
        assert json.loads(r.store.load_object(CONFIG_KEY))["version"] == 3
        old, new = _subtrees(r, first), _subtrees(r, second.commit_id)
        for name, tid in new.items():
            loc, stored = _stored(r, tid)
            assert loc.kind is BlobKind.TREE and loc.compression is Compression.DELTA
            assert bytes(stored[:DELTA_BASE_SIZE]) == old[name]  # a delta of the tree it had before
            whole = r.load_blob(tid)
            assert hash_bytes(whole) == tid and loc.raw == len(whole)
            assert loc.stored * 8 < loc.raw  # three changed entries of 200: a few hundred bytes
        # The blobs the commit added: the changed files and their manifests, the trees as deltas;
        # bytes_stored counts everything, pack tables and the index segment too.
        changed_bytes = 300 * len(changed)
        assert second.write.bytes_new_stored < 1.5 * changed_bytes
    # The same content committed from scratch elsewhere has the same ids: ids depend on content only.
    with Repository.init(str(tmp_path / "fresh")) as fresh:
        again = commit_directory(fresh, src, message="fresh")
        assert again.tree_id == second.tree_id and again.write.tree_deltas == 0
    out = tmp_path / "out"
    with reopen(url) as r:
        checkout(r, second.commit_id, out)
        diff = list(diff_trees(r, r.load_commit(first).tree, second.tree_id))
        assert sorted(c.path for c in diff) == sorted(changed)
        assert {c.status for c in diff} == {"modified"}
    assert describe(out) == describe(src)
    assert_fsck_clean(url, head=second.commit_id)


def test_commit_json_counts_the_trees_stored_as_deltas(tmp_path, cache_home):
    """`commitfs commit --json` reports tree_deltas (docs/CLI.md): none in a first
    commit, one per changed directory in a re-commit."""
    rng = random.Random(5)
    src, url = _dataset(tmp_path / "src", rng), str(tmp_path / "repo")
    cli_ok("init", "-r", url)
    first = json.loads(cli_ok("commit", "-r", url, str(src), "-m", "one", "--json").stdout)
    assert first["tree_deltas"] == 0 and first["created"]
    for d in (0, 5):
        write_file(src / f"d{d:02d}" / "f0007.bin", rng.randbytes(300))
    age_tree(src, 3600)
    second = json.loads(cli_ok("commit", "-r", url, str(src), "-m", "two", "--json").stdout)
    assert second["created"] and second["tree_deltas"] == 2  # the two changed directories (the root is tiny)
    # Each changed file's chunk and manifest, the two directories as deltas, the root whole.
    assert second["blobs_new"] == 2 * 2 + second["tree_deltas"] + 1


def test_a_delta_is_always_of_a_tree_stored_whole(two_versions):
    url, src, first, second, _ = two_versions
    rng = random.Random(5)
    _change(src, rng, 2)
    with reopen(url) as r:
        third = commit_directory(r, src, message="three")
        assert third.write.tree_deltas == DIRS
        base_ids = _subtrees(r, first)
        for name, tid in _subtrees(r, third.commit_id).items():
            loc, stored = _stored(r, tid)
            assert loc.compression is Compression.DELTA
            # Against the first commit's tree (stored whole), not the second's (a delta).
            assert bytes(stored[:DELTA_BASE_SIZE]) == base_ids[name]
            assert r.locate(base_ids[name]).compression is not Compression.DELTA
    assert_fsck_clean(url, head=third.commit_id)


def test_a_tree_far_from_its_base_is_stored_whole(tmp_path, cache_home):
    rng = random.Random(8)
    url = str(tmp_path / "repo")
    src = _dataset(tmp_path / "src", rng)
    with Repository.init(url) as r:
        commit_directory(r, src, message="one")
    _change(src, rng, FILES // 2)  # half of each directory: a delta would not pay
    with reopen(url) as r:
        result = commit_directory(r, src, message="two")
        assert result.write.tree_deltas == 0
        for tid in _subtrees(r, result.commit_id).values():
            assert r.locate(tid).compression is Compression.ZSTD or r.locate(tid).compression is Compression.NONE


def test_gc_keeps_a_delta_base_and_what_it_names_when_only_the_delta_is_reachable(two_versions, tmp_path):
    url, src, first, second, changed = two_versions
    with reopen(url) as r:
        # main becomes a root commit of the second tree: the first commit is unreachable.
        head = r.load_commit(second.commit_id)
        orphan = r.save_commit(Commit(tree=head.tree, parents=(), author="t", message="squashed", time=head.time,
                                      metadata={}))
        r.refs.set_branch_if_equals("main", orphan, second.commit_id)
        old_trees = _subtrees(r, first)
    report = collect(reopen(url), grace=0.0, force=True)
    assert report.commits_deleted >= 2
    with reopen(url) as r:
        assert not r.has_commit(first)
        for tid in old_trees.values():  # kept: the deltas' bases
            assert r.has_blob(tid)
            for e in r.load_tree(tid).entries:  # and everything they name (a tree in the index is whole)
                r.load_manifest(e.id)
        out = tmp_path / "out"
        checkout(r, orphan, out)
    assert describe(out) == describe(src)
    assert_fsck_clean(url, head=orphan)
    with reopen(url) as r:  # what gc kept, fsck counts as referenced
        assert fsck(r).unreferenced == {"commits": 0, "blobs": 0, "packs": 0}


def test_sync_sends_trees_whole_and_the_destination_reads_them(two_versions, tmp_path):
    url, src, first, second, _ = two_versions
    dst_url = str(tmp_path / "copy")
    Repository.init(dst_url).close()
    with reopen(url) as a, reopen(dst_url) as b:
        sync.transfer(a, b, [second.commit_id])
        b.refs.set_branch_if_equals("main", second.commit_id, None)
    with reopen(dst_url) as b:
        for tid in _subtrees(b, second.commit_id).values():
            assert b.locate(tid).compression is not Compression.DELTA
        out = tmp_path / "out"
        checkout(b, second.commit_id, out)
    assert describe(out) == describe(src)
    assert_fsck_clean(dst_url, head=second.commit_id)


def test_a_version_2_repository_is_upgraded_by_its_first_delta(tmp_path, cache_home):
    rng = random.Random(3)
    url = str(tmp_path / "repo")
    src = _dataset(tmp_path / "src", rng)
    Repository.init(url).close()
    config = json.loads(Path(url, CONFIG_KEY).read_bytes())
    Path(url, CONFIG_KEY).write_text(json.dumps(dict(config, version=2)))
    with reopen(url) as r:
        commit_directory(r, src, message="one")
        commit_directory(r, src, message="same", allow_empty=True)
    assert json.loads(Path(url, CONFIG_KEY).read_bytes())["version"] == 2  # nothing stored as a delta yet
    _change(src, rng, 1)
    with reopen(url) as r:
        assert commit_directory(r, src, message="two").write.tree_deltas == DIRS
    assert json.loads(Path(url, CONFIG_KEY).read_bytes()) == dict(config, version=3)
    assert_fsck_clean(url)


def _tree(entries: list[TreeEntry]) -> tuple[bytes, bytes]:
    data = Tree(tuple(entries)).encode()
    return hash_bytes(data), data


def _variant(entries: list[TreeEntry], i: int, rng: random.Random) -> list[TreeEntry]:
    out = list(entries)
    out[i] = TreeEntry(out[i].name, Kind.FILE, 7, rng.randbytes(32))
    return out


@pytest.mark.parametrize("how", ["wrong base", "missing base", "delta of a delta", "of itself", "truncated",
                                 "not a tree"])
def test_a_hostile_delta_reads_as_an_error_never_a_wrong_tree(local_repo, how):
    """Deltas written by hand, each wrong in one way: every reader refuses them
    (the mount's EIO), and none returns entries the id does not name."""
    rng = random.Random(how)
    entries = [TreeEntry(f"n{i:04d}", Kind.FILE, 5, rng.randbytes(32)) for i in range(100)]
    base_id, base = _tree(entries)
    other_id, other = _tree(_variant(entries, 0, rng))
    tid, data = _tree(_variant(entries, 99, rng))
    stored = encode_delta(data, base_id, base)
    assert stored is not None
    kind = BlobKind.TREE
    with local_repo.writer() as w:
        w.add(base_id, BlobKind.TREE, base)
        w.add(other_id, BlobKind.TREE, other)
        if how == "wrong base":
            stored = other_id + stored[DELTA_BASE_SIZE:]
        elif how == "missing base":
            stored = hash_bytes(b"nothing") + stored[DELTA_BASE_SIZE:]
        elif how == "delta of a delta":
            mid_id, mid = _tree(_variant(entries, 50, rng))
            w.add(mid_id, BlobKind.TREE, mid, stored=encode_delta(mid, base_id, base),
                  compression=Compression.DELTA)
            stored = encode_delta(data, mid_id, mid)
        elif how == "of itself":
            stored = tid + stored[DELTA_BASE_SIZE:]
        elif how == "truncated":
            stored = stored[:DELTA_BASE_SIZE + 4]
        elif how == "not a tree":
            kind = BlobKind.MANIFEST
        w.add(tid, kind, data, stored=stored, compression=Compression.DELTA)
    with reopen(local_repo.url) as r:
        assert r.load_tree(base_id).encode() == base  # the others read as they are
        error = ObjectNotFoundError if how == "missing base" else CorruptObjectError
        with pytest.raises(error):
            r.load_blob(tid)
        try:  # (the mount's event loop: the same checks; a base it cannot find is left to a thread)
            got = r.reads.blob_from_memory(tid)
        except CorruptObjectError:
            got = None
        assert got is None
        assert r.reads.blob_from_memory(base_id) == base


def test_a_mount_reads_directories_stored_as_deltas(two_versions, mounts):
    url, src, first, second, _ = two_versions
    mp = mounts.mountpoint()
    mounts.mount(url, mp, rev="main")
    assert describe(mp) == describe(src)
    old = mounts.mountpoint("old")
    mounts.mount(url, old, rev=first.hex())
    assert sorted(os.listdir(old / "d03")) == sorted(os.listdir(mp / "d03"))


def test_an_edit_through_the_change_engine_stores_the_directory_as_a_delta(two_versions, tmp_path):
    """A workspace's commit and a merge build trees through the change engine
    (ops/changes.py): a few edits in a directory store it as a delta of the tree
    it was edited from, with the id a fresh commit of the result gives."""
    from commitfs.model.draft import NewFile
    from commitfs.ops.changes import build, draft_from_paths

    url, src, first, second, _ = two_versions
    changes = {"d04/f0007.bin": NewFile(data=b"edited"), "d04/new.bin": NewFile(data=b"new"),
               "d04/f0100.bin": None}
    with reopen(url) as r:
        old = _subtrees(r, second.commit_id)["d04"]
        with r.writer() as w:
            tid = build(r, w, draft_from_paths(r, second.tree_id, changes)).id
            assert w.stats.tree_deltas == 1  # d04 (the root has a dozen entries: too small to pay)
        d04 = _subtrees_of(r, tid)["d04"]
        loc, stored = _stored(r, d04)
        assert loc.compression is Compression.DELTA
        # second's d04 is itself a delta: the base is the tree that one is a delta of, stored whole.
        assert bytes(stored[:DELTA_BASE_SIZE]) == _subtrees(r, first)["d04"] != old
    write_file(src / "d04" / "f0007.bin", b"edited")
    write_file(src / "d04" / "new.bin", b"new")
    (src / "d04" / "f0100.bin").unlink()
    with Repository.init(str(tmp_path / "fresh")) as fresh:
        assert commit_directory(fresh, src, message="fresh").tree_id == tid


def _subtrees_of(repo: Repository, tid: bytes) -> dict[str, bytes]:
    return {e.name: e.id for e in repo.load_tree(tid).entries if e.kind is Kind.DIR}


def test_over_s3_a_delta_is_made_only_from_a_base_in_memory_and_reads_back(s3_url, cache_home, tmp_path):
    """Reading a base from S3 would cost the committing thread a GET per changed
    directory: a remote repository's trees become deltas only of trees already
    decoded in memory.  A commit of a directory keeps none (its memory is bounded),
    so it stores them whole; a workspace's commit or a merge has just read the
    trees it edits, so those become deltas."""
    from commitfs.model.draft import NewFile
    from commitfs.ops.changes import build, draft_from_paths

    rng = random.Random(13)
    src = _dataset(tmp_path / "src", rng)
    with Repository.init(s3_url) as r:
        commit_directory(r, src, message="one")
        _change(src, rng, 3)
        second = commit_directory(r, src, message="two")
        assert second.write.tree_deltas == 0  # (no base in memory: stored whole, no GET for one)
    with reopen(s3_url) as r:
        with r.writer() as w:
            draft = draft_from_paths(r, second.tree_id, {"d04/f0007.bin": NewFile(data=b"edited")})
            tid = build(r, w, draft).id
            assert w.stats.tree_deltas == 1  # d04, read to be edited
        d04 = _subtrees_of(r, tid)["d04"]
        assert r.locate(d04).compression is Compression.DELTA
    write_file(src / "d04" / "f0007.bin", b"edited")
    expected = describe(src)
    with reopen(s3_url) as r:  # a process with none of it in memory reads it back
        cid = r.save_commit(Commit(tid, (second.commit_id,), "t", 1, "edit"))
        out = tmp_path / "out"
        checkout(r, cid, out)
    assert describe(out) == expected
    assert_fsck_clean(s3_url)
    with Repository.init(str(tmp_path / "fresh")) as fresh:
        assert commit_directory(fresh, src, message="fresh").tree_id == tid
