#!/usr/bin/env python3
"""Benchmark: a downstream lineage query on a repository of 10,000 commits, beside `log`.

    scripts/bench_lineage.py [--commits N] [--workdir DIR] [--json]

The target (issue 6): a downstream query with its index up to date costs at
most 0.1x of listing the same history with ``commitfs log``.  Both sides are
timed in one run on one repository:

* baseline: first-parent history of the head, every commit read and decoded
  (``ops.history.log``, what ``commitfs log`` does), on a freshly opened
  repository (no object cache);
* downstream, cold: the first query, which builds the index (reads every commit);
* downstream, warm: the next query from a fresh process state (list ``commits/``,
  nothing new to read, one SQLite lookup);
* downstream after 10 new commits: the incremental case (10 reads);
* the same two through the command line (process start-up included).

Commits are made directly (one tree, chained commits, one in ten naming an
input in a dataset repository) so that building 10k takes seconds.

To fold into scripts/bench.py: call ``measure(workdir, commits, log)`` from a
section and turn its result into rows with ``rows(result, Row)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from commitfs.model.objects import Commit, Tree
from commitfs.ops import history
from commitfs.ops import lineage as L
from commitfs.ops.lineage_index import index_path, query_lineage
from commitfs.repo.repository import Repository

# One commit in this many names the dataset commit as an input.
INPUT_EVERY = 10
TARGET_RATIO = 0.1


def build(workdir: Path, commits: int, log: Callable[[str], None]) -> tuple[str, str, bytes, bytes]:
    """(models URL, data URL, the dataset commit, the models head): made once per workdir."""
    models, data = workdir / f"models-{commits}", workdir / "data"
    marker = models / "bench-complete"
    if marker.exists():
        with Repository.open(str(models)) as m, Repository.open(str(data)) as d:
            return str(models), str(data), d.resolve("main"), m.resolve("main")
    shutil.rmtree(models, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    log(f"building a repository of {commits} commits in {models}")
    with Repository.init(str(data)) as d:
        with d.writer() as w:
            tid = w.add_tree(Tree.build([]))
        target = d.save_commit(Commit(tid, (), "bench", 1_700_000_000, "dataset", {}))
        d.refs.set_branch_if_equals("main", target, None)
    with Repository.init(str(models)) as m:
        with m.writer() as w:
            tid = w.add_tree(Tree.build([]))
        inp = L.input_metadata([L.Input(str(data), target, name="data", rev="main")])
        parent: bytes | None = None
        t0 = time.perf_counter()
        for i in range(commits):
            meta = dict(inp) if i % INPUT_EVERY == 0 else {"step": str(i)}
            parent = m.save_commit(Commit(tid, (parent,) if parent else (), "bench", 1_700_000_000 + i,
                                          f"commit {i}", meta))
        m.refs.set_branch_if_equals("main", parent, None)
        log(f"  {commits} commits in {time.perf_counter() - t0:.1f}s")
    marker.write_text("ok\n")
    return str(models), str(data), target, parent


def _timed(fn: Callable) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _best(fn: Callable, repeat: int = 3) -> tuple[float, object]:
    runs = [_timed(fn) for _ in range(repeat)]
    return min(r[0] for r in runs), runs[0][1]


def measure(workdir: Path, commits: int = 10_000, log: Callable[[str], None] = print) -> dict:
    """Times in seconds (best of 3 where repeatable) and the ratios to ``log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="lineage-cache-", dir=workdir))
    old_cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)  # the index goes here, not to the user's cache
    try:
        models, data, target, head = build(workdir, commits, log)
        expected = (commits + INPUT_EVERY - 1) // INPUT_EVERY

        def log_all() -> int:
            with Repository.open(models) as repo:
                return sum(1 for _ in history.log(repo, head))

        def downstream() -> int:
            with Repository.open(models) as repo, Repository.open(data) as d, L.RepositoryOpener() as op:
                report = query_lineage(d, target, op, [repo], up=False, depth=1)
                return len(report.downstream)

        t_log, n = _best(log_all)
        assert n == commits, n
        with Repository.open(models) as repo:
            shutil.rmtree(index_path(repo).parent, ignore_errors=True)
        t_cold, found = _timed(downstream)
        assert found == expected, (found, expected)
        t_warm, found = _best(downstream)
        assert found == expected
        # Ten commits arrive (from elsewhere: only the store is shared).
        with Repository.open(models) as repo:
            c = repo.load_commit(head)
            meta = L.input_metadata([L.Input(data, target, name="data")])
            parent = head
            for i in range(10):
                parent = repo.save_commit(Commit(c.tree, (parent,), "bench", int(time.time()) + i, f"new {i}", meta))
        t_incr, found = _timed(downstream)
        assert found == expected + 10
        # Through the command line (a process each).
        env = dict(os.environ)
        t_cli_log, _ = _best(lambda: subprocess.run(
            [sys.executable, "-m", "commitfs", "-r", models, "log", "--oneline", head.hex()],
            stdout=subprocess.DEVNULL, check=True, env=env))
        t_cli_lineage, _ = _best(lambda: subprocess.run(
            [sys.executable, "-m", "commitfs", "-r", data, "lineage", "main", "--downstream", "--depth", "1",
             "--search", models, "--json"], stdout=subprocess.DEVNULL, check=True, env=env))
        # Remove the 10 extra commits so the next run starts from the same repository.
        with Repository.open(models) as repo:
            for cid in set(repo.iter_commit_ids()) - _chain(repo, head):
                repo.store.remove_object(f"commits/{cid.hex()}")
        return {
            "commits": commits, "downstream_commits": expected,
            "log_s": t_log, "downstream_cold_s": t_cold, "downstream_warm_s": t_warm,
            "downstream_after_10_new_s": t_incr, "cli_log_s": t_cli_log, "cli_lineage_s": t_cli_lineage,
            "ratio_warm": t_warm / t_log, "ratio_incremental": t_incr / t_log,
            "ratio_cli": t_cli_lineage / t_cli_log, "target": TARGET_RATIO,
        }
    finally:
        if old_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old_cache
        shutil.rmtree(cache, ignore_errors=True)


def _chain(repo: Repository, head: bytes) -> set[bytes]:
    return {cid for cid, _ in history.log(repo, head)}


def rows(result: dict, Row) -> list:
    """scripts/bench.py rows (``Row(figure, value, baseline, unit, target)``)."""
    n = result["commits"]
    return [
        Row(f"downstream query, warm index ({n} commits) vs log", result["downstream_warm_s"], result["log_s"],
            "s", ("<=", TARGET_RATIO)),
        Row("downstream query after 10 new commits vs log", result["downstream_after_10_new_s"], result["log_s"],
            "s", ("<=", TARGET_RATIO)),
        Row("downstream query, building the index vs log", result["downstream_cold_s"], result["log_s"], "s"),
        Row("`commitfs lineage --downstream` vs `commitfs log --oneline`", result["cli_lineage_s"],
            result["cli_log_s"], "s"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/commitfs-bench/lineage"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args.workdir.absolute(), args.commits, lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"repository of {result['commits']} commits, {result['downstream_commits']} naming the input")
    for key, label in (("log_s", "log (baseline)"), ("downstream_cold_s", "downstream, building the index"),
                       ("downstream_warm_s", "downstream, warm index"),
                       ("downstream_after_10_new_s", "downstream after 10 new commits"),
                       ("cli_log_s", "CLI: commitfs log --oneline"), ("cli_lineage_s", "CLI: commitfs lineage")):
        print(f"  {label:36} {result[key] * 1000:9.1f} ms")
    for key in ("ratio_warm", "ratio_incremental"):
        ok = "PASS" if result[key] <= TARGET_RATIO else "MISS"
        print(f"  {key:36} {result[key]:9.3f}x  (target <= {TARGET_RATIO}x: {ok})")
    print(f"  {'ratio_cli (process start-up included)':36} {result['ratio_cli']:9.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
