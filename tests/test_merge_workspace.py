"""commitfs merge SOURCE MOUNTPOINT: a merge applied to a writable workspace mount as pending
edits, its conflicts resolved there with ordinary tools, then committed with two parents."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from core_fixtures import assert_one_line_error
from workspace_fixtures import WS
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository



def _holds(url) -> dict:
    """The references keeping workspace merges reachable (for gc)."""
    with Repository.open(url) as repo:
        return dict(repo.store.iter_refs("merges/"))


def _write(root, files):
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


@pytest.fixture
def two_branches(tmp_path, mounts):
    url = str(tmp_path / "repo")
    src = tmp_path / "src"
    base_files = {"labels.txt": b"one\ntwo\nthree\n", "weights.bin": b"\0\1base", "keep.txt": b"keep\n"}
    with Repository.init(url) as repo:
        _write(src, base_files)
        base = commit_directory(repo, src, message="base").commit_id
        repo.refs.set_branch_if_equals("dev", base, None)
        _write(src, dict(base_files, **{"labels.txt": b"one\nTWO (ours)\nthree\n", "weights.bin": b"\0\1ours"}))
        ours = commit_directory(repo, src, message="ours").commit_id
        _write(src, dict(base_files, **{"labels.txt": b"one\ntwo (theirs)\nthree\n", "weights.bin": b"\0\1theirs",
                                        "new.txt": b"from dev\n"}))
        theirs = commit_directory(repo, src, branch="dev", message="theirs").commit_id
    return WS(url, src, base, tmp_path, mounts), ours, theirs


@pytest.mark.timeout(180)
def test_merge_into_a_workspace_resolve_with_ordinary_tools_and_commit(two_branches):
    ws, ours, theirs = two_branches
    mnt = ws.mount()
    proc = ws.cli("merge", "dev", str(mnt))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "conflicts to resolve in the mount" in proc.stderr
    out = proc.stdout
    assert "CONFLICT (modify/modify) labels.txt: conflict markers in it" in out
    assert "CONFLICT (modify/modify) weights.bin: ours as it is, weights.bin.theirs and weights.bin.base" in out
    text = (mnt / "labels.txt").read_text()
    assert text.startswith("<<<<<<< ours (main)\none\nTWO (ours)\n") and "=======\none\ntwo (theirs)\n" in text
    assert (mnt / "weights.bin").read_bytes() == b"\0\1ours"
    assert (mnt / "weights.bin.theirs").read_bytes() == b"\0\1theirs"
    assert (mnt / "weights.bin.base").read_bytes() == b"\0\1base"
    assert (mnt / "new.txt").read_bytes() == b"from dev\n"  # the clean part of the merge
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)
    assert status["merge"]["source"] == theirs.hex() and sorted(status["merge"]["unresolved"]) == [
        "labels.txt", "weights.bin"]
    assert "merge of dev" in ws.cli("status", str(mnt)).stdout
    (held,) = _holds(ws.url).values()  # the merged tree stays reachable while it is resolved
    with Repository.open(ws.url) as repo:
        kept = repo.load_commit(bytes.fromhex(held.decode().split()[0]))
        assert kept.parents == (ours, theirs) and repo.load_tree(kept.tree).get("weights.bin.theirs") is not None

    # Commit refuses while markers or .theirs/.base files remain.
    proc = ws.cli("commit", str(mnt), "-m", "too early")
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "unresolved" in line and "labels.txt" in line
    assert ws.head() == ours

    # The merge in progress survives a killed daemon and a remount.
    ws.kill(mnt)
    mnt = ws.mount()
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)
    assert status["merge"]["source"] == theirs.hex()

    # Resolve with ordinary tools: edit the text, keep theirs for the binary file.
    (mnt / "labels.txt").write_text("one\nTWO (both)\nthree\n")
    proc = ws.cli("commit", str(mnt), "-m", "still weights.bin")
    assert proc.returncode == 1 and "weights.bin" in proc.stderr and "labels.txt" not in proc.stderr
    os.rename(mnt / "weights.bin.theirs", mnt / "weights.bin")
    os.unlink(mnt / "weights.bin.base")
    assert json.loads(ws.cli("status", str(mnt), "--json").stdout)["merge"]["unresolved"] == []
    proc = ws.cli("commit", str(mnt), "-m", "merge dev", "--json")
    assert proc.returncode == 0, proc.stderr
    head = ws.head()
    assert json.loads(proc.stdout)["id"] == head.hex()
    log = json.loads(ws.cli("-r", ws.url, "log", "-n", "1", "--json").stdout)
    assert log[0]["parents"] == [ours.hex(), theirs.hex()]
    assert log[0]["metadata"]["commitfs.merge.base"] == ws.base.hex()
    with Repository.open(ws.url) as repo:
        tree = repo.load_tree(repo.load_commit(head).tree)
        assert sorted(e.name for e in tree.entries) == ["keep.txt", "labels.txt", "new.txt", "weights.bin"]
        assert bytes(repo.load_file(tree.get("weights.bin").id)) == b"\0\1theirs"
        assert bytes(repo.load_file(tree.get("labels.txt").id)) == b"one\nTWO (both)\nthree\n"
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)
    assert "merge" not in status and status["changes"] == []
    assert _holds(ws.url) == {}


@pytest.mark.timeout(120)
def test_reset_abandons_a_workspace_merge_and_a_dirty_workspace_refuses(two_branches):
    ws, ours, theirs = two_branches
    mnt = ws.mount()
    (mnt / "scratch.txt").write_text("an edit\n")
    proc = ws.cli("merge", "dev", str(mnt))
    assert "has edits" in assert_one_line_error(proc.returncode, proc.stderr)
    ws.cli("reset", str(mnt)).check_returncode()
    assert ws.cli("merge", "dev", str(mnt)).returncode == 1
    assert (mnt / "weights.bin.theirs").exists() and len(_holds(ws.url)) == 1
    ws.cli("reset", str(mnt)).check_returncode()
    assert _holds(ws.url) == {}
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)
    assert "merge" not in status and status["changes"] == []
    assert not (mnt / "weights.bin.theirs").exists() and not (mnt / "new.txt").exists()
    assert (mnt / "labels.txt").read_text() == "one\nTWO (ours)\nthree\n"
    assert ws.head() == ours
