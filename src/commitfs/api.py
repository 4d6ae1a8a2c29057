"""The Python API for training code and notebooks.

    import commitfs
    repo = commitfs.Repository.open("s3://bucket/datasets")
    cid = repo.commit("data/", branch="main", message="v2 labels")
    for item in repo.walk("main"):
        ...
    with repo.open("main", "train/labels.csv") as f:
        header = f.readline()
    for fd in repo.diff("main", contents=True, keys=["path"]):   # main vs its parent
        if fd.table:
            print(fd.path, fd.table.counts)
    repo.diff_tensors("v1", "v2", "model.safetensors").unchanged
    repo.stats("main").unique_stored_bytes

Files open lazily: only the chunks a read touches are fetched.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

from commitfs.errors import IsADirectoryError_, NothingToCommitError, PathNotFoundError
from commitfs.ops import browse, contentdiff, history
from commitfs.ops.browse import WalkItem
from commitfs.ops.checkout import checkout
from commitfs.ops.contentdiff import FileDiff
from commitfs.ops.diff import Change, diff_trees
from commitfs.ops.root import init_repository, open_repository
from commitfs.ops.snapshot import commit_directory
from commitfs.ops.stats import CommitStats, RepositoryStats, commit_stats, repository_stats
from commitfs.ops.tablediff import TableDiff, diff_table
from commitfs.ops.tensordiff import TensorDiff, diff_safetensors
from commitfs.repo.repository import Repository as _Repo


class _OpenMethod:
    """``Repository.open(url)`` opens a repository; ``repo.open(rev, path)`` a file."""

    def __get__(self, obj, cls):
        if obj is None:
            return cls._open_repository
        return obj._open_file


class Repository:
    open = _OpenMethod()

    def __init__(self, repo: _Repo):
        self._repo = repo

    @classmethod
    def _open_repository(cls, url: str, *, cache_dir=False, endpoint_url: str | None = None) -> Repository:
        """The repository at ``url`` (a path, ``file://`` or ``s3://``).  ``cache_dir``:
        keep fetched chunks of a remote repository in a verified disk cache there
        (True: the default cache directory; False, the default: no cache)."""
        return cls(open_repository(url, cache_dir=cache_dir, endpoint_url=endpoint_url))

    @classmethod
    def init(cls, url: str, *, endpoint_url: str | None = None) -> Repository:
        return cls(init_repository(url, endpoint_url=endpoint_url))

    @property
    def url(self) -> str:
        return self._repo.url

    def close(self) -> None:
        self._repo.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve(self, rev: str) -> str:
        """The full commit id (hex) a revision names."""
        return self._repo.resolve(rev).hex()

    def commit(self, path, *, branch: str = "main", message: str = "", metadata: dict[str, str] | None = None,
               inputs: list[str] | dict[str, str] | None = None) -> str:
        """Commit a directory; return the new commit id (or the head's if nothing changed).

        ``inputs``: lineage inputs, ``"[REPO_URL@]REV"`` strings (or a dict
        name -> such a string), each recorded as its full commit id resolved
        now (docs/LINEAGE.md)."""
        if inputs:
            from commitfs.ops import lineage

            if isinstance(inputs, dict):
                specs = [lineage.parse_input_spec(f"{k}={v}", named=True) for k, v in inputs.items()]
                lineage.check_unique_names(specs)
            else:
                specs = [lineage.parse_input_spec(s) for s in inputs]
            with lineage.RepositoryOpener(known=[self._repo]) as opener:
                resolved = lineage.resolve_inputs(specs, self._repo, opener)
            metadata = lineage.merge_metadata(metadata, lineage.input_metadata(resolved))
        try:
            return commit_directory(self._repo, path, branch=branch, message=message, metadata=metadata).commit_id.hex()
        except NothingToCommitError as exc:
            return exc.commit_id.hex()

    def walk(self, rev: str, path: str = "") -> Iterator[WalkItem]:
        """Every entry below ``path`` of a revision (items have .path and .entry)."""
        return browse.walk(self._repo, self._repo.resolve(rev), path)

    def _open_file(self, rev: str, path: str) -> io.BufferedReader:
        raw = browse.open_file(self._repo, self._repo.resolve(rev), path)
        return io.BufferedReader(raw, buffer_size=256 * 1024)

    def log(self, rev: str = "main", limit: int | None = None) -> list[dict]:
        return [history.commit_json(cid, c) for cid, c in history.log(self._repo, self._repo.resolve(rev), limit)]

    def show(self, rev: str) -> dict:
        cid = self._repo.resolve(rev)
        return history.commit_json(cid, self._repo.load_commit(cid))

    def diff(self, old: str, new: str | None = None, *, paths: Sequence[str] = (), contents: bool = False,
             keys: Sequence[str] = (), values: bool = False) -> list[Change] | list[FileDiff]:
        """Changed files from ``old`` to ``new`` (None: from ``old``'s first
        parent to ``old``), below ``paths`` if given: Change records
        (.status, .path, .old, .new entries).  ``contents=True``: FileDiff
        records instead, each with the Change (.change) and, for tables and
        .safetensors files, .table (a TableDiff: rows keyed by ``keys`` or by
        position) or .tensors (a TensorDiff; ``values``: max abs and relative
        L2 differences); .error if a table did not parse."""
        r = self._repo
        a, b = contentdiff.resolve_pair(r, old, new)
        if not contents:
            if not paths and a is not None:
                return list(diff_trees(r, r.load_commit(a).tree, r.load_commit(b).tree))
            return list(contentdiff.iter_changes(r, a, b, paths))
        return list(contentdiff.iter_file_diffs(r, a, b, paths, keys=keys, values=values))

    def diff_table(self, old: str, new: str, path: str, keys: Sequence[str] = ()) -> TableDiff:
        """The row diff of one table between two revisions (a side without the file: all rows added/removed)."""
        r = self._repo
        return diff_table(r, self._entry(old, path), self._entry(new, path), path, keys)

    def diff_tensors(self, old: str, new: str, path: str, values: bool = False) -> TensorDiff:
        """The tensor diff of one .safetensors file between two revisions."""
        return diff_safetensors(self._repo, self._entry(old, path), self._entry(new, path), values=values)

    def path_log(self, path: str, rev: str = "main", limit: int | None = None) -> list[dict]:
        """The commits of ``rev``'s first-parent history where ``path`` changed (commit objects as log's)."""
        r = self._repo
        return [history.commit_json(cid, c) for cid, c, _, _ in contentdiff.path_history(r, r.resolve(rev), path, limit)]

    def stats(self, rev: str | None = None) -> CommitStats | RepositoryStats:
        """A commit's stats (files, logical bytes, stored bytes unique to it and shared), or the repository's."""
        if rev is None:
            return repository_stats(self._repo)
        return commit_stats(self._repo, self._repo.resolve(rev))

    def _entry(self, rev: str, path: str):
        r = self._repo
        try:
            e = browse.lookup_path(r, r.resolve(rev), path)
        except PathNotFoundError:
            return None
        if not e.kind.is_file:
            raise IsADirectoryError_(f"{path} is not a file in {rev}")
        return e

    def checkout(self, rev: str, dest, path: str = "") -> int:
        return checkout(self._repo, self._repo.resolve(rev), dest, path)

    def branches(self) -> dict[str, str]:
        return {n: c.hex() for n, c in self._repo.refs.branches().items()}


def run(command: list[str], *, output, to: str, inputs: dict[str, str] | list[str] | None = None,
        repo: str | None = None, message: str | None = None, commit_on_failure: bool = False,
        cwd=None, endpoint_url: str | None = None, record_reads: bool = False, env: list[str] = (),
        cache: bool = True, cache_from: list[str] = (), **store_options):
    """Run ``command`` on mounted inputs and commit ``output`` with lineage, as
    ``commitfs run`` does (docs/LINEAGE.md); return an ops.run.RunResult
    (``.status``, ``.exit_code``, ``.commit_id``...).  Call it from the main
    thread (it handles SIGINT/SIGTERM while the command runs).

    ``inputs``: {name: "[REPO_URL@]REV"} (or "NAME=[REPO_URL@]REV" strings);
    ``to``: "[REPO_URL@]BRANCH"; ``repo``: the repository of specs without URL;
    ``record_reads``, ``env`` (names), ``cache``, ``cache_from``: as
    ``--record-reads``, ``--env``, ``--no-cache`` (False), ``--cache-from``."""
    from commitfs.fuse.runmounts import Mounts
    from commitfs.ops import run as run_op

    if isinstance(inputs, dict):
        inputs = [f"{k}={v}" for k, v in inputs.items()]
    if endpoint_url:
        store_options["endpoint_url"] = endpoint_url
    spec = run_op.RunSpec(command=list(command), output=str(output), to=to, inputs=list(inputs or []),
                          repo=str(repo) if repo is not None else None, message=message,
                          commit_on_failure=commit_on_failure, cwd=str(cwd) if cwd is not None else None,
                          record_reads=record_reads, env_names=list(env), use_cache=cache,
                          cache_from=list(cache_from))
    return run_op.run(spec, lambda: Mounts(endpoint_url), store_options=store_options)
