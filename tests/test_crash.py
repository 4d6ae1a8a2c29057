"""Killing `commitfs commit` at any moment leaves the repository valid.

A real ``python -m commitfs commit`` of a tree of a few tens of MiB runs as a
subprocess and gets SIGKILL after a random (seeded) delay spread over its
whole run: before it starts, while it reads and uploads packs, while it
writes the index segment (or merges segments), the commit object, the branch,
the stat cache.  After each kill:

* fsck finds nothing wrong (re-hashing every pack and chunk: a torn pack
  would show; on S3 the re-hash is done once, at the end, to keep it quick);
* the branch names the old head, or a complete new commit whose parent is the
  old head (then a re-run of the same commit has nothing to do);
* a re-run of the commit succeeds.

At the end, a checkout of the branch equals the directory.  Which phase each
kill hit varies with the machine's speed; ``-s`` prints it.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

from commitfs.errors import NothingToCommitError
from commitfs.ops.checkout import checkout
from commitfs.ops.fsck import fsck
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from core_fixtures import cli_env, cli_ok, describe, reopen, write_file


def _fill(src, rng: random.Random, small: int, big: int, fraction: float = 1.0) -> None:
    """(Re)write about ``fraction`` of the files with fresh random bytes."""
    for i in range(small):
        if fraction >= 1 or rng.random() < fraction:
            write_file(src / f"shard{i % 8}" / f"item{i:04d}.bin", rng.randbytes(rng.randint(1_000, 120_000)))
    for i in range(big):
        if fraction >= 1 or rng.random() < fraction:
            write_file(src / "weights" / f"layer{i}.bin", rng.randbytes(rng.randint(2 << 20, 4 << 20)))
    write_file(src / "labels.csv", b"".join(f"{i},{rng.randrange(10)}\n".encode() for i in range(20_000)))


def _start_commit(url, src, message):
    return subprocess.Popen(
        [sys.executable, "-m", "commitfs", "-r", url, "commit", str(src), "-m", message],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
    )


def test_sigkill_during_commit_leaves_the_repository_valid(store_url, cache_home, tmp_path):
    local = not store_url.startswith("s3://")
    iterations = 8 if local else 2
    small, big = (100, 2) if local else (30, 0)
    rng = random.Random(1234)
    src = tmp_path / "src"
    _fill(src, rng, small, big)
    Repository.init(store_url).close()

    # Kill times are spread over a whole run: the process's start-up (timed
    # on a command that does nothing much) plus the commit's own work (timed
    # on the in-process re-runs, which do the same work as the killed run).
    start = time.monotonic()
    cli_ok("-r", store_url, "branch")
    startup = time.monotonic() - start
    start = time.monotonic()
    with reopen(store_url) as r:
        commit_directory(r, src, message="initial")
    work = time.monotonic() - start

    outcomes = []
    for i in range(iterations):
        _fill(src, rng, small, big, fraction=0.5)
        with reopen(store_url) as r:
            old = r.refs.lookup_branch("main")
        proc = _start_commit(store_url, src, f"attempt {i}")
        try:
            time.sleep(rng.uniform(0.0, (startup + work) * 1.1))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        assert killed or proc.returncode == 0, err.decode(errors="replace")
        assert b"Traceback" not in err

        with reopen(store_url) as r:
            now = r.refs.lookup_branch("main")
            report = fsck(r, read_data=local)  # on S3 data is re-hashed once, at the end
            assert report.problems == [], f"iteration {i}: {report.problems}"
            if now != old:  # the killed commit got through: it is complete and on top of the old head
                assert r.load_commit(now).parents == (old,)
                assert r.load_commit(now).message == f"attempt {i}"
        outcomes.append("killed before the branch moved" if now == old else
                        "killed after the branch moved" if killed else "finished")

        # The commit can be re-run: it has nothing to do if the killed one got through.
        with reopen(store_url) as r:
            start = time.monotonic()
            try:
                rerun = commit_directory(r, src, message=f"rerun {i}")
            except NothingToCommitError as exc:
                assert now != old and exc.commit_id == now  # the new commit has this very tree
            else:
                assert now == old and rerun.created
                assert r.load_commit(rerun.commit_id).parents == (old,)
                work = time.monotonic() - start

    with reopen(store_url) as r:
        report = fsck(r, read_data=True)
        assert report.ok and report.commits >= iterations + 1
        if local:  # (the round-trip tests check S3 checkouts)
            checkout(r, r.refs.lookup_branch("main"), tmp_path / "out")
            assert describe(tmp_path / "out") == describe(src)
    print("outcomes:", outcomes)  # shown with -s: where the kills landed this time
