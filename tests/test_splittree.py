"""Split trees (issue 21): large directories stored as chunks under index nodes.

docs/FORMAT.md, "Split trees", is the contract; model/splittree.py the code.
Most tests shrink the thresholds (``small_split``: a directory of more than
32 entries splits, leaves of 4-16 entries, index nodes of 2-6 children), so
that a few hundred entries make a tree of several levels; the tests named
``..._at_the_real_threshold`` use the format's own values.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
import trio

from commitfs.errors import CorruptObjectError
from commitfs.model import splittree
from commitfs.model.draft import NewFile
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import EMPTY_MANIFEST, Commit, Kind, Tree, TreeEntry, symlink_entry
from commitfs.model.splittree import SplitTree, TreeIndex, decode_tree_node, split_nodes, tree_id_of
from commitfs.ops import sync
from commitfs.ops.changes import build, draft_from_paths
from commitfs.ops.checkout import checkout
from commitfs.ops.diff import diff_trees
from commitfs.ops.fsck import fsck
from commitfs.ops.gc import collect
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.pack import BlobKind, pack_key
from commitfs.repo.repository import CONFIG_KEY, Repository
from commitfs.repo.treewalk import check_expansion
from core_fixtures import assert_fsck_clean, cli_ok, describe, reopen, write_file
from mount_fixtures import fs_of, vfs_listdir, vfs_walk


def _name(rng: random.Random) -> str:
    alphabet = "abcdefghij_.-0123456789é"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) + str(rng.randrange(1 << 20))


def random_entries(rng: random.Random, n: int) -> list[TreeEntry]:
    names = set()
    while len(names) < n:
        names.add(_name(rng))
    out = []
    for name in sorted(names):  # (a set's order changes with the process's hash seed)
        r = rng.random()
        if r < 0.1:
            out.append(symlink_entry(name, f"target-{rng.randrange(99)}".encode()))
        elif r < 0.2:
            out.append(TreeEntry(name, Kind.DIR, rng.randrange(1 << 20), hash_bytes(name.encode() + b"d")))
        else:
            kind = Kind.EXEC if r < 0.25 else Kind.FILE
            out.append(TreeEntry(name, kind, rng.randrange(1 << 30), hash_bytes(name.encode())))
    return sorted(out, key=lambda e: e.name.encode())


def _store(entries) -> tuple[bytes, dict[bytes, object]]:
    nodes = split_nodes(entries)
    return nodes[-1][0], {oid: decode_tree_node(data) for oid, data, _ in nodes}


def _read(tid: bytes, objects: dict, loads: list | None = None):
    node = objects[tid]
    if isinstance(node, Tree):
        return node

    def load(oid):
        if loads is not None:
            loads.append(oid)
        return objects[oid]
    return SplitTree(tid, node, load)


def _levels(objects) -> set[int]:
    return {n.level for n in objects.values() if isinstance(n, TreeIndex)}


# --- the model -------------------------------------------------------------------------
def test_small_directories_keep_the_version_1_encoding_and_ids_at_the_real_threshold():
    rng = random.Random(1)
    entries = random_entries(rng, splittree.SPLIT_ENTRIES + 1)
    plain = entries[:splittree.SPLIT_ENTRIES]
    nodes = split_nodes(plain)
    assert len(nodes) == 1 and nodes[0][1] == Tree(tuple(plain)).encode()
    assert nodes[0][0] == Tree(tuple(plain)).id
    split = split_nodes(entries)
    assert len(split) > 2 and isinstance(split[-1][2], TreeIndex)
    leaves = [n for _, _, n in split if isinstance(n, Tree)]
    assert all(splittree.LEAF_MIN <= len(t.entries) <= splittree.LEAF_MAX for t in leaves[:-1])
    assert tuple(e for t in leaves for e in t.entries) == tuple(entries)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 34, 47, 48, 63, 64, 65, 100, 257, 600])
def test_random_directories_round_trip_around_the_thresholds(small_split, n):
    rng = random.Random(n)
    entries = random_entries(rng, n)
    tid, objects = _store(entries)
    tree = _read(tid, objects)
    assert isinstance(tree, SplitTree) == (n > 32)
    assert tree.entries == tuple(entries)
    assert tree.count == n and tree.size == sum(e.size for e in entries if e.kind is not Kind.SYMLINK)
    for i, e in enumerate(entries):
        assert tree.get(e.name) == e
        assert tree.position(e.name) == i
    for absent in ("", "\x01", "~~~~", entries[0].name + "\x00" if entries else "x"):
        if absent:
            assert tree.get(absent) is None and tree.position(absent) is None
    if isinstance(tree, SplitTree):
        assert len(_levels(objects)) >= (2 if n >= 257 else 1)
        for i in range(n):
            base, leaf = tree.leaf_at(i)
            assert leaf.entries[i - base] == entries[i]
        # Every encoding decodes to itself, and nothing else decodes.
        for oid, node in objects.items():
            assert node.id == oid
            assert decode_tree_node(node.encode()) == node


def test_edits_at_chunk_boundaries_give_the_ids_of_the_final_directory(small_split):
    rng = random.Random(7)
    entries = random_entries(rng, 400)
    tid, objects = _store(entries)
    leaves = [n for n in objects.values() if isinstance(n, Tree)]
    firsts = [t.entries[0] for t in leaves]
    lasts = [t.entries[-1] for t in leaves]
    current = {e.name: e for e in entries}
    for step in range(60):
        pick = rng.choice(firsts + lasts)
        action = rng.choice(["remove", "add", "rename", "change"])
        if action == "remove":
            current.pop(pick.name, None)
        elif action == "add":
            name = pick.name + rng.choice(["", "0", "~"]) + "+"
            current[name] = TreeEntry(name, Kind.FILE, 5, hash_bytes(name.encode()))
        elif action == "rename" and pick.name in current:
            e = current.pop(pick.name)
            current[pick.name + "-renamed"] = e._replace(name=pick.name + "-renamed")
        elif pick.name in current and current[pick.name].kind.is_file:
            current[pick.name] = current[pick.name]._replace(size=step, id=hash_bytes(bytes([step])))
        final = sorted(current.values(), key=lambda e: e.name.encode())
        new_tid, new_objects = _store(final)
        assert _read(new_tid, new_objects).entries == tuple(final)
        # What an edit rewrites is near it: most chunks are shared with the original.
        if step < 3:
            assert len(set(new_objects) - set(objects)) <= 2 * (len(_levels(new_objects)) + 2)


def test_one_entry_added_to_a_big_directory_rewrites_o_log_n_small_objects_at_the_real_threshold(repo):
    rng = random.Random(3)
    entries = [TreeEntry(f"img_{i:06d}.jpg", Kind.FILE, 1000 + i, hash_bytes(b"%d" % i)) for i in range(60_000)]
    with repo.writer() as w:
        first = w.add_tree(Tree(tuple(entries)))
    whole = w.stats.bytes_new_raw
    assert whole > 2_500_000
    for _ in range(3):
        extra = TreeEntry(f"img_{rng.randrange(60_000):06d}.jpg+new", Kind.FILE, 9, hash_bytes(b"new"))
        edited = Tree.build([*entries, extra])
        with repo.writer() as w:
            tid = w.add_tree(edited)
        assert tid != first
        height = repo.load_tree(tid).root.level
        # A leaf, maybe its neighbour, one node per level: O(log n) objects, a few KiB each.
        assert w.stats.blobs_new <= 2 + 2 * height, w.stats
        assert w.stats.bytes_new_raw < 64 * 1024, w.stats
        assert w.stats.bytes_new_raw < whole / 50
        assert repo.load_tree(tid).get(extra.name) == extra


def test_the_same_directory_gets_the_same_id_whatever_its_history(small_split, tmp_path, cache_home):
    """Built by different edit sequences, through the commit of a directory and
    through the change engine (merges and workspace commits), one id."""
    rng = random.Random(11)
    names = [f"f{i:04d}-{_name(rng)}" for i in range(300)]
    final = set(rng.sample(names, 220))

    def fill(root: Path, present):
        for n in names:
            p = root / "big" / n
            if n in present:
                write_file(p, n.encode())
            elif p.exists():
                p.unlink()
        write_file(root / "small.txt", b"small")

    ids = []
    for seed in range(2):  # two different histories into two repositories
        srng = random.Random(seed)
        url = str(tmp_path / f"repo{seed}")
        with Repository.init(url) as r:
            work = tmp_path / f"work{seed}"
            for _ in range(3):
                fill(work, set(srng.sample(names, srng.randrange(50, 300))))
                commit_directory(r, work, message="step", allow_empty=True)
            fill(work, final)
            ids.append(commit_directory(r, work, message="final", allow_empty=True).tree_id)
    fresh = tmp_path / "fresh"
    fill(fresh, final)
    with Repository.init(str(tmp_path / "repo-fresh")) as r:
        ids.append(commit_directory(r, fresh, message="fresh").tree_id)
        # The change engine: the first history's tree, edited into the final one.
        start = commit_directory(r, tmp_path / "work0", message="again", allow_empty=True).tree_id
        fill(tmp_path / "work0", set(names[:40]))
        base = commit_directory(r, tmp_path / "work0", message="other", allow_empty=True).tree_id
        changes = {f"big/{n}": NewFile(data=n.encode()) for n in final if n not in names[:40]}
        changes.update({f"big/{n}": None for n in names[:40] if n not in final})
        with r.writer() as w:
            built = build(r, w, draft_from_paths(r, base, changes))
        ids.append(built.id)
        assert start == ids[0]
    assert len(set(ids)) == 1
    with Repository.open(str(tmp_path / "repo-fresh")) as r:
        big = r.load_tree(r.load_tree(ids[0]).get("big").id)
        assert isinstance(big, SplitTree) and big.count == len(final)


# --- the repository: writers, readers, format version ------------------------------------
def _commit_tree(repo: Repository, top: list[TreeEntry], nodes=None, branch="main") -> bytes:
    with repo.writer() as w:
        w.add_manifest(EMPTY_MANIFEST)
        for oid, data in nodes or ():
            w.add(oid, BlobKind.TREE, data)
        tid = w.add_tree(Tree.build(top))
    cid = repo.save_commit(Commit(tid, (), "t", 0, "m"))
    repo.refs.set_branch_if_equals(branch, cid, repo.refs.lookup_branch(branch))
    return cid


def _big_dir(tmp_path: Path, n: int, name="big") -> Path:
    src = tmp_path / "src"
    for i in range(n):
        write_file(src / name / f"file-{i:05d}.txt", b"%d\n" % i, executable=i % 17 == 0)
    write_file(src / "top.txt", b"top")
    os.symlink("top.txt", src / name / "link")
    return src


def _committed_big(tmp_path: Path, n: int) -> tuple[str, Path, bytes]:
    """A new repository with ``_big_dir(tmp_path, n)`` committed: (url, source, commit id)."""
    url = str(tmp_path / "repo")
    src = _big_dir(tmp_path, n)
    with Repository.init(url) as r:
        return url, src, commit_directory(r, src, message="v1").commit_id


def test_new_repositories_are_version_3_and_version_1_ones_read_and_upgrade_in_place(small_split, tmp_path,
                                                                                   cache_home):
    url = str(tmp_path / "repo")
    Repository.init(url).close()
    assert json.loads(Path(url, CONFIG_KEY).read_bytes())["version"] == 3
    config = json.loads(Path(url, CONFIG_KEY).read_bytes())
    config["version"] = 1
    Path(url, CONFIG_KEY).write_text(json.dumps(config))
    small = tmp_path / "small"
    write_file(small / "a", b"a")
    with Repository.open(url) as r:
        commit_directory(r, small, message="small")
    assert json.loads(Path(url, CONFIG_KEY).read_bytes())["version"] == 1  # nothing split: left as it was
    src = _big_dir(tmp_path, 100)
    with Repository.open(url) as r:
        commit_directory(r, src, message="big")
    after = json.loads(Path(url, CONFIG_KEY).read_bytes())
    assert after == dict(config, version=2)
    assert_fsck_clean(url)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 47, 48, 63, 64, 65, 100, 257, 600])
def test_the_streamed_split_id_is_the_canonical_one(small_split, n):
    """SplitIdBuilder, given the entries one at a time (fsck), gives tree_id_of's id."""
    entries = random_entries(random.Random(1000 + n), n)
    builder = splittree.SplitIdBuilder()
    for e in entries:
        builder.add(e)
    assert builder.count == n and builder.finish() == tree_id_of(entries)


def test_fsck_reads_a_split_directory_leaf_by_leaf(small_split, tmp_path, cache_home, monkeypatch):
    """fsck never holds a split directory's entries all at once (SplitTree.entries
    loads every leaf into one tuple), finding damage in it and where it is reached
    all the same."""
    url = str(tmp_path / "repo")
    src = _big_dir(tmp_path, 300)
    with Repository.init(url) as r:
        commit_directory(r, src, message="v1")

    def whole(self):
        raise AssertionError("all of a split tree's entries at once")
    monkeypatch.setattr(SplitTree, "entries", property(whole))
    assert_fsck_clean(url)
    with reopen(url) as r:
        big = r.load_tree(r.load_tree(r.load_commit(r.resolve("main")).tree).get("big").id)
        assert isinstance(big, SplitTree)
        victim = list(big.iter_entries())[150]
        loc = r.locate(victim.id)
        pack = r.store.local_path(pack_key(loc.pack))
    with open(pack, "r+b") as f:  # one byte of the file's manifest flipped
        f.seek(loc.offset + loc.stored // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with reopen(url) as r:
        problems = fsck(r).problems
    assert len(problems) == 1 and f"file big/{victim.name} ({victim.id.hex()})" in problems[0], problems


def test_a_split_directory_reads_through_checkout_diff_and_fsck(small_split, tmp_path, cache_home):
    url = str(tmp_path / "repo")
    src = _big_dir(tmp_path, 300)
    with Repository.init(url) as r:
        first = commit_directory(r, src, message="v1")
        write_file(src / "big" / "file-00150.txt", b"changed")
        write_file(src / "big" / "file-00150.txt+", b"added")
        (src / "big" / "file-00007.txt").unlink()
        second = commit_directory(r, src, message="v2")
    with reopen(url) as r:
        big = r.load_tree(r.load_tree(second.tree_id).get("big").id)
        assert isinstance(big, SplitTree) and big.root.level >= 2
        out = tmp_path / "out"
        checkout(r, second.commit_id, out)
        assert describe(out) == describe(src)
    with reopen(url) as r:
        loads = []
        load_node = r.load_tree_node
        r.load_tree_node = lambda oid, *a, **k: (loads.append(oid), load_node(oid, *a, **k))[1]
        changes = [(c.status, c.path) for c in diff_trees(r, first.tree_id, second.tree_id)]
        assert sorted(changes) == [("added", "big/file-00150.txt+"), ("modified", "big/file-00150.txt"),
                                   ("removed", "big/file-00007.txt")]
        leaves = [o for o in set(loads) if isinstance(objects_of(r, o), Tree)]
        assert len(leaves) <= 8, "a diff reads the chunks around its changes, not the directory"
        assert len(set(loads)) < len(big.entries) // 8
    assert_fsck_clean(url)


def objects_of(repo, oid):
    return decode_tree_node(bytes(repo.load_blob(oid)))


def test_gc_keeps_a_split_directory_readable_and_frees_one_no_ref_reaches(small_split, tmp_path, cache_home):
    url = str(tmp_path / "repo")
    src = _big_dir(tmp_path, 250)
    with Repository.init(url) as r:
        kept = commit_directory(r, src, message="kept").commit_id
        other = _big_dir(tmp_path / "o", 120, name="other")
        commit_directory(r, other, branch="doomed", message="doomed")
        r.refs.set_branch_if_equals("doomed", None, r.refs.lookup_branch("doomed"))
    report = collect(reopen(url), grace=0.0, force=True)
    assert report is not None
    with reopen(url) as r:
        out = tmp_path / "out"
        checkout(r, kept, out)
        assert describe(out) == describe(src)
    assert_fsck_clean(url)
    with reopen(url) as r:
        assert fsck(r).unreferenced["blobs"] == 0


def test_sync_copies_split_trees_local_to_s3_and_back(small_split, tmp_path, s3_url, cache_home):
    url, src, cid = _committed_big(tmp_path, 200)
    with Repository.init(s3_url) as remote:
        # A version-1 destination is upgraded before it holds a split tree.
        raw = json.loads(remote.store.load_object(CONFIG_KEY))
        remote.store.save_object(CONFIG_KEY, json.dumps(dict(raw, version=1)).encode())
    with reopen(url) as local, Repository.open(s3_url) as remote:
        sync.push(local, remote, "main")
        assert json.loads(remote.store.load_object(CONFIG_KEY))["version"] == 2
    assert_fsck_clean(s3_url)
    with reopen(s3_url) as remote:
        out = tmp_path / "out"
        checkout(remote, cid, out)
        assert describe(out) == describe(src)
    clone = tmp_path / "clone"
    cli_ok("clone", s3_url, str(clone))
    assert_fsck_clean(str(clone))


def test_the_mount_looks_a_name_up_and_lists_pages_loading_only_the_chunks_they_need(small_split, tmp_path,
                                                                                    cache_home):
    url, src, cid = _committed_big(tmp_path, 400)

    async def main():
        with reopen(url) as r:
            loads = []
            load_node, node_now = r.load_tree_node, r.tree_node_from_memory
            r.load_tree_node = lambda oid, *a, **k: (loads.append(oid), load_node(oid, *a, **k))[1]

            def from_memory(oid):
                got = node_now(oid)
                if got is not None:
                    loads.append(oid)
                return got
            r.tree_node_from_memory = from_memory
            async with fs_of(r, cid) as fs:
                big = await fs.lookup(1, b"big")
                attr = await fs.lookup(big.ino, b"file-00321.txt")
                assert await fs.readlink((await fs.lookup(big.ino, b"link")).ino) == b"top.txt"
                height = r.load_tree(r.load_tree(r.load_commit(cid).tree).get("big").id).root.level
                assert len(set(loads)) <= 2 * height, "a lookup loads one chunk per level"
                fh = await fs.open(attr.ino, os.O_RDONLY)
                assert await fs.read(fh, 0, 100) == b"321\n"
                await fs.release(fh)
                with pytest.raises(Exception):
                    await fs.lookup(big.ino, b"file-99999.txt")
                # One readdir page: the leaves it shows (and the path to them), not the directory.
                loads.clear()
                dh = await fs.opendir(big.ino)
                got = []
                await fs.readdir(dh, 0, lambda name, a, nxt: len(got) < 5 and (got.append(name) or True))
                await fs.releasedir(dh)
                assert got == [b"file-00000.txt", b"file-00001.txt", b"file-00002.txt", b"file-00003.txt",
                               b"file-00004.txt"]
                assert len(set(loads)) <= 2 * height
                # The whole listing, in pages, and the whole tree, as on disk.
                names = [n for n, _ in await vfs_listdir(fs, big.ino)]
                assert names == sorted(os.listdir(src / "big"), key=str.encode)
                assert await vfs_walk(fs) == describe(src)
    trio.run(main)


def test_a_real_mount_of_a_split_directory_at_the_real_threshold(tmp_path, cache_home, mounts):
    url = str(tmp_path / "repo")
    src = tmp_path / "src"
    (src / "flat").mkdir(parents=True)
    n = splittree.SPLIT_ENTRIES + 1500
    for i in range(n):
        (src / "flat" / f"{i:06d}.txt").write_bytes(b"%d" % i)
    cli_ok("-r", url, "init")
    cli_ok("-r", url, "commit", str(src), "-m", "flat")
    with reopen(url) as r:
        head = r.load_commit(r.refs.lookup_branch("main"))
        assert isinstance(r.load_tree(r.load_tree(head.tree).get("flat").id), SplitTree)
    mp = mounts.mountpoint()
    mounts.mount(url, mp, rev="main")
    flat = mp / "flat"
    assert (flat / "004321.txt").read_bytes() == b"4321"
    assert sorted(os.listdir(flat)) == sorted(os.listdir(src / "flat"))
    assert os.stat(flat / f"{n - 1:06d}.txt").st_size == len(b"%d" % (n - 1))
    assert not (flat / "nope.txt").exists()


def test_treewalk_counts_the_entries_of_a_split_directory(small_split, tmp_path, cache_home):
    url = str(tmp_path / "repo")
    src = _big_dir(tmp_path, 150)
    with Repository.init(url) as r:
        result = commit_directory(r, src, message="v1")
    with reopen(url) as r:
        assert check_expansion(r, result.tree_id) == 1 + 151 + 1  # big/, its 150 files and link, top.txt


# --- hostile repositories: malformed, never a wrong answer ----------------------------------
def _tamper(objects: dict, root: TreeIndex, how: str):
    """A copy of a split tree with one fault; returns (root id, [(id, bytes)] to store)."""
    kids = list(root.children)
    extra: list[tuple[bytes, bytes]] = []
    if how == "unsorted":
        kids[0], kids[1] = kids[1], kids[0]
    elif how == "count":
        kids[1] = kids[1]._replace(count=kids[1].count + 1)
    elif how == "size":
        kids[0] = kids[0]._replace(size=kids[0].size + 1)
    elif how == "level":  # a level-2 node below a level-2 node: the nearest thing to a cycle
        node = TreeIndex(root.level + 1, tuple(kids))
        return node, extra
    elif how == "overlap":
        # The first chunk's last subtree also takes the second chunk's first entry.
        first = objects[kids[0].id]
        while isinstance(first, TreeIndex):
            first = objects[first.children[-1].id]
        second = objects[kids[1].id]
        while isinstance(second, TreeIndex):
            second = objects[second.children[0].id]
        grown = Tree(first.entries + second.entries[:1])
        extra.append((grown.id, grown.encode()))
        if root.level == 1:
            kids[0] = kids[0]._replace(id=grown.id, count=kids[0].count + 1,
                                       size=kids[0].size + second.entries[0].size)
        else:
            raise AssertionError("the tampered tree is built of one level")
    elif how == "noncanonical":
        a, b = objects[kids[0].id], objects[kids[1].id]
        merged = Tree(a.entries + b.entries)
        extra.append((merged.id, merged.encode()))
        kids[0:2] = [kids[0]._replace(count=kids[0].count + kids[1].count, size=kids[0].size + kids[1].size,
                                      id=merged.id)]
    return TreeIndex(root.level, tuple(kids)), extra


@pytest.mark.parametrize("how", ["unsorted", "count", "size", "level", "overlap", "noncanonical"])
def test_a_hostile_split_tree_is_malformed_never_a_wrong_answer(small_split, tmp_path, cache_home, how,
                                                                monkeypatch):
    monkeypatch.setattr(splittree, "INDEX_MAX", 1000)  # one level: every fault sits in the root
    monkeypatch.setattr(splittree, "INDEX_BITS", 30)
    rng = random.Random(5)
    entries = [TreeEntry(f"n{i:04d}", Kind.FILE, 0, EMPTY_MANIFEST.id) for i in range(120)]
    nodes = split_nodes(entries)
    objects = {oid: node for oid, _, node in nodes}
    root = nodes[-1][2]
    assert root.level == 1
    bad, extra = _tamper(objects, root, how)
    stored = [(oid, data) for oid, data, _ in nodes[:-1]] + extra + [(hash_bytes(bad.encode()), bad.encode())]
    url = str(tmp_path / "repo")
    with Repository.init(url) as r:
        _commit_tree(r, [TreeEntry("big", Kind.DIR, 0, stored[-1][0])], stored)
    with reopen(url) as r:
        head = r.load_commit(r.refs.lookup_branch("main"))
        top = r.load_tree(head.tree)
        answers = 0
        try:
            big = r.load_tree(top.get("big").id)
            for e in rng.sample(entries, 40) + entries[:3] + entries[-3:]:
                got = big.get(e.name)
                assert got == e  # right, or an error: never another entry, never "absent"
                answers += 1
            assert big.entries == tuple(entries)
        except CorruptObjectError:
            assert how != "noncanonical"
        else:
            assert how == "noncanonical" and answers
        problems = fsck(r).problems
    assert problems and any(("malformed" in p or "not split as the format says" in p) for p in problems)
    if how != "noncanonical":
        # The mount says EIO (a CorruptObjectError), and lists nothing it cannot vouch for.
        async def main():
            with reopen(url) as r:
                async with fs_of(r, r.refs.lookup_branch("main")) as fs:
                    big = await fs.lookup(1, b"big")
                    with pytest.raises(CorruptObjectError):
                        for e in entries:
                            await fs.lookup(big.ino, e.name.encode())
                        await vfs_listdir(fs, big.ino)
        trio.run(main)


def test_a_merge_of_split_directories_reads_the_chunks_that_changed(small_split, tmp_path, cache_home):
    from commitfs.ops.changes import dir_entry, merge

    url = str(tmp_path / "repo")
    src = _big_dir(tmp_path, 400)
    with Repository.init(url) as r:
        base = commit_directory(r, src, message="base").tree_id
        write_file(src / "big" / "file-00010.txt", b"ours")
        (src / "big" / "file-00200.txt").unlink()
        ours = commit_directory(r, src, message="ours").tree_id
        write_file(src / "big" / "file-00010.txt", b"10\n")
        write_file(src / "big" / "file-00200.txt", b"200\n")
        write_file(src / "big" / "file-00390.txt", b"theirs")
        write_file(src / "big" / "file-00390.txt+", b"theirs, new")
        theirs = commit_directory(r, src, message="theirs").tree_id
    with reopen(url) as r:
        loads = []
        load_node = r.load_tree_node
        r.load_tree_node = lambda oid, *a, **k: (loads.append(oid), load_node(oid, *a, **k))[1]
        conflicts = []
        merged = merge(r, dir_entry(base), dir_entry(ours), dir_entry(theirs), conflicts=conflicts)
        assert conflicts == []
        leaves = {o for o in loads if isinstance(objects_of(r, o), Tree)}
        assert len(leaves) <= 12, "the merge reads the chunks around the changes"
        with r.writer() as w:
            tid = build(r, w, merged).id
    expected = _big_dir(tmp_path / "expected", 400)
    write_file(expected / "big" / "file-00010.txt", b"ours")
    (expected / "big" / "file-00200.txt").unlink()
    write_file(expected / "big" / "file-00390.txt", b"theirs")
    write_file(expected / "big" / "file-00390.txt+", b"theirs, new")
    with Repository.init(str(tmp_path / "fresh")) as r:
        assert commit_directory(r, expected, message="expected").tree_id == tid


@pytest.mark.parametrize("fail", ["config", "packs/", "index/", "commits/"])
def test_a_failed_commit_of_a_split_directory_leaves_the_repository_valid(small_split, tmp_path, cache_home,
                                                                          fail):
    """Into a version-1 repository: the upgrade comes before any pack, so a
    repository holding a split tree always says version 2; a commit failing
    at any write leaves the branch where it was, fsck clean, and a re-run
    completes."""
    from commitfs.errors import StorageError
    from core_fixtures import faulty_repository

    url = str(tmp_path / "repo")
    small = tmp_path / "small"
    write_file(small / "a", b"a")
    with Repository.init(url) as r:
        raw = json.loads(r.store.load_object(CONFIG_KEY))
        r.store.save_object(CONFIG_KEY, json.dumps(dict(raw, version=1)).encode())
    with Repository.open(url) as r:
        head = commit_directory(r, small, message="small").commit_id
    src = _big_dir(tmp_path, 200)
    faulty = faulty_repository(url)
    faulty.store.fail_on = {"save_object"}
    faulty.store.fail_keys = lambda key: key.startswith(fail)
    with pytest.raises(StorageError):
        commit_directory(faulty, src, message="fails")
    version = json.loads(Path(url, CONFIG_KEY).read_bytes())["version"]
    assert version == (1 if fail == "config" else 2)
    assert_fsck_clean(url, head=head)
    with reopen(url) as r:
        done = commit_directory(r, src, message="works")
    assert json.loads(Path(url, CONFIG_KEY).read_bytes())["version"] == 2
    assert_fsck_clean(url, head=done.commit_id)
    with reopen(url) as r:
        out = tmp_path / "out"
        checkout(r, done.commit_id, out)
        assert describe(out) == describe(src)


def test_a_page_of_a_split_directory_loads_its_leaves_only(small_split, tmp_path, cache_home):
    from commitfs.ops.browse import list_page

    url, src, cid = _committed_big(tmp_path, 400)
    names = sorted(os.listdir(src / "big"), key=str.encode)
    with reopen(url) as r:
        loads = []
        load_node = r.load_tree_node
        r.load_tree_node = lambda oid, *a, **k: (loads.append(oid), load_node(oid, *a, **k))[1]
        page = list_page(r, cid, "big", offset=150, limit=20)
        assert [i.path for i in page.items] == [f"big/{n}" for n in names[150:170]]
        assert page.total == len(names) and page.next_offset == 170
        leaves = {o for o in loads if isinstance(objects_of(r, o), Tree)}
        assert len(leaves) <= 6
        last = list_page(r, cid, "big", offset=len(names) - 3, limit=20)
        assert [i.path for i in last.items] == [f"big/{n}" for n in names[-3:]] and last.next_offset is None
        assert list_page(r, cid, "big", offset=5000, limit=20).items == []
        odd = list_page(r, cid, "big", offset=0, limit=500, match=lambda e: e.name.endswith("1.txt"))
        assert [i.path for i in odd.items] == [f"big/{n}" for n in names if n.endswith("1.txt")]


@pytest.mark.parametrize("seed", range(12))
def test_an_edit_of_a_split_tree_cuts_what_a_fresh_split_cuts_reading_the_leaves_it_touches(small_split, seed):
    from commitfs.model.splittree import split_edit

    rng = random.Random(seed)
    entries = random_entries(rng, rng.choice([40, 120, 400, 900]))
    tid, objects = _store(entries)
    current = {e.name: e for e in entries}
    edits: dict = {}
    for _ in range(rng.choice([1, 2, 5, 30, 200])):
        r = rng.random()
        if r < 0.35 and current:
            name = rng.choice(sorted(current))
            edits[name] = None
            current.pop(name)
        elif r < 0.7:
            base = rng.choice(entries).name
            name = base + rng.choice(["", "0", "~", "\x7f"]) + str(rng.randrange(9))
            e = TreeEntry(name, Kind.FILE, rng.randrange(99), hash_bytes(name.encode()))
            edits[name] = current[name] = e
        elif current:
            name = rng.choice(sorted(current))
            if current[name].kind.is_file:
                e = current[name]._replace(size=rng.randrange(99), id=hash_bytes(rng.randbytes(4)))
                edits[name] = current[name] = e
    final = sorted(current.values(), key=lambda e: e.name.encode())
    loads = []
    nodes = split_edit(_read(tid, objects, loads), edits)
    want = split_nodes(final)
    assert nodes[-1][0] == want[-1][0]
    assert {oid for oid, _, _ in nodes} <= {oid for oid, _, _ in want}
    if len(final) > splittree.SPLIT_ENTRIES:
        leaves_read = [o for o in loads if isinstance(objects[o], Tree)]
        assert len(leaves_read) <= 3 * len(edits) + 2


def test_a_few_edits_to_a_split_directory_through_the_change_engine_read_the_leaves_they_touch(
        small_split, tmp_path, cache_home):
    """A workspace commit, a merge: a Draft over a split directory is stored by
    re-cutting around its edits, with the ids a fresh commit gives."""
    url = str(tmp_path / "repo")
    src = _big_dir(tmp_path, 600)
    with Repository.init(url) as r:
        base = commit_directory(r, src, message="v1").tree_id
    changes = {"big/file-00300.txt+": NewFile(data=b"new"), "big/file-00003.txt": None,
               "big/file-00500.txt": NewFile(data=b"changed", executable=True)}
    with reopen(url) as r:
        loads = []
        load_node = r.load_tree_node
        r.load_tree_node = lambda oid, *a, **k: (loads.append(oid), load_node(oid, *a, **k))[1]
        with r.writer() as w:
            tid = build(r, w, draft_from_paths(r, base, changes)).id
        leaves = {o for o in loads if isinstance(objects_of(r, o), Tree)}
        assert len(leaves) <= 8, "the edits' leaves (and a neighbour where a cut moved), not the directory"
    write_file(src / "big" / "file-00300.txt+", b"new")
    (src / "big" / "file-00003.txt").unlink()
    write_file(src / "big" / "file-00500.txt", b"changed", executable=True)
    with Repository.init(str(tmp_path / "fresh")) as r:
        assert commit_directory(r, src, message="fresh").tree_id == tid


def test_directory_read_ahead_follows_a_reader_across_the_leaves_of_a_split_directory(small_split, tmp_path,
                                                                                      cache_home):
    """vfs/dirahead.py keeps one state per directory; in a split directory the
    reader's file is found in one leaf chunk at a time, so positions must be the
    directory's, not the leaf's: a reader going through the files in order
    follows its read-ahead from one leaf into the next (no jump at a boundary),
    and what is fetched ahead is files after the one read, in every leaf."""
    from commitfs.cache import DiskChunkCache

    url, src, cid = _committed_big(tmp_path, 200)
    names = sorted((n for n in os.listdir(src / "big") if n != "link"), key=str.encode)

    async def main():
        with reopen(url) as r:
            r.chunk_cache = DiskChunkCache(tmp_path / "cache")
            async with fs_of(r, cid) as fs:
                big = await fs.lookup(1, b"big")
                tree = await fs.loader.tree(r.load_tree(r.load_commit(cid).tree).get("big").id)
                assert isinstance(tree, SplitTree)
                inos = [(await fs.lookup(big.ino, n.encode())).ino for n in names]
                ahead = fs._dir_ahead
                fetched = []
                start_fetch = ahead._fetch

                async def recording(scope, pieces, events):
                    fetched.extend(fid for piece in pieces for fid in piece)
                    await start_fetch(scope, pieces, events)
                ahead._fetch = recording
                leaves = set()
                for name, ino in zip(names[:120], inos):
                    await fs._manifest(fs._node(ino))
                    leaves.add(tree.leaf_for(name).entries[0].name)
                    await trio.sleep(0)
                assert len(leaves) >= 4  # the reader crossed several leaf boundaries
                assert ahead.jumps == 0
                state = ahead._states[big.ino]
                assert state.first == 0 and state.last == 119
                ids = [tree.get(n).id for n in names]
                assert fetched and set(fetched) <= set(ids[1:])
                # Ahead in every leaf, not only the first (a leaf's first file is read
                # before its leaf is held: what is fetched ahead stays within one leaf).
                assert {ids[i] for i in range(20, 110) if names[i] not in leaves} <= set(fetched)
    trio.run(main)


def test_what_the_kernel_holds_reads_the_same_after_the_trees_left_the_daemons_caches(small_split, tmp_path,
                                                                                     cache_home):
    """vfs/inode.py: a file or symlink the kernel holds is a count, kind and size in
    its directory's block, not a node keeping its TreeEntry; once the decoded trees
    and chunks are evicted, its attributes, bytes, target and extended attributes
    come back from the tree read again, as they were, in a plain directory and in
    a split one; the inode numbers a listing gave are those lookups give."""
    url, src, cid = _committed_big(tmp_path, 400)

    async def main():
        with reopen(url) as r:
            async with fs_of(r, cid) as fs:
                def evict():
                    fs.loader._trees.cache.clear()
                    fs.loader._tree_nodes.cache.clear()

                big = await fs.lookup(1, b"big")
                listed = dict(await vfs_listdir(fs, big.ino))
                names = [(1, "top.txt"), (big.ino, "file-00321.txt"), (big.ino, "file-00017.txt"),
                         (big.ino, "link")]
                before = {}
                for parent, name in names:
                    a = await fs.lookup(parent, name.encode())
                    if parent == big.ino:
                        assert listed[name].ino == a.ino
                    before[name] = (a, {x: await fs.getxattr(a.ino, x) for x in await fs.listxattr(a.ino)})
                assert stat.S_IMODE(before["file-00017.txt"][0].mode) == 0o555  # executable
                for name, (a, xattrs) in before.items():
                    evict()
                    assert await fs.getattr(a.ino) == a
                    evict()
                    assert {x: await fs.getxattr(a.ino, x) for x in await fs.listxattr(a.ino)} == xattrs
                    evict()
                    if name == "link":
                        assert await fs.readlink(a.ino) == b"top.txt"
                        continue
                    want = (src / ("big" if name != "top.txt" else "") / name).read_bytes()
                    fh = await fs.open(a.ino, os.O_RDONLY)
                    assert await fs.read(fh, 0, 1 << 16) == want
                    await fs.release(fh)
                    evict()
                    assert await fs.read_inode(a.ino, 0, 1 << 16) == want
    trio.run(main)


def test_a_listing_that_outlives_what_the_kernel_forgot_hands_out_only_known_inodes(small_split, tmp_path,
                                                                                     cache_home):
    """A readdir page of a split directory awaits each leaf it reaches; if the
    kernel forgets every entry of the directory meanwhile, the directory's block
    of inode numbers leaves the table (vfs/inode.py), and the entries offered
    after that must be counted in the table's block, not the dropped one: every
    inode the kernel accepted is one the table knows."""
    url, src, cid = _committed_big(tmp_path, 400)

    async def main():
        with reopen(url) as r:
            async with fs_of(r, cid) as fs:
                big = await fs.lookup(1, b"big")
                held: list[int] = []
                accepted: list[int] = []
                leaf_at = fs._split_leaf_at

                async def forgetting(tree, pos):
                    got = await leaf_at(tree, pos)
                    fs.forget([(ino, 1) for ino in held])  # the kernel let go of all it held
                    held.clear()
                    return got
                fs._split_leaf_at = forgetting

                def reply(name, attr, next_id):
                    if len(accepted) == 100:
                        return False
                    held.append(attr.ino)
                    accepted.append(attr.ino)
                    return True
                dh = await fs.opendir(big.ino)
                await fs.readdir(dh, 0, reply)
                await fs.releasedir(dh)
                assert len(accepted) == 100 and held
                for ino in held:  # those accepted since the last forget
                    assert ino in fs.table
                    await fs.getattr(ino)
    trio.run(main)


def test_a_listing_that_fails_before_counting_any_file_leaves_no_block_behind(small_split, tmp_path,
                                                                              cache_home):
    """A readdir of a split directory reserves the directory's block of inode
    numbers when it reaches a leaf; if the listing then fails (a leaf's load
    raises) with none of the block's numbers handed out (its first leaves hold
    directories alone), the block leaves the table: nothing the kernel holds
    keeps it, and no later forget would ever drop it."""
    url = str(tmp_path / "repo")
    src = tmp_path / "src"
    for i in range(60):
        write_file(src / "big" / f"d-{i:03d}" / "f.txt", b"%d\n" % i)
    with Repository.init(url) as r:
        cid = commit_directory(r, src, message="v1").commit_id

    async def main():
        with reopen(url) as r:
            async with fs_of(r, cid) as fs:
                big = await fs.lookup(1, b"big")
                leaf_at = fs._split_leaf_at
                calls = []

                async def failing(tree, pos):
                    calls.append(pos)
                    if len(calls) > 1:
                        raise CorruptObjectError("a leaf that cannot be read")
                    return await leaf_at(tree, pos)
                fs._split_leaf_at = failing
                listed = []
                dh = await fs.opendir(big.ino)
                with pytest.raises(CorruptObjectError):
                    await fs.readdir(dh, 0, lambda name, attr, next_id: listed.append(name) or True)
                await fs.releasedir(dh)
                assert listed and len(calls) == 2  # a first leaf listed, the second failed
                assert big.ino not in fs.table._blocks and not fs.table._bases
    trio.run(main)


def test_whether_an_edit_pays_is_decided_from_the_index_nodes_alone(small_split):
    """splittree.edit_pays: edits in at most half of a split directory's leaves are
    worth an edit, more are not (encoding it whole reads no old leaf); it loads no
    leaf, and split_edit after it reuses the index nodes it read."""
    from commitfs.model.splittree import edit_pays, split_edit

    entries = random_entries(random.Random(5), 600)
    tid, objects = _store(entries)
    loads = []
    tree = _read(tid, objects, loads)
    nleaves = sum(1 for o in objects.values() if isinstance(o, Tree))
    assert nleaves > 20
    firsts = [e.name for o in objects.values() if isinstance(o, Tree) for e in o.entries[:1]]
    assert not edit_pays(tree, [e.name for e in entries])
    assert not edit_pays(tree, sorted(firsts)[:nleaves // 2 + 1])
    assert edit_pays(tree, sorted(firsts)[:nleaves // 2])
    assert edit_pays(tree, [entries[7].name, entries[7].name + "~"])  # both in one leaf
    assert not [o for o in loads if isinstance(objects[o], Tree)], "no leaf loaded"
    index_loads = len(loads)
    edits = {entries[7].name: None}
    assert split_edit(tree, edits)[-1][0] == split_nodes(entries[:7] + entries[8:])[-1][0]
    assert not [o for o in loads[index_loads:] if isinstance(objects[o], TreeIndex)]
