"""ops.changes: the one tree-to-tree change engine (diff, three-way merge, apply)."""

from __future__ import annotations

import pytest

from commitfs.model.draft import Draft, NewFile
from commitfs.model.objects import Kind
from commitfs.ops.changes import build, dir_entry, iter_changes, merge
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository


def _tree(root, n_dirs=6, n_files=5):
    for d in range(n_dirs):
        for f in range(n_files):
            p = root / f"d{d}" / "sub" / f"f{f}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"dir {d} file {f}\n")


@pytest.fixture
def repo(tmp_path, cache_home):
    r = Repository.init(str(tmp_path / "repo"))
    yield r
    r.close()


def _commit(repo, src, branch):
    return repo.load_commit(commit_directory(repo, src, branch=branch, message=branch).commit_id).tree


def test_merge_opens_only_directories_changed_on_both_sides(repo, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _tree(src)
    base = _commit(repo, src, "main")
    (src / "d0/sub/f0.txt").write_text("ours\n")
    ours = _commit(repo, src, "ours")
    (src / "d0/sub/f0.txt").write_text("dir 0 file 0\n")
    (src / "d0/sub/f1.txt").write_text("theirs\n")
    (src / "d3/sub/f2.txt").write_text("theirs too\n")
    theirs = _commit(repo, src, "theirs")
    loaded = []
    real = Repository.load_tree
    monkeypatch.setattr(Repository, "load_tree", lambda self, tid, *a, **k: loaded.append(tid) or real(self, tid, *a, **k))
    conflicts = []
    result = merge(repo, dir_entry(base), dir_entry(ours), dir_entry(theirs), conflicts=conflicts)
    assert conflicts == []
    # d3 changed on one side only: decided by id, never opened; d1, d2, d4, d5: equal everywhere.
    opened = set(loaded)
    never = {repo.load_tree(t).get(n).id for t in (base, ours, theirs) for n in ("d1", "d2", "d3", "d4", "d5")}
    assert not (opened & never)
    with repo.writer() as w:
        merged = build(repo, w, result)
    got = {p: (o, n) for p, o, n in iter_changes(repo, dir_entry(base), merged)}
    assert sorted(got) == ["d0/sub/f0.txt", "d0/sub/f1.txt", "d3/sub/f2.txt"]
    assert got["d3/sub/f2.txt"][1].id == lookup_path_in(repo, theirs, "d3/sub/f2.txt").id


def lookup_path_in(repo, tree, path):
    e = dir_entry(tree)
    for name in path.split("/"):
        e = repo.load_tree(e.id).get(name)
    return e


def test_build_reuses_every_unchanged_subtree(repo, tmp_path):
    src = tmp_path / "src"
    _tree(src)
    base = _commit(repo, src, "main")
    f = tmp_path / "new.txt"
    f.write_text("new\n")
    draft = Draft({"d2": Draft({"sub": Draft({"f9.txt": NewFile(source=str(f))},
                                             base=lookup_path_in(repo, base, "d2/sub").id)},
                               base=lookup_path_in(repo, base, "d2").id)}, base=base)
    with repo.writer() as w:
        root = build(repo, w, draft)
    for d in ("d0", "d1", "d3"):
        assert lookup_path_in(repo, root.id, d).id == lookup_path_in(repo, base, d).id
    assert lookup_path_in(repo, root.id, "d2/sub/f9.txt").kind is Kind.FILE
    assert [p for p, _, _ in iter_changes(repo, dir_entry(base), root)] == ["d2/sub/f9.txt"]


def test_build_splices_edits_into_a_base_tree_as_a_full_build_would(repo, tmp_path):
    """A Draft over a base tree is built per edit (a search and a splice, the size moved
    by the edits): the tree, its id and its size equal those of the whole tree built anew."""
    import random

    from commitfs.model.objects import Tree, TreeEntry, symlink_entry

    rng = random.Random(11)
    base_entries = [TreeEntry(f"f{i:03d}", Kind.FILE, rng.randrange(10**6), rng.randbytes(32)) for i in range(0, 200, 2)]
    base_entries += [symlink_entry("link", b"f000"), TreeEntry("sub", Kind.DIR, 5, rng.randbytes(32))]
    with repo.writer() as w:
        base = w.add_tree(Tree.build(base_entries))
    for trial in range(20):
        names = [e.name for e in base_entries] + [f"f{i:03d}" for i in range(1, 200, 2)] + ["a", "zzz", "link2"]
        edits = {}
        for n in rng.sample(names, rng.randrange(1, 30)):
            how = rng.choice(["delete", "file", "link"])
            edits[n] = (None if how == "delete" else symlink_entry(n, b"t" * rng.randrange(1, 9)) if how == "link"
                        else TreeEntry(n, Kind.EXEC, rng.randrange(10**6), rng.randbytes(32)))
        want = {e.name: e for e in base_entries}
        for n, e in edits.items():
            if e is None:
                want.pop(n, None)
            else:
                want[n] = e
        expected = Tree.build(want.values())
        with repo.writer() as w:
            got = build(repo, w, Draft(dict(edits), base=base), "d")
        assert got.id == expected.id and got.size == expected.size == repo.load_tree(got.id).size, trial
        assert repo.load_tree(got.id) == expected


@pytest.mark.parametrize("case,expect", [
    # (base, ours, theirs) of one path as file contents or None; expect a content or a conflict kind
    (("a", "b", "a"), "b"), (("a", "a", "c"), "c"), (("a", "b", "b"), "b"), ((None, "x", None), "x"),
    ((None, None, "y"), "y"), (("a", None, "a"), None), (("a", None, None), None),
    (("a", "b", "c"), "modify/modify"), ((None, "x", "y"), "add/add"), (("a", "b", None), "modify/delete"),
    (("a", None, "c"), "delete/modify"),
])
def test_path_rules(repo, tmp_path, case, expect):
    trees = []
    for i, content in enumerate(case):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "keep.txt").write_text("keep\n")
        if content is not None:
            (d / "p.txt").write_text(content)
        trees.append(_commit(repo, d, f"b{i}"))
    conflicts = []
    result = merge(repo, *(dir_entry(t) for t in trees), conflicts=conflicts)
    if expect in (None,) or len(expect) == 1:
        assert conflicts == []
        with repo.writer() as w:
            root = build(repo, w, result)
        e = repo.load_tree(root.id).get("p.txt")
        if expect is None:
            assert e is None
        else:
            assert repo.load_file(e.id) == expect.encode()
    else:
        assert [(c.path, c.kind) for c in conflicts] == [("p.txt", expect)]
