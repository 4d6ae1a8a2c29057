"""Aliases (ops/alias.py, repo/aliases.py, cli/alias.py): set, move, protect, force, rm and the
audit log on both backends; concurrent moves; revisions; push/pull/clone; a real mount.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from core_fixtures import cli_fails, cli_ok, reopen, write_file

from commitfs.errors import CorruptObjectError, InputError, RefConflictError, RevisionError
from commitfs.ops import alias as alias_op
from commitfs.ops import sync
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.aliases import AliasState, log_key
from commitfs.repo.repository import Repository

pytestmark = pytest.mark.timeout(120)


def _commits(repo, tmp_path, n: int, start: int = 0) -> list[bytes]:
    out = []
    d = tmp_path / "src"
    for i in range(start, start + n):
        write_file(d / "v.txt", f"version {i}".encode())
        out.append(commit_directory(repo, d, branch="main", message=f"v{i}").commit_id)
    return out


def _log(repo, name):
    return [e for _, e in alias_op.alias_log(repo, name)]


def test_set_move_protect_force_rm_and_the_log(repo, tmp_path):
    a, b, c = _commits(repo, tmp_path, 3)
    assert alias_op.set_alias(repo, "production", a.hex(), reason="first model").status == "created"
    assert repo.resolve("production") == a == repo.resolve("aliases/production")
    assert alias_op.set_alias(repo, "production", a.hex()).status == "up-to-date"  # no entry
    assert alias_op.set_alias(repo, "production", "main~1", reason="better", protect=True).status == "moved"
    # Protected: no move, no unprotect, no removal without force; nothing logged.
    with pytest.raises(InputError, match="protected.*--force"):
        alias_op.set_alias(repo, "production", "main")
    with pytest.raises(InputError, match="protected"):
        alias_op.set_alias(repo, "production", b.hex(), protect=False)
    with pytest.raises(InputError, match="protected"):
        alias_op.remove_alias(repo, "production")
    assert repo.resolve("production") == b
    move = alias_op.set_alias(repo, "production", "main", reason="hotfix", force=True)
    assert (move.status, move.forced) == ("moved", True)
    assert repo.aliases.lookup("production").protected  # force keeps the protection
    with pytest.raises(RevisionError, match="unknown revision 'nosuch'"):
        alias_op.set_alias(repo, "production", "nosuch", force=True)
    alias_op.remove_alias(repo, "production", reason="retired", force=True)
    with pytest.raises(RevisionError):
        repo.resolve("production")
    assert alias_op.list_aliases(repo) == [] and [i.name for i in alias_op.list_aliases(repo, removed=True)] == ["production"]

    # The log, from a fresh view of the store (as another machine would read it), newest first.
    fresh = reopen(repo.url)
    log = _log(fresh, "production")
    assert [(e.action, e.old, e.new, e.reason, e.forced, e.protected) for e in log] == [
        ("rm", c, None, "retired", True, False),
        ("set", b, c, "hotfix", True, True),
        ("set", a, b, "better", False, True),
        ("set", None, a, "first model", False, False),
    ]
    assert {e.who for e in log} == {"tester@example"} and all(e.when.endswith("Z") for e in log)
    # Set again after removal: the log goes on.
    alias_op.set_alias(repo, "production", a.hex(), reason="back")
    assert [e.action for e in _log(reopen(repo.url), "production")] == ["set", "rm", "set", "set", "set"]


def test_names_that_are_branches_or_tags_are_refused(repo, tmp_path):
    (a,) = _commits(repo, tmp_path, 1)
    repo.refs.create_tag("v1", a)
    for name in ("main", "v1"):
        with pytest.raises(InputError, match="cannot have a"):
            alias_op.set_alias(repo, name, "main")
    with pytest.raises(RevisionError, match="invalid alias name"):
        alias_op.set_alias(repo, "../x", "main")
    alias_op.set_alias(repo, "team/prod", "main")
    with pytest.raises(Exception, match="cannot exist beside"):
        alias_op.set_alias(repo, "team", "main")
    # A branch made later with an alias's name wins; aliases/NAME still names the alias.
    (b,) = _commits(repo, tmp_path / "x", 1, start=10)
    repo.refs.set_branch_if_equals("team/prod", b, None)
    assert repo.resolve("team/prod") == b and repo.resolve("aliases/team/prod") == a


def test_concurrent_moves_exactly_one_wins(repo, tmp_path):
    commits = _commits(repo, tmp_path, 6)
    alias_op.set_alias(repo, "production", commits[0].hex())
    raw = repo.aliases.lookup_raw("production")  # every writer read this value
    barrier = threading.Barrier(5)
    outcomes: dict[int, object] = {}

    def mover(i: int) -> None:
        view = reopen(repo.url)
        barrier.wait()
        try:
            outcomes[i] = alias_op.set_alias(view, "production", commits[i + 1].hex(), reason=f"writer {i}",
                                             expected=raw)
        except RefConflictError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcomes.items() if isinstance(o, alias_op.AliasMove)]
    assert len(winners) == 1, outcomes
    assert all("moved by someone else" in str(o) for i, o in outcomes.items() if i not in winners)
    w = winners[0]
    fresh = reopen(repo.url)
    assert fresh.resolve("production") == commits[w + 1]
    log = _log(fresh, "production")
    assert [(e.old, e.new, e.reason) for e in log] == [(commits[0], commits[w + 1], f"writer {w}"),
                                                       (None, commits[0], "")]
    # The losers' entries exist as objects but are in no log.
    assert sum(1 for _ in fresh.store.iter_keys("aliaslog/")) == 2 + 4


def test_cli_alias_verbs(tmp_path, cache_home):
    url = str(tmp_path / "r")
    cli_ok("-r", url, "init")
    write_file(tmp_path / "d" / "a", b"1")
    cli_ok("-r", url, "commit", str(tmp_path / "d"), "-m", "one")
    first = json.loads(cli_ok("-r", url, "show", "main", "--json").stdout)["id"]
    out = json.loads(cli_ok("-r", url, "alias", "set", "production", "main", "-m", "ship it", "--protect",
                            "--json").stdout)
    assert out["status"] == "created" and out["to"] == first
    write_file(tmp_path / "d" / "a", b"2")
    cli_ok("-r", url, "commit", str(tmp_path / "d"), "-m", "two")
    err = cli_fails("-r", url, "alias", "set", "production", "main")
    assert "protected" in err and "--force" in err
    assert "unknown revision" in cli_fails("-r", url, "alias", "set", "staging", "nosuch")
    assert "no alias 'nosuch'" in cli_fails("-r", url, "alias", "log", "nosuch")
    assert "is a branch" in cli_fails("-r", url, "alias", "set", "main", "main")
    assert b"FORCED" not in cli_ok("-r", url, "alias", "log", "production").stdout
    cli_ok("-r", url, "alias", "set", "production", "main", "--force", "-m", "hotfix")
    log = json.loads(cli_ok("-r", url, "alias", "log", "production", "--json").stdout)
    assert [(e["reason"], e["forced"]) for e in log] == [("hotfix", True), ("ship it", False)]
    assert b"FORCED  hotfix" in cli_ok("-r", url, "alias", "log", "production").stdout
    ls = json.loads(cli_ok("-r", url, "alias", "ls", "--json").stdout)
    assert [(a["name"], a["protected"], a["reason"]) for a in ls] == [("production", True, "hotfix")]
    show = json.loads(cli_ok("-r", url, "show", "production", "--json").stdout)
    assert show["message"] == "two"
    assert cli_ok("-r", url, "alias", "show", "production").stdout.startswith(b"alias production\ncommit    ")
    # lineage starts from the alias
    lin = json.loads(cli_ok("-r", url, "lineage", "production", "--json").stdout)
    assert lin["id"] == show["id"]
    cli_ok("-r", url, "alias", "rm", "production", "--force", "-m", "retired")
    assert "unknown revision 'production'" in cli_fails("-r", url, "show", "production")
    assert json.loads(cli_ok("-r", url, "alias", "log", "production", "--json").stdout)[0]["action"] == "rm"


def test_a_missing_or_corrupt_log_entry_is_reported(local_repo, tmp_path):
    (a,) = _commits(local_repo, tmp_path, 1)
    alias_op.set_alias(local_repo, "production", a.hex())
    alias_op.set_alias(local_repo, "production", a.hex(), protect=True)
    head = local_repo.aliases.lookup("production").log
    path = os.path.join(local_repo.url, log_key(head))
    with open(path, "r+b") as f:
        f.seek(5)
        f.write(b"X")
    with pytest.raises(CorruptObjectError, match="does not match its id"):
        alias_op.alias_log(local_repo, "production")
    err = cli_fails("-r", local_repo.url, "alias", "log", "production")
    assert "alias log entry" in err and "corrupt" in err
    os.unlink(path)
    assert "is missing" in cli_fails("-r", local_repo.url, "alias", "log", "production")
    # ls still lists it, with the problem as a warning
    proc = cli_ok("-r", local_repo.url, "alias", "ls")
    assert proc.stdout.startswith(b"production\t") and b"warning" in proc.stderr and b"missing" in proc.stderr


def test_aliases_through_push_pull_and_clone(tmp_path, s3_url, cache_home):
    local = Repository.init(str(tmp_path / "local"))
    remote = Repository.init(s3_url)
    try:
        a, b = _commits(local, tmp_path, 2)
        alias_op.set_alias(local, "production", a.hex(), reason="v1")
        alias_op.set_alias(local, "production", b.hex(), reason="v2", protect=True)
        alias_op.set_alias(local, "staging", b.hex())
        alias_op.remove_alias(local, "staging", reason="unused")
        res = sync.push(local, remote, "main")
        assert {(u.name, u.status) for u in res.updates if u.kind == "alias"} == {("production", "created"),
                                                                                ("staging", "created")}
        fresh = reopen(s3_url)
        assert fresh.resolve("production") == b and fresh.aliases.lookup("production").protected
        assert [e.reason for e in _log(fresh, "production")] == ["v2", "v1"]
        assert _log(fresh, "staging")[0].action == "rm"

        # Moved on the remote (another machine), then pulled; then a clone has it all.
        c = _commits(fresh, tmp_path / "other", 1, start=10)[0]
        alias_op.set_alias(fresh, "production", c.hex(), reason="v3", force=True)
        res = sync.pull(local, remote, "main")
        assert [(u.name, u.status) for u in res.updates if u.kind == "alias" and u.name == "production"] == [
            ("production", "fast-forward")]
        assert local.resolve("production") == c
        assert [e.reason for e in _log(local, "production")] == ["v3", "v2", "v1"]
        assert sync.push(local, remote, "main").updates[-2].status == "up-to-date"

        clone = Repository.init(str(tmp_path / "clone"))
        sync.clone(clone, remote)
        assert clone.resolve("production") == c and clone.has_commit(c)
        assert [(e.reason, e.forced) for e in _log(clone, "production")] == [("v3", True), ("v2", False),
                                                                              ("v1", False)]

        # Both sides move it: the logs diverge; sync reports it and moves nothing.
        alias_op.set_alias(local, "production", a.hex(), reason="local", force=True)
        alias_op.set_alias(fresh, "production", b.hex(), reason="remote", force=True)
        res = sync.push(local, remote, "main", force=True)
        assert [u.status for u in res.updates if u.name == "production"] == ["diverged"]
        assert reopen(s3_url).resolve("production") == b and local.resolve("production") == a
        # Local behind the remote's log: "ahead" on pull, nothing moves.
        alias_op.set_alias(clone, "staging2", c.hex())
        sync.push(clone, remote, "main", force=True)
        res = sync.pull(clone, remote, "main")
        assert [u.status for u in res.updates if u.name == "staging2"] == ["up-to-date"]
        clone.close()
    finally:
        local.close()
        remote.close()


@pytest.mark.timeout(90)
def test_aliases_in_a_real_mount(tmp_path, mounts):
    url = str(tmp_path / "r")
    repo = Repository.init(url)
    try:
        a, b = _commits(repo, tmp_path, 2)
        alias_op.set_alias(repo, "production", a.hex())
        alias_op.set_alias(repo, "team/staging", b.hex())
        alias_op.set_alias(repo, "old", b.hex())
        alias_op.remove_alias(repo, "old")
        mnt = mounts.mountpoint()
        mounts.mount(url, mnt, "--refresh", "0.5")
        assert sorted(os.listdir(mnt / "aliases")) == ["production", "team"]
        assert (mnt / "aliases" / "production" / "v.txt").read_text() == "version 0"
        assert (mnt / "aliases" / "team" / "staging" / "v.txt").read_text() == "version 1"
        assert os.getxattr(mnt / "aliases" / "production", "user.commitfs.commit").decode() == a.hex()
        alias_op.set_alias(repo, "production", b.hex())
        deadline = time.monotonic() + 30
        while (mnt / "aliases" / "production" / "v.txt").read_text() != "version 1":
            assert time.monotonic() < deadline, "the alias view did not follow the alias"
            time.sleep(0.1)
        assert b.hex() in os.listdir(mnt / "commits")
        # A mount of the alias as REV is pinned at the commit it names then.
        pinned = mounts.mountpoint("pinned")
        mounts.mount(url, pinned, rev="production")
        assert (pinned / "v.txt").read_text() == "version 1"
    finally:
        repo.close()
