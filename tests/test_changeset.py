"""ops.changeset: committing path changes against a base commit, rebase and conflicts."""

from __future__ import annotations

import os
import shutil

import pytest

from commitfs.errors import NothingToCommitError
from commitfs.ops.browse import lookup_path
from commitfs.ops.changeset import Change, ConflictError, commit_changes
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository


def _make_tree(root, n_dirs=5, n_files=4):
    for d in range(n_dirs):
        for f in range(n_files):
            p = root / f"d{d}" / f"f{f}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"dir {d} file {f}\n".encode() * (1 + d * 1000))
    (root / "top.csv").write_text("a,b\n1,2\n")


@pytest.fixture
def setup(store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo = Repository.init(store_url)
    src = tmp_path / "src"
    _make_tree(src)
    base = commit_directory(repo, src, message="base").commit_id
    return repo, src, base, tmp_path


def test_changes_give_the_same_tree_as_committing_the_directory(setup):
    repo, src, base, tmp = setup
    new_file = tmp / "new.bin"
    new_file.write_bytes(os.urandom(300_000))
    moved = lookup_path(repo, base, "d1/f0.txt")
    changes = {
        "d0/f1.txt": Change("file", source=str(new_file)),
        "d2": Change("delete"),
        "d1/f0.txt": Change("delete"),
        "d3/moved.txt": Change("entry", entry=moved),
        "fresh/deep/x.sh": Change("file", source=str(new_file), executable=True),
        "empty": Change("dir"),
        "link": Change("symlink", target=b"d0/f0.txt"),
    }
    result = commit_changes(repo, "main", base, changes, message="edits")
    assert result.parent == base and not result.rebased

    # The same edits applied to a plain copy, committed as a directory.
    expect = tmp / "expect"
    shutil.copytree(src, expect, symlinks=True)
    shutil.copy(new_file, expect / "d0/f1.txt")
    shutil.rmtree(expect / "d2")
    shutil.move(expect / "d1/f0.txt", expect / "d3/moved.txt")
    (expect / "fresh/deep").mkdir(parents=True)
    shutil.copy(new_file, expect / "fresh/deep/x.sh")
    os.chmod(expect / "fresh/deep/x.sh", 0o755)
    (expect / "empty").mkdir()
    os.symlink("d0/f0.txt", expect / "link")
    other = commit_directory(repo, expect, branch="check", message="dir").commit_id
    assert repo.load_commit(result.commit_id).tree == repo.load_commit(other).tree


def test_untouched_subtrees_are_not_read(setup, monkeypatch):
    repo, _src, base, tmp = setup
    f = tmp / "edit.txt"
    f.write_text("changed\n")
    loaded = []
    real = Repository.load_tree

    def spy(self, tid):
        loaded.append(tid)
        return real(self, tid)

    monkeypatch.setattr(Repository, "load_tree", spy)
    commit_changes(repo, "main", base, {"d4/f0.txt": Change("file", source=str(f))}, message="one")
    root = repo.load_commit(base).tree
    d4 = lookup_path(repo, base, "d4").id
    # Only the root and d4 (on the path to the change) were loaded: d0..d3 kept their ids unread.
    assert set(loaded) <= {root, d4}


def test_disjoint_changes_rebase_onto_a_moved_branch(setup):
    repo, _src, base, tmp = setup
    a, b = tmp / "a.txt", tmp / "b.txt"
    a.write_text("first writer\n")
    b.write_text("second writer\n")
    first = commit_changes(repo, "main", base, {"d0/f0.txt": Change("file", source=str(a))}, message="w1")
    second = commit_changes(repo, "main", base, {"d1/f0.txt": Change("file", source=str(b))}, message="w2")
    assert second.rebased and second.parent == first.commit_id
    head = repo.refs.lookup_branch("main")
    assert head == second.commit_id
    from commitfs.ops.browse import open_file

    assert open_file(repo, head, "d0/f0.txt").read() == b"first writer\n"
    assert open_file(repo, head, "d1/f0.txt").read() == b"second writer\n"


def test_overlapping_changes_conflict_and_leave_the_branch(setup):
    repo, _src, base, tmp = setup
    a = tmp / "a.txt"
    a.write_text("x\n")
    first = commit_changes(repo, "main", base, {"d0/f0.txt": Change("file", source=str(a))}, message="w1")
    with pytest.raises(ConflictError) as info:
        commit_changes(repo, "main", base, {"d0": Change("delete"), "d1/f1.txt": Change("delete")}, message="w2")
    assert info.value.paths == ["d0"]
    assert "d0" in str(info.value)
    assert repo.refs.lookup_branch("main") == first.commit_id


def test_no_effective_change_creates_nothing(setup):
    repo, src, base, _tmp = setup
    with pytest.raises(NothingToCommitError):
        commit_changes(repo, "main", base, {"d0/f0.txt": Change("file", source=str(src / "d0/f0.txt"))},
                       message="same bytes")
    assert repo.refs.lookup_branch("main") == base


def test_a_new_directory_with_changes_beneath_it(setup):
    repo, _src, base, tmp = setup
    f = tmp / "inside.txt"
    f.write_text("inside\n")
    result = commit_changes(repo, "main", base, {
        "newdir": Change("dir"),
        "newdir/sub/inside.txt": Change("file", source=str(f)),
        "newdir/empty": Change("dir"),
    }, message="new dir with content")
    from commitfs.ops.browse import list_dir, open_file

    assert open_file(repo, result.commit_id, "newdir/sub/inside.txt").read() == b"inside\n"
    assert sorted(i.entry.name for i in list_dir(repo, result.commit_id, "newdir")) == ["empty", "sub"]


def test_one_local_file_under_two_names_is_chunked_once(setup, monkeypatch):
    """A workspace's hard link reaches the commit as one NewFile under two names: it is
    read and chunked once, and both entries get its one content id."""
    import commitfs.ops.snapshot as snapshot

    repo, _src, base, tmp = setup
    f = tmp / "linked.bin"
    f.write_bytes(os.urandom(200_000))
    calls = []
    real = snapshot.store_stream

    def spy(writer, stream, *args, **kwargs):
        calls.append(stream)
        return real(writer, stream, *args, **kwargs)

    monkeypatch.setattr(snapshot, "store_stream", spy)
    res = commit_changes(repo, "main", base, {"a/linked.bin": Change("file", source=str(f)),
                                              "b/linked.bin": Change("file", source=str(f)),
                                              "top.csv": Change("file", source=str(f))}, message="links")
    assert len(calls) == 1
    ids = {lookup_path(repo, res.commit_id, p).id for p in ("a/linked.bin", "b/linked.bin", "top.csv")}
    assert len(ids) == 1
    assert lookup_path(repo, res.commit_id, "b/linked.bin").name == "linked.bin"
