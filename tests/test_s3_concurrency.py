"""Several writers on one S3 branch: compare-and-swap decides, nothing is lost.

* A commit that loses the race (another writer moved the branch while it
  uploaded) fails with a message saying so and what to do; its data stays
  stored and indexed, so the re-run uploads nothing but a commit object.
* Processes committing to the same branch in a loop, retrying on conflict:
  every commit that succeeded is in the final (linear) history.
* Processes pushing to the same branch from the same base at once: exactly
  one wins each round, the others are refused with a clear message; they
  reset to the winner, re-commit their directory and try again, until all
  have pushed.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
from core_fixtures import assert_fsck_clean, assert_one_line_error, cli_ok, describe, run_cli, write_file
from sync_fixtures import counting_repository

from commitfs.errors import RefConflictError
from commitfs.ops import history
from commitfs.ops.checkout import checkout
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository


def history_of(url: str, branch: str = "main") -> list:
    with Repository.open(url) as r:
        return [(cid, c) for cid, c in history.log(r, r.resolve(branch))]


def test_commit_that_loses_the_race_keeps_its_data(tmp_path, s3_url, cache_home):
    base, mine, theirs = tmp_path / "base", tmp_path / "mine", tmp_path / "theirs"
    write_file(base / "a", b"base")
    write_file(mine / "big.bin", random.Random(1).randbytes(2_000_000))
    write_file(theirs / "other", b"theirs")
    with Repository.init(s3_url) as r:
        commit_directory(r, base, message="base")

    won = []

    def other_writer_first(method: str, key: str) -> None:
        # Just before our compare-and-swap, another writer commits.
        if method == "save_ref_if_equals" and key == "branches/main" and not won:
            with Repository.open(s3_url) as other:
                won.append(commit_directory(other, theirs, message="theirs").commit_id)

    with counting_repository(s3_url) as repo:
        repo.store.before = other_writer_first
        with pytest.raises(RefConflictError) as excinfo:
            commit_directory(repo, mine, message="mine")
        assert str(excinfo.value) == (
            f"branch main moved to {won[0].hex()[:12]} while committing (another writer); "
            "your data is stored: re-run the commit to create it on top of the new head")
        assert repo.store.saved["packs"] >= 2_000_000
        repo.store.before = None
        repo.store.reset()
        result = commit_directory(repo, mine, message="mine")
        # The retry stored one commit object and no pack, no index segment.
        assert dict(repo.store.saved_count) == {"commits": 1}
        assert result.write.bytes_new_stored == 0
    log = history_of(s3_url)
    assert [c.message for _, c in log] == ["mine", "theirs", "base"]
    assert log[0][1].parents == (won[0],)
    with Repository.open(s3_url) as r:
        checkout(r, result.commit_id, tmp_path / "out")
    assert describe(tmp_path / "out") == describe(mine)


def _commit_with_retries(url: str, directory, message: str, attempts: list) -> str:
    """``commitfs commit`` until it succeeds; every failure must be the race's."""
    while True:
        proc = run_cli("-r", url, "commit", str(directory), "-m", message, "--json", timeout=120)
        if proc.returncode == 0:
            out = json.loads(proc.stdout)
            # blobs, not bytes_stored: that counts the retry's own commit object too
            attempts.append((message, out["blobs_new"]))
            return out["id"]
        line = assert_one_line_error(proc.returncode, proc.stderr.decode())
        assert "while committing (another writer)" in line and "re-run the commit" in line, line
        attempts.append((message, "conflict"))


def test_concurrent_committers_lose_nothing(tmp_path, s3_url, cache_home):
    workers, rounds = 3, 3
    cli_ok("-r", s3_url, "init")
    won: list[str] = []
    attempts: list = []
    errors: list = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        rng = random.Random(w)
        d = tmp_path / f"w{w}"
        try:
            for k in range(rounds):
                write_file(d / f"round{k}.bin", rng.randbytes(50_000))
                mine: list = []
                cid = _commit_with_retries(s3_url, d, f"w{w} r{k}", mine)
                with lock:
                    won.append(cid)
                    attempts.extend(mine)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    log = history_of(s3_url)
    ids = [cid.hex() for cid, _ in log]
    # Every commit that succeeded is on the branch, in one linear history.
    assert sorted(ids) == sorted(won) and len(ids) == workers * rounds
    assert all(len(c.parents) == 1 for _, c in log[:-1]) and log[-1][1].parents == ()
    # A commit that succeeded after losing a race stored no blob again.
    for i, (message, outcome) in enumerate(attempts):
        if outcome == "conflict":
            retry = next(o for m, o in attempts[i + 1:] if m == message and o != "conflict")
            assert retry == 0, (message, retry)
    conflicts = sum(1 for _, o in attempts if o == "conflict")
    print(f"\n{workers} committers x {rounds} commits: {conflicts} lost races, all retried")
    assert_fsck_clean(s3_url, read_data=False)


def test_concurrent_pushers_exactly_one_wins_each_round(tmp_path, s3_url, cache_home):
    pushers = 3
    base = tmp_path / "base"
    write_file(base / "readme", b"shared base")
    cli_ok("-r", s3_url, "init")
    cli_ok("-r", s3_url, "commit", str(base), "-m", "base")
    clones, dirs = [], []
    for i in range(pushers):
        clone = str(tmp_path / f"clone{i}")
        cli_ok("clone", s3_url, clone)
        d = tmp_path / f"work{i}"
        write_file(d / "readme", b"shared base")
        write_file(d / f"mine{i}.bin", random.Random(i).randbytes(100_000))
        cli_ok("-r", clone, "commit", str(d), "-m", f"pusher {i}")
        clones.append(clone)
        dirs.append(d)

    pending = list(range(pushers))
    winners: list[str] = []
    while pending:
        barrier = threading.Barrier(len(pending))
        results: dict[int, object] = {}

        def push(i: int) -> None:
            barrier.wait()
            results[i] = run_cli("-r", clones[i], "push", "--json", timeout=120)

        threads = [threading.Thread(target=push, args=(i,)) for i in pending]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [i for i in pending if results[i].returncode == 0]
        assert len(won) == 1, {i: results[i].stderr for i in pending}
        for i in pending:
            if i in won:
                continue
            line = assert_one_line_error(results[i].returncode, results[i].stderr.decode())
            assert ("remote branch main has commits you do not have: pull first, or --force" in line
                    or "while pushing" in line), line
        winner = won[0]
        with Repository.open(clones[winner]) as r:
            winners.append(r.refs.lookup_branch("main").hex())
        with Repository.open(s3_url) as r:
            assert r.refs.lookup_branch("main").hex() == winners[-1]
        pending.remove(winner)
        # The losers take the winner's head and commit their directory again on top.
        for i in pending:
            cli_ok("-r", clones[i], "pull", "--force")
            cli_ok("-r", clones[i], "commit", str(dirs[i]), "-m", f"pusher {i} again")

    log = history_of(s3_url)
    assert [cid.hex() for cid, _ in log[:pushers]] == winners[::-1]
    assert len(log) == pushers + 1
    assert_fsck_clean(s3_url)
