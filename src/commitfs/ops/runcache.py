"""The run cache: a ``commitfs run`` whose inputs, command, code and declared
environment match an earlier successful run is not run again.

**The run key** (``lineage.run.key``, 64 hex) is the BLAKE3 of canonical JSON
``{"v": 1, "inputs": [[name, repository URL, commit id], ...], "command":
[...], "code": <git commit>, "env": {NAME: value or null}}``: the inputs as
resolved (full commit ids), the command line, the git commit of the work tree
the command runs in, and the values of the variables declared with ``--env
NAME`` (only those: the rest of the environment does not count).  There is a
key only when the work tree is a clean git checkout: without git, or with
tracked files modified, nothing says which code ran, so the run is neither
looked up nor keyed (``cache`` says why).

**A hit** is a commit in the target branch's first-parent history (at most
``SEARCH_LIMIT`` commits back), or in the history of a branch of a
``--cache-from`` repository, whose ``lineage.run.key`` equals the key and
whose ``lineage.run.exit_code`` is 0.  Only commits reachable now are
searched, so a commit that gc removed (unreachable by definition) is never
a hit; one whose object cannot be read is skipped.

**Read-set hits** (``--record-reads``).  Such a run also stores
``lineage.run.basekey``: the same key without the input commit ids (names
and URLs only).  A later ``--record-reads`` run with the same base key hits
a commit with a read set if, for every file of that read set, the new
input of the same name has the same content id at the same path: an input
commit that changed only files the job never read still hits.  What this
guarantees: the command's earlier run read exactly those files (their first
reads, docs/LINEAGE.md), and all of them are unchanged; so if the command's
behaviour depends only on the bytes it reads, its command line, code and
declared environment, it would read the same files again and produce the
same result.  It does not hold for a command whose choices depend on what
it did not read: a directory listing (a new file in a listed directory),
a file's existence or size alone, the time, randomness without a fixed
seed.  Use ``--no-cache`` for those, or do not record reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from commitfs.errors import CommitfsError
from commitfs.model.ids import hash_bytes
from commitfs.ops import readset
from commitfs.ops.browse import lookup_path
from commitfs.ops.history import log
from commitfs.ops.lineage import Input
from commitfs.repo.repository import Repository

KEY = "lineage.run.key"
BASE_KEY = "lineage.run.basekey"
SEARCH_LIMIT = 10_000


def _digest(doc: dict) -> str:
    return hash_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hex()


@dataclass(frozen=True)
class RunKeys:
    key: str | None       # None: no cache (``why`` says why)
    base: str | None
    why: str | None = None


def run_keys(inputs: list[Input], command: list[str], git_commit: str | None, git_dirty: bool | None,
             env_names: Iterable[str], environ: Mapping[str, str]) -> RunKeys:
    if git_commit is None:
        return RunKeys(None, None, "not in a git work tree: nothing says which code ran")
    if git_dirty or git_dirty is None:
        return RunKeys(None, None, "the git work tree has modified tracked files")
    env = {n: environ.get(n) for n in sorted(set(env_names))}
    common = {"v": 1, "command": list(command), "code": git_commit, "env": env}
    key = _digest({**common, "inputs": [[i.name, i.url, i.commit.hex()] for i in inputs]})
    base = _digest({**common, "inputs": [[i.name, i.url] for i in inputs]})
    return RunKeys(key, base)


@dataclass(frozen=True)
class Hit:
    repo: str
    commit: bytes
    by: str  # "key" or "readset"


def _candidates(repos: list[tuple[Repository, list[bytes]]]):
    """(repo, commit id, commit) along the first-parent history of each start commit."""
    seen = set()
    for repo, starts in repos:
        for start in starts:
            try:
                for cid, commit in log(repo, start, SEARCH_LIMIT):
                    if (repo.url, cid) in seen:
                        break
                    seen.add((repo.url, cid))
                    yield repo, cid, commit
            except CommitfsError:
                continue  # an unreadable commit ends that history: no hit from it


def _readset_matches(repo: Repository, commit, inputs: list[Input], opener_repos: Mapping[str, Repository]) -> bool:
    try:
        entries = readset.commit_readset(repo, commit.metadata)
        if entries is None:
            return False
        by_name = {i.name: i for i in inputs}
        for e in entries:
            inp = by_name.get(e.input)
            if inp is None:
                return False
            src = opener_repos[inp.url]
            try:
                if lookup_path(src, inp.commit, e.path).id != e.file_id:
                    return False
            except CommitfsError:
                return False  # the path is gone (or unreadable) in the new input
        return True
    except CommitfsError:
        return False


def lookup(keys: RunKeys, search: list[tuple[Repository, list[bytes]]], *, inputs: list[Input],
           by_readset: bool, input_repos: Mapping[str, Repository]) -> Hit | None:
    """The first earlier successful run with these keys, or None."""
    if keys.key is None:
        return None
    for repo, cid, commit in _candidates(search):
        meta = commit.metadata
        if meta.get("lineage.run.exit_code") != "0":
            continue
        if meta.get(KEY) == keys.key:
            return Hit(repo.url, cid, "key")
        if by_readset and meta.get(BASE_KEY) == keys.base and readset.META_KEY in meta:
            if _readset_matches(repo, commit, inputs, input_repos):
                return Hit(repo.url, cid, "readset")
    return None
