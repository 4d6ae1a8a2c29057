"""commitfs log --graph: lanes for merges (ops/history.graph), through the CLI."""

from __future__ import annotations

import os

import pytest

from core_fixtures import cli_fails, run_cli
from commitfs.ops.merge import merge_into
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def history(local_url, tmp_path):
    """main: A - B - M - D, with M merging dev (A - C) and dev2 (A - E) merged by M2 after D."""
    repo = Repository.init(local_url)
    src = tmp_path / "src"
    src.mkdir()
    t = [1_700_000_000]

    def commit(name: str, branch: str, files: dict) -> bytes:
        for p in list(src.iterdir()):
            p.unlink()
        for path, text in files.items():
            (src / path).write_text(text)
            t[0] += 10
            os.utime(src / path, (t[0], t[0]))
        return commit_directory(repo, src, branch=branch, message=name).commit_id

    a = commit("A", "main", {"a": "1"})
    repo.refs.set_branch_if_equals("dev", a, None)
    repo.refs.set_branch_if_equals("dev2", a, None)
    commit("B", "main", {"a": "1", "b": "1"})
    commit("C", "dev", {"a": "1", "c": "1"})
    assert merge_into(repo, "dev", "main", message="M").status == "merged"
    commit("E", "dev2", {"a": "1", "e": "1"})
    commit("D", "main", {"a": "1", "b": "1", "c": "1", "d": "1"})
    assert merge_into(repo, "dev2", "main", message="M2").status == "merged"
    yield repo
    repo.close()


def _graph(local_url, *args) -> list[str]:
    proc = run_cli("-r", local_url, "log", "--graph", *args)
    assert proc.returncode == 0, proc.stderr
    return [" ".join(w for w in line.split() if len(w) != 12 or not all(ch in "0123456789abcdef" for ch in w))
            for line in proc.stdout.decode().splitlines()]


def test_graph_draws_merges_as_lanes(history, local_url):
    repo = history
    m2 = repo.load_commit(repo.refs.lookup_branch("main"))
    assert len(m2.parents) == 2  # the merges are real two-parent commits
    # B and C are both ready after M: the newer first (commit times are seconds; a tie
    # keeps the order the walk met them, M's parents in order: B).
    m = repo.load_commit(repo.load_commit(m2.parents[0]).parents[0])  # D, then M
    b, c = (repo.load_commit(p) for p in m.parents)
    bc = ["| * | C", "* | | B"] if c.time > b.time else ["* | | B", "| * | C"]
    assert _graph(local_url) == [
        "* M2",
        "|\\",
        "* | D",
        "| * E",
        "* | M",
        "|\\ \\",
        *bc,
        "|/ /",
        "|/",
        "* A",
    ]
    # The first-parent chain is the first column; -n counts commits.
    assert _graph(local_url, "-n", "2") == ["* M2", "|\\", "* | D"]
    # Without merges it is the plain chain.
    assert _graph(local_url, "dev") == ["* C", "* A"]


def test_graph_refuses_json_and_paths(history, local_url):
    line = cli_fails("-r", local_url, "log", "--graph", "--json", code=2)
    assert "--graph" in line
