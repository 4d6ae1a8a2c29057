"""commitfs merge: the three-way matrix of path cases, fast-forward, strategies and rules,
a branch moving during the merge, bad input, and SIGKILL during a merge."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from core_fixtures import assert_one_line_error, cli_env, cli_fails, cli_ok, reopen, run_cli
from commitfs.errors import AttributesError, MergeError, RevisionError
from commitfs.model.objects import Kind
from commitfs.ops.fsck import fsck
from commitfs.ops.merge import META_BASE, MergeOptions, merge_bases, merge_into
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository


def _write(root, files: dict) -> None:
    """files: path -> bytes | ("x", bytes) executable | ("l", target) symlink | ("d",) empty dir."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for path, v in files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(v, bytes):
            p.write_bytes(v)
        elif v[0] == "x":
            p.write_bytes(v[1])
            os.chmod(p, 0o755)
        elif v[0] == "l":
            os.symlink(v[1], p)
        else:
            p.mkdir()


def _lookup(repo, cid, path):
    e = None
    tid = repo.load_commit(cid).tree
    for name in path.split("/"):
        e = repo.load_tree(tid).get(name)
        if e is None:
            return None
        tid = e.id
    return e


def _read(repo, cid, path):
    e = _lookup(repo, cid, path)
    if e is None:
        return None
    if e.kind is Kind.SYMLINK:
        return ("l", e.target.decode())
    if e.kind is Kind.DIR:
        return ("d",)
    data = bytes(repo.load_file(e.id))
    return ("x", data) if e.kind is Kind.EXEC else data


# Each case: base, ours (main), theirs (dev) of the files under its directory, and the
# expected merge: a dict of files, or the (path, kind) of the one conflict.
A, B, C = b"a\n", b"b\n", b"c\n"
CASES = {
    "ours-modified": ({"f": A}, {"f": B}, {"f": A}, {"f": B}),
    "theirs-modified": ({"f": A}, {"f": A}, {"f": C}, {"f": C}),
    "same-change": ({"f": A}, {"f": B}, {"f": B}, {"f": B}),
    "ours-added": ({}, {"f": A}, {}, {"f": A}),
    "theirs-added": ({}, {}, {"f": A}, {"f": A}),
    "both-added-same": ({}, {"f": A}, {"f": A}, {"f": A}),
    "ours-deleted": ({"f": A, "k": A}, {"k": A}, {"f": A, "k": A}, {"k": A}),
    "theirs-deleted": ({"f": A, "k": A}, {"f": A, "k": A}, {"k": A}, {"k": A}),
    "both-deleted": ({"f": A, "k": A}, {"k": A}, {"k": A}, {"k": A}),
    "bit-and-content": ({"f": A}, {"f": ("x", A)}, {"f": C}, {"f": ("x", C)}),
    "dir-both-add": ({"d/k": A}, {"d/k": A, "d/o": B}, {"d/k": A, "d/t": C}, {"d/k": A, "d/o": B, "d/t": C}),
    "symlink-one-side": ({"l": ("l", "x")}, {"l": ("l", "y")}, {"l": ("l", "x")}, {"l": ("l", "y")}),
    "modify-modify": ({"f": A}, {"f": B}, {"f": C}, ("f", "modify/modify")),
    "add-add": ({}, {"f": B}, {"f": C}, ("f", "add/add")),
    "modify-delete": ({"f": A, "k": A}, {"f": B, "k": A}, {"k": A}, ("f", "modify/delete")),
    "delete-modify": ({"f": A, "k": A}, {"k": A}, {"f": C, "k": A}, ("f", "delete/modify")),
    "file-dir": ({"f": A}, {"f/inner": B}, {"f": C}, ("f", "file/directory")),
    "add-file-dir": ({"k": A}, {"k": A, "f": B}, {"k": A, "f/inner": C}, ("f", "file/directory")),
    "symlink-target": ({"l": ("l", "x")}, {"l": ("l", "y")}, {"l": ("l", "z")}, ("l", "symlink")),
    "executable-bit": ({"k": A}, {"k": A, "f": ("x", B)}, {"k": A, "f": B}, ("f", "executable")),
    "dir-deleted-vs-edited": ({"d/f": A, "k": A}, {"k": A}, {"d/f": C, "k": A}, ("d", "delete/modify")),
}


def _sides(i: int) -> dict:
    out = {}
    for name, case in CASES.items():
        for path, v in case[i].items():
            out[f"{name}/{path}"] = v
        out[f"{name}/keep"] = b"keep\n"  # every case directory exists on every side
    return out


@pytest.fixture
def matrix(store_url, cache_home, tmp_path):
    repo = Repository.init(store_url)
    src = tmp_path / "src"
    _write(src, _sides(0))
    base = commit_directory(repo, src, message="base").commit_id
    repo.refs.set_branch_if_equals("dev", base, None)
    _write(src, _sides(1))
    ours = commit_directory(repo, src, message="ours").commit_id
    _write(src, _sides(2))
    theirs = commit_directory(repo, src, branch="dev", message="theirs").commit_id
    yield repo, base, ours, theirs
    repo.close()


def _check_clean_cases(repo, cid):
    for name, (_b, _o, _t, expect) in CASES.items():
        if isinstance(expect, dict):
            for path, v in expect.items():
                assert _read(repo, cid, f"{name}/{path}") == v, name
            if "f" not in expect:
                assert _read(repo, cid, f"{name}/f") is None, name


def test_the_matrix_of_path_cases(matrix):
    repo, base, ours, theirs = matrix
    # Without a strategy: exactly the conflict cases conflict, and nothing moves.
    result = merge_into(repo, "dev", "main")
    assert result.status == "conflicts" and result.base == base and result.commit_id is None
    want = sorted((f"{name}/{e[0]}", e[1]) for name, (*_, e) in CASES.items() if isinstance(e, tuple))
    assert sorted((c.path, c.kind) for c in result.conflicts) == want
    assert repo.refs.lookup_branch("main") == ours

    # --strategy theirs: every conflict takes theirs; clean cases merge as they did.
    result = merge_into(repo, "dev", "main", options=MergeOptions(strategy="theirs"))
    assert result.status == "merged"
    cid = result.commit_id
    assert repo.refs.lookup_branch("main") == cid
    c = repo.load_commit(cid)
    assert c.parents == (ours, theirs) and c.metadata[META_BASE] == base.hex()
    _check_clean_cases(repo, cid)
    for name, (_b, _o, t, e) in CASES.items():
        if isinstance(e, tuple):
            path = f"{name}/{e[0]}"
            assert _read(repo, cid, path) == (t.get(e[0]) if e[0] in t else
                                              ("d",) if any(k.startswith(e[0] + "/") for k in t) else None), name
    assert _read(repo, cid, "add-file-dir/f/inner") == C
    assert _read(repo, cid, "dir-deleted-vs-edited/d/f") == C


def test_strategy_ours_and_rules_first_match_wins(matrix):
    repo, base, ours, theirs = matrix
    rules = [("modify-modify/*", "theirs"), ("*-delete", "theirs"), ("**/f", "ours"), ("modify-modify/f", "ours")]
    result = merge_into(repo, "dev", "main", options=MergeOptions(rules=rules), dry_run=True)
    left = sorted(c.path for c in result.conflicts)
    # Every conflict at a path named f was resolved by a rule; the others are left.
    assert left == ["dir-deleted-vs-edited/d", "symlink-target/l"]
    assert repo.refs.lookup_branch("main") == ours  # a dry run moves nothing
    how = {r.path: r.how for r in result.resolved}
    assert how["modify-modify/f"] == "theirs"  # the first matching rule, not the later "ours"
    assert how["add-add/f"] == "ours"
    result = merge_into(repo, "dev", "main", options=MergeOptions(strategy="ours", rules=rules))
    cid = result.commit_id
    assert _read(repo, cid, "modify-modify/f") == C
    assert _read(repo, cid, "add-add/f") == B
    assert _read(repo, cid, "symlink-target/l") == ("l", "y")  # the strategy: ours
    assert _read(repo, cid, "dir-deleted-vs-edited/d") is None
    _check_clean_cases(repo, cid)


@pytest.fixture
def two(local_url, tmp_path):
    """A local repository: main and dev each one commit past their base."""
    repo = Repository.init(local_url)
    src = tmp_path / "src"
    _write(src, {"a.txt": A, "b.txt": A, "d/x": A})
    base = commit_directory(repo, src, message="base").commit_id
    repo.refs.set_branch_if_equals("dev", base, None)
    yield repo, src, base
    repo.close()


def _commit(repo, src, files, branch="main"):
    _write(src, files)
    return commit_directory(repo, src, branch=branch, message=f"on {branch}").commit_id


def test_fast_forward_up_to_date_and_no_ff(two, local_url):
    repo, src, base = two
    dev = _commit(repo, src, {"a.txt": B, "b.txt": A, "d/x": A}, "dev")
    out = json.loads(cli_ok("-r", local_url, "merge", "dev", "--json").stdout)
    assert out["status"] == "fast-forward" and out["id"] == dev.hex()
    assert repo.refs.lookup_branch("main") == dev
    out = json.loads(cli_ok("-r", local_url, "merge", "dev", "--json").stdout)
    assert out["status"] == "up-to-date" and out["id"] is None
    assert b"already up to date" in cli_ok("-r", local_url, "merge", "dev").stdout
    # main ahead of dev: merging dev is up to date too.
    head = _commit(repo, src, {"a.txt": B, "b.txt": C, "d/x": A})
    assert json.loads(cli_ok("-r", local_url, "merge", "dev", "--json").stdout)["status"] == "up-to-date"
    # --no-ff: a merge commit even where a fast-forward would do.
    repo.refs.set_branch_if_equals("topic", head, None)
    topic = _commit(repo, src, {"a.txt": B, "b.txt": C, "d/x": C}, "topic")
    proc = cli_ok("-r", local_url, "merge", "topic", "--no-ff", "-m", "merge topic")
    cid = bytes.fromhex(proc.stdout.decode().strip())
    c = repo.load_commit(cid)
    assert c.parents == (head, topic) and c.message == "merge topic" and c.tree == repo.load_commit(topic).tree
    assert c.metadata[META_BASE] == head.hex()
    # log shows both parents of a merge.
    log = json.loads(cli_ok("-r", local_url, "log", "--json").stdout)
    assert log[0]["parents"] == [head.hex(), topic.hex()]


def test_a_clean_merge_and_a_conflict_from_the_command_line(two, local_url):
    repo, src, base = two
    ours = _commit(repo, src, {"a.txt": B, "b.txt": A, "d/x": A})
    theirs = _commit(repo, src, {"a.txt": A, "b.txt": C, "d/x": C}, "dev")
    cid = bytes.fromhex(cli_ok("-r", local_url, "merge", "dev").stdout.decode().strip())
    assert repo.load_commit(cid).parents == (ours, theirs)
    assert (_read(repo, cid, "a.txt"), _read(repo, cid, "b.txt"), _read(repo, cid, "d/x")) == (B, C, C)

    # Now a conflict: exit 1, the list on stdout, one line on stderr, nothing moved.
    ours2 = _commit(repo, src, {"a.txt": b"ours\n", "b.txt": C, "d/x": C})
    _commit(repo, src, {"a.txt": b"theirs\n", "b.txt": C, "d/x": C}, "dev")
    proc = run_cli("-r", local_url, "merge", "dev")
    line = assert_one_line_error(proc.returncode, proc.stderr.decode())
    assert "1 conflict" in line and "nothing was changed" in line
    assert proc.stdout.decode().splitlines() == ["CONFLICT (modify/modify) a.txt"]
    proc = run_cli("-r", local_url, "merge", "dev", "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["status"] == "conflicts" and [(c["path"], c["kind"]) for c in out["conflicts"]] == [
        ("a.txt", "modify/modify")]
    assert repo.refs.lookup_branch("main") == ours2


def test_bad_input_is_one_line_and_moves_nothing(two, local_url):
    repo, src, base = two
    _commit(repo, src, {"a.txt": B, "b.txt": A, "d/x": A})
    _commit(repo, src, {"a.txt": A, "b.txt": C, "d/x": A}, "dev")
    repo.refs.create_tag("v1", base)
    before = repo.refs.branches()
    assert "unknown revision 'nope'" in cli_fails("-r", local_url, "merge", "nope")
    assert "no branch 'nope'" in cli_fails("-r", local_url, "merge", "dev", "--into", "nope")
    assert "cannot merge into tag 'v1'" in cli_fails("-r", local_url, "merge", "dev", "--into", "v1")
    assert "--rule expects" in cli_fails("-r", local_url, "merge", "dev", "--rule", "x=maybe", code=2)
    assert "--key expects" in cli_fails("-r", local_url, "merge", "dev", "--key", "x", code=2)
    # An attributes file that does not parse.
    _commit(repo, src, {"a.txt": B, "b.txt": A, "d/x": A, ".commitfs/attributes": b"*.csv merge=sometimes\n"})
    line = cli_fails("-r", local_url, "merge", "dev")
    assert ".commitfs/attributes, line 1" in line and "merge='sometimes'" in line
    with pytest.raises(AttributesError):
        merge_into(repo, "dev", "main")
    assert repo.refs.branches()["dev"] == before["dev"]
    with pytest.raises(MergeError):
        merge_into(repo, "dev", "v1")
    with pytest.raises(RevisionError):
        merge_into(repo, "nope", "main")


def test_the_branch_moving_during_the_merge(two, monkeypatch):
    """A commit lands on BRANCH between the merge's commit and its compare-and-swap: the merge
    is redone on the new head; if the new head conflicts, it is refused and nothing is lost."""
    repo, src, base = two
    _commit(repo, src, {"a.txt": B, "b.txt": A, "d/x": A})
    theirs = _commit(repo, src, {"a.txt": A, "b.txt": C, "d/x": A}, "dev")
    other = Repository.open(repo.url)  # the concurrent writer: its own repository object
    concurrent = {}
    real = Repository.save_commit

    def save_then_race(self, commit):
        cid = real(self, commit)
        if self is repo and len(commit.parents) == 2 and "id" not in concurrent:
            other_src = src.parent / "other"
            _write(other_src, concurrent.get("files") or {"a.txt": B, "b.txt": A, "d/x": b"other\n"})
            concurrent["id"] = commit_directory(other, other_src, message="concurrent").commit_id
        return cid

    monkeypatch.setattr(Repository, "save_commit", save_then_race)
    result = merge_into(repo, "dev", "main")
    assert result.attempts == 2 and result.status == "merged"
    c = repo.load_commit(result.commit_id)
    assert c.parents == (concurrent["id"], theirs)  # redone on the new head: its change is kept
    assert (_read(repo, result.commit_id, "b.txt"), _read(repo, result.commit_id, "d/x")) == (C, b"other\n")
    assert repo.refs.lookup_branch("main") == result.commit_id

    # The concurrent commit now conflicts with the source: refused, the concurrent commit stays.
    concurrent.clear()
    _commit(repo, src, {"a.txt": A, "b.txt": b"theirs\n", "d/x": A}, "dev")
    concurrent["files"] = {"a.txt": B, "b.txt": b"clash\n", "d/x": b"other\n"}
    result = merge_into(repo, "dev", "main")
    assert result.attempts == 2
    assert result.status == "conflicts" and [c.path for c in result.conflicts] == ["b.txt"]
    assert repo.refs.lookup_branch("main") == concurrent["id"]
    other.close()


def test_merge_bases_of_a_criss_cross(two, local_url):
    """Several nearest common ancestors: all are reported, the newest is the base."""
    from commitfs.model.objects import Commit

    repo, src, base = two
    m1 = _commit(repo, src, {"a.txt": B, "b.txt": A, "d/x": A})
    d1 = _commit(repo, src, {"a.txt": A, "b.txt": B, "d/x": A}, "dev")
    assert merge_bases(repo, m1, d1) == [base]
    tree = repo.load_commit(merge_into(repo, "dev", "main").commit_id).tree
    x = repo.refs.lookup_branch("main")
    y = repo.save_commit(Commit(tree, (d1, m1), "t", repo.load_commit(x).time, "the other way", {}))
    repo.refs.set_branch_if_equals("dev", y, d1)
    assert sorted(merge_bases(repo, x, y)) == sorted([m1, d1])
    m2 = _commit(repo, src, {"a.txt": B, "b.txt": B, "d/x": C})
    d2 = _commit(repo, src, {"a.txt": B, "b.txt": B, "d/x": A, "n": A}, "dev")
    result = merge_into(repo, "dev", "main")
    assert sorted(result.bases) == sorted([m1, d1]) and result.base == result.bases[0]
    # (changes on paths both bases agree on: clean whichever base is picked)
    assert result.status == "merged" and repo.load_commit(result.commit_id).parents == (m2, d2)
    assert (_read(repo, result.commit_id, "n"), _read(repo, result.commit_id, "d/x")) == (A, C)


@pytest.mark.timeout(120)
def test_sigkill_during_merge_leaves_old_head_or_the_whole_merge(local_url, cache_home, tmp_path):
    repo = Repository.init(local_url)
    rng = random.Random(7)
    src = tmp_path / "src"
    files = {f"d{i % 20}/f{i}.bin": rng.randbytes(2000) for i in range(500)}
    _write(src, files)
    base = commit_directory(repo, src, message="base").commit_id
    repo.close()
    start = time.monotonic()
    cli_ok("-r", local_url, "branch")
    startup = time.monotonic() - start
    outcomes = []
    for i in range(5):
        with reopen(local_url) as r:
            head0 = r.refs.lookup_branch("main")
            r.refs.set_branch_if_equals(f"side{i}", head0, None)
            keys = rng.sample(sorted(files), 160)
            ours = dict(files, **{k: rng.randbytes(3000) for k in keys[:80]})
            theirs = dict(files, **{k: rng.randbytes(3000) for k in keys[80:]})
            _write(src, ours)
            head = commit_directory(r, src, message=f"ours {i}").commit_id
            _write(src, theirs)
            side = commit_directory(r, src, branch=f"side{i}", message=f"theirs {i}").commit_id
            files = dict(ours, **{k: theirs[k] for k in keys[80:]})
        proc = subprocess.Popen([sys.executable, "-m", "commitfs", "-r", local_url, "merge", f"side{i}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
        try:
            time.sleep(rng.uniform(0, startup * 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode(errors="replace")
        with reopen(local_url) as r:
            now = r.refs.lookup_branch("main")
            assert fsck(r, read_data=False).problems == []
            if now != head:  # the whole merge commit, never a part of it
                assert r.load_commit(now).parents == (head, side)
            outcomes.append("old head" if now == head else "merged")
            if now == head:  # merging again finishes the job
                assert merge_into(r, f"side{i}", "main").status == "merged"
            now = r.refs.lookup_branch("main")
            for k in keys:
                assert _read(r, now, k) == files[k]
    print("outcomes:", outcomes)
    assert base


def test_log_and_diff_of_a_merge(two, local_url):
    """log shows a merge's parents; diff A...B compares B with the merge base of A and B."""
    repo, src, base = two
    ours = _commit(repo, src, {"a.txt": B, "b.txt": A, "d/x": A})
    theirs = _commit(repo, src, {"a.txt": A, "b.txt": C, "d/x": A, "new": C}, "dev")
    out = json.loads(cli_ok("-r", local_url, "diff", "main...dev", "--json").stdout)
    assert sorted((c["status"], c["path"]) for c in out) == [("added", "new"), ("modified", "b.txt")]
    plain = json.loads(cli_ok("-r", local_url, "diff", "main", "dev", "--json").stdout)
    assert ("modified", "a.txt") in {(c["status"], c["path"]) for c in plain}  # two dots' worth: not the same
    cid = bytes.fromhex(cli_ok("-r", local_url, "merge", "dev").stdout.decode().strip())
    text = cli_ok("-r", local_url, "log", "-n", "1").stdout.decode()
    assert f"Merge:  {ours.hex()[:12]} {theirs.hex()[:12]}" in text and cid.hex() in text


def test_pull_merge(tmp_path, cache_home):
    """pull --merge merges a diverged remote branch instead of refusing; a conflict moves nothing."""
    up_url, down_url = str(tmp_path / "up"), str(tmp_path / "down")
    up = Repository.init(up_url)
    src = tmp_path / "src"
    base = _commit(up, src, {"a.txt": A, "b.txt": A})
    up.close()
    cli_ok("clone", up_url, down_url)
    with reopen(up_url) as r:
        theirs = _commit(r, src, {"a.txt": A, "b.txt": C})
    with reopen(down_url) as r:
        ours = _commit(r, tmp_path / "src2", {"a.txt": B, "b.txt": A})
    assert "diverged" in cli_fails("-r", down_url, "pull")
    proc = cli_ok("-r", down_url, "pull", "--merge", "--json")
    (u,) = [u for u in json.loads(proc.stdout)["updates"] if u.get("name") == "main"]
    assert u["status"] == "merged"
    with reopen(down_url) as r:
        head = r.refs.lookup_branch("main")
        assert head.hex() == u["new"] and r.load_commit(head).parents == (ours, theirs)
        assert (_read(r, head, "a.txt"), _read(r, head, "b.txt")) == (B, C)
        assert r.load_commit(head).metadata[META_BASE] == base.hex()
    # Both change a.txt: exit 1 with the conflict, the local branch stays.
    with reopen(up_url) as r:
        _commit(r, src, {"a.txt": b"up\n", "b.txt": C})
    with reopen(down_url) as r:
        mine = _commit(r, tmp_path / "src2", {"a.txt": b"down\n", "b.txt": C})
    proc = run_cli("-r", down_url, "pull", "--merge")
    line = assert_one_line_error(proc.returncode, proc.stderr.decode())
    assert "1 conflict (a.txt)" in line and "nothing was changed" in line
    assert "CONFLICT (modify/modify) a.txt" in proc.stdout.decode()
    with reopen(down_url) as r:
        assert r.refs.lookup_branch("main") == mine
