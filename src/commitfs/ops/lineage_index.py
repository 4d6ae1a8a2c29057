"""The lineage index, and the lineage query (upstream and downstream) using it.

Downstream lineage ("what was trained on this dataset commit?") needs the
inverse of the ``lineage.input.*`` edges, which live only in the commits
that name their inputs.  Answering by reading every commit costs one object
read per commit: about as slow as ``commitfs log`` over the whole history,
and minutes on S3 for ten thousand commits.

Design: a local SQLite file per repository, under the user's cache directory
(``<cache>/commitfs/lineage/<repo id>-<url hash>.sqlite``), mapping commit id
-> (time, summary, inputs), with an index on the input id.  Before each
query it is brought up to date:

1. list ``commits/`` (Repository.iter_commit_ids): one directory read
   locally, one LIST request per 1000 commits on S3 -- cheap beside reading
   the objects;
2. read only the commit objects listed but not yet indexed (a thread pool,
   since on S3 each is a round trip) and insert their edges;
3. drop the entries of commits no longer listed (removed by gc).

Why this is correct: commit objects are immutable and named by the hash of
their content, so an indexed entry never goes stale; the listing is the
authority on which commits exist, so commits that arrived from another
machine or process are picked up by the next query, and removed ones
dropped.  Two processes updating one index at once insert the same rows
(``INSERT OR REPLACE``) inside SQLite transactions.  The index is a cache:
deleting it costs one full read; if the cache directory is unusable an
in-memory index is built for the query.

Why not store the inverse edges in the repository (say, objects under
``lineage/``): it would be a format change that every writer must honour,
and a writer that does not (an older commitfs, a hand-made commit) would
silently leave holes; a derived local index cannot disagree with the
commits it was derived from.
"""

from __future__ import annotations

import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from commitfs.errors import CommitfsError, CorruptObjectError, ObjectNotFoundError, ReadSetError, RepositoryError
from commitfs.ops import readset
from commitfs.model.ids import HEX_SIZE, hash_bytes
from commitfs.model.objects import Commit, DecodeError
from commitfs.ops.lineage import (
    DownstreamNode,
    Input,
    RepositoryOpener,
    RunInfo,
    UpstreamNode,
    parse_lineage,
    summary,
    upstream,
)
from commitfs.ops.root import cache_root
from commitfs.repo.repository import COMMITS_PREFIX, Repository, commit_key

SCHEMA_VERSION = "2"  # 2: read sets (table reads)
_COMMIT_NAME = re.compile(r"[0-9a-f]{%d}" % HEX_SIZE)
# Parallel commit reads when indexing: on S3 each read is a round trip.
_READ_THREADS = 16
# Rows per SQLite transaction while indexing a large backlog.
_BATCH = 2000
# Seconds a writer waits for another process's transaction on the same index.
_BUSY_TIMEOUT = 30.0


def index_path(repo: Repository) -> Path:
    if not re.fullmatch(r"[0-9a-f]{32}", repo.id):  # Repository checks it; a path must never depend on that
        raise RepositoryError(f"{repo.url}: the repository id {repo.id!r:.80} is not 32 hex digits")
    key = hash_bytes(repo.url.encode()).hex()[:16]
    return cache_root() / "lineage" / f"{repo.id}-{key}.sqlite"


@dataclass(frozen=True)
class DownstreamRow:
    commit: bytes
    pos: int
    name: str | None
    url: str
    time: int | None
    summary: str | None


@dataclass
class UpdateStats:
    listed: int = 0
    read: int = 0
    removed: int = 0
    problems: list[str] = field(default_factory=list)


def _read_commit(repo: Repository, cid: bytes) -> Commit | None:
    """The commit, None if it vanished since the listing; raise if corrupt.

    Reads the store directly (not Repository.load_commit, whose LRU cache is
    not shared safely between the pool's threads)."""
    try:
        data = repo.store.load_object(commit_key(cid))
    except ObjectNotFoundError:
        return None
    if hash_bytes(data) != cid:
        raise CorruptObjectError(f"commit {cid.hex()} fails its hash check")
    try:
        return Commit.decode(data)
    except DecodeError as exc:
        raise CorruptObjectError(f"commit {cid.hex()} is malformed: {exc}") from None


class LineageIndex:
    def __init__(self, repo: Repository, path: Path | None = None):
        self.repo = repo
        self.url = repo.url
        self.path = index_path(repo) if path is None else path
        self.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, isolation_level=None)
            self._create(db)
            return db
        except (OSError, sqlite3.Error):
            # An unusable cache directory only costs speed.
            self.path = Path(":memory:")
            db = sqlite3.connect(":memory:", isolation_level=None)
            self._create(db)
            return db

    def _create(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if self._schema(db) == SCHEMA_VERSION:
            return  # the common case: no write, so closing costs no checkpoint
        with _transaction(db):
            if self._schema(db) not in (None, SCHEMA_VERSION):
                for table in ("commits", "inputs", "problems", "reads"):
                    db.execute(f"DROP TABLE IF EXISTS {table}")
            db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("CREATE TABLE IF NOT EXISTS commits (id BLOB PRIMARY KEY, time INT, summary TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS inputs (commit_id BLOB, pos INT, url TEXT, input_id BLOB, "
                       "name TEXT, PRIMARY KEY (commit_id, pos))")
            db.execute("CREATE INDEX IF NOT EXISTS inputs_by_input ON inputs (input_id)")
            db.execute("CREATE TABLE IF NOT EXISTS problems (commit_id BLOB, message TEXT)")
            db.execute("CREATE INDEX IF NOT EXISTS problems_by_commit ON problems (commit_id)")
            # The read set of a commit made by `run --record-reads` (ops/readset.py): which
            # files (content id, path) of which input (position) its command read.
            db.execute("CREATE TABLE IF NOT EXISTS reads (commit_id BLOB, pos INT, path TEXT, file_id BLOB)")
            db.execute("CREATE INDEX IF NOT EXISTS reads_by_file ON reads (file_id)")
            db.execute("CREATE INDEX IF NOT EXISTS reads_by_commit ON reads (commit_id)")

    @staticmethod
    def _schema(db: sqlite3.Connection) -> str | None:
        try:
            row = db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        except sqlite3.OperationalError:
            return None  # no meta table yet
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LineageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- updating -------------------------------------------------------------------
    def update(self) -> UpdateStats:
        """Index the commits listed but not yet indexed; forget those gone."""
        stats = UpdateStats()
        listed = self._list()
        stats.listed = len(listed)
        known = {row[0] for row in self.db.execute("SELECT id FROM commits")}
        gone = known - listed
        new = sorted(listed - known)
        if gone:
            with _transaction(self.db):
                for cid in gone:
                    self._delete(cid)
            stats.removed = len(gone)
        for start in range(0, len(new), _BATCH):
            batch = new[start:start + _BATCH]
            results = self._read_all(batch)
            with _transaction(self.db):
                for cid, commit, error in results:
                    if error is not None:
                        stats.problems.append(error)
                        continue
                    if commit is None:
                        continue  # removed since the listing
                    self._insert(cid, commit)
                    stats.read += 1
        return stats

    def _list(self) -> set[bytes]:
        """Every commit id in the store (Repository.iter_commit_ids, with a cheaper name check)."""
        out = set()
        for key in self.repo.store.iter_keys(COMMITS_PREFIX):
            name = key[len(COMMITS_PREFIX):]
            if _COMMIT_NAME.fullmatch(name):
                out.add(bytes.fromhex(name))
        return out

    def _read_all(self, ids: list[bytes]) -> list[tuple[bytes, Commit | None, str | None]]:
        def one(cid: bytes):
            try:
                return cid, _read_commit(self.repo, cid), None
            except CommitfsError as exc:
                return cid, None, f"{self.url}: {exc}"

        if len(ids) < 8:
            return [one(cid) for cid in ids]
        with ThreadPoolExecutor(min(_READ_THREADS, len(ids)), thread_name_prefix="commitfs-lineage") as pool:
            return list(pool.map(one, ids))

    def _delete(self, cid: bytes) -> None:
        self.db.execute("DELETE FROM commits WHERE id=?", (cid,))
        self.db.execute("DELETE FROM inputs WHERE commit_id=?", (cid,))
        self.db.execute("DELETE FROM problems WHERE commit_id=?", (cid,))
        self.db.execute("DELETE FROM reads WHERE commit_id=?", (cid,))

    def _insert(self, cid: bytes, commit: Commit) -> None:
        self._delete(cid)
        self.db.execute("INSERT INTO commits VALUES (?, ?, ?)", (cid, commit.time, summary(commit.message)))
        parsed = parse_lineage(commit.metadata)
        self.db.executemany(
            "INSERT INTO inputs VALUES (?, ?, ?, ?, ?)",
            [(cid, pos, inp.url, inp.commit, inp.name) for pos, inp in enumerate(parsed.inputs)],
        )
        problems = list(parsed.problems)
        try:
            entries = readset.commit_readset(self.repo, commit.metadata)
            if entries is not None:
                pos_of = {inp.name: pos for pos, inp in enumerate(parsed.inputs) if inp.name}
                self.db.executemany("INSERT INTO reads VALUES (?, ?, ?, ?)",
                                    ((cid, pos_of.get(e.input, -1), e.path, e.file_id) for e in entries))
        except ReadSetError as exc:
            problems.append(str(exc))
        self.db.executemany("INSERT INTO problems VALUES (?, ?)", [(cid, p) for p in problems])

    # --- queries -----------------------------------------------------------------------
    def lookup_downstream(self, cid: bytes) -> list[DownstreamRow]:
        rows = self.db.execute(
            "SELECT i.commit_id, i.pos, i.name, i.url, c.time, c.summary FROM inputs i "
            "JOIN commits c ON c.id = i.commit_id WHERE i.input_id=? ORDER BY c.time, i.commit_id, i.pos",
            (cid,),
        ).fetchall()
        return [DownstreamRow(*r) for r in rows]

    def lookup_readers(self, file_id: bytes) -> list[tuple]:
        """(commit, input position, input name, input url, input commit, path, time, summary) of
        every indexed commit whose read set has a file with this content id."""
        return self.db.execute(
            "SELECT r.commit_id, r.pos, i.name, i.url, i.input_id, r.path, c.time, c.summary FROM reads r "
            "JOIN commits c ON c.id = r.commit_id LEFT JOIN inputs i ON i.commit_id = r.commit_id AND i.pos = r.pos "
            "WHERE r.file_id=? ORDER BY c.time, r.commit_id, r.path", (file_id,)).fetchall()

    def problems(self) -> list[tuple[bytes, str]]:
        return list(self.db.execute("SELECT commit_id, message FROM problems ORDER BY commit_id"))

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM commits").fetchone()[0]


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


# --- the query ---------------------------------------------------------------------------
def downstream(indexes: list[LineageIndex], cid: bytes, depth: int | None = None,
               _seen: frozenset[bytes] | None = None) -> list[DownstreamNode]:
    """Commits in the indexed repositories naming ``cid`` as an input, recursively."""
    seen = frozenset({cid}) if _seen is None else _seen
    nodes = []
    for index in indexes:
        for row in index.lookup_downstream(cid):
            node = DownstreamNode(index.url, row.commit, row.name, row.time, row.summary)
            nodes.append(node)
            if row.commit in seen or (depth is not None and depth <= 1):
                continue
            node.downstream = downstream(indexes, row.commit, None if depth is None else depth - 1,
                                         seen | {row.commit})
    nodes.sort(key=lambda n: (n.time or 0, n.repo, n.commit))
    return nodes


@dataclass
class LineageReport:
    repo: str
    commit: bytes
    time: int
    summary: str
    inputs: list[Input]
    run: RunInfo
    upstream: list[UpstreamNode]
    downstream: list[DownstreamNode]
    searched: list[str]
    problems: list[str]

    def to_json(self) -> dict:
        return {
            "repo": self.repo, "id": self.commit.hex(), "time": self.time, "summary": self.summary,
            "inputs": [i.to_json() for i in self.inputs], "run": self.run.to_json(),
            "upstream": [n.to_json() for n in self.upstream],
            "downstream": [n.to_json() for n in self.downstream],
            "searched": self.searched, "problems": self.problems,
        }


def query_lineage(
    repo: Repository,
    cid: bytes,
    opener: RepositoryOpener,
    search: list[Repository] | None = None,
    *,
    depth: int | None = None,
    up: bool = True,
    down: bool = True,
) -> LineageReport:
    """Upstream of ``cid`` (across any repository ``opener`` can open) and its
    downstream in the ``search`` repositories (default: ``repo``)."""
    search = [repo] if search is None else search
    commit = repo.load_commit(cid)
    parsed = parse_lineage(commit.metadata)
    problems = [f"commit {cid.hex()[:12]}: {p}" for p in parsed.problems]
    for r in search:
        opener.add(r)
    ups = upstream(opener, commit, depth) if up else []
    downs: list[DownstreamNode] = []
    if down:
        indexes = []
        try:
            for r in search:
                index = LineageIndex(r)
                indexes.append(index)
                stats = index.update()
                problems.extend(stats.problems)
                problems.extend(f"{r.url}: commit {c.hex()[:12]}: {msg}" for c, msg in index.problems()
                                if not (c == cid and r.url == repo.url))  # reported above
            downs = downstream(indexes, cid, depth)
        finally:
            for index in indexes:
                index.close()
    return LineageReport(repo.url, cid, commit.time, summary(commit.message), parsed.inputs, parsed.run,
                         ups, downs, [r.url for r in search] if down else [], problems)


# --- which commits read a file ------------------------------------------------------------
@dataclass
class Reader:
    """A commit whose run read a file (``--trained-on``)."""

    repo: str
    commit: bytes
    input_name: str | None
    input_repo: str | None
    input_commit: bytes | None
    path: str
    time: int | None
    summary: str | None

    def to_json(self) -> dict:
        return {"repo": self.repo, "id": self.commit.hex(), "input": self.input_name, "input_repo": self.input_repo,
                "input_id": self.input_commit.hex() if self.input_commit else None, "path": self.path,
                "time": self.time, "summary": self.summary}


@dataclass
class TrainedOnReport:
    dataset_repo: str
    dataset_commit: bytes
    path: str
    file_id: bytes
    readers: list[Reader]
    searched: list[str]
    problems: list[str]

    def to_json(self) -> dict:
        return {"repo": self.dataset_repo, "id": self.dataset_commit.hex(), "path": self.path,
                "file_id": self.file_id.hex(), "readers": [r.to_json() for r in self.readers],
                "searched": self.searched, "problems": self.problems}


def trained_on(dataset: Repository, cid: bytes, path: str, search: list[Repository]) -> TrainedOnReport:
    """Commits in ``search`` whose recorded read set holds the file ``path`` of commit ``cid``
    (matched by content id: the same bytes read through any commit of any input)."""
    from commitfs.ops.browse import lookup_path

    entry = lookup_path(dataset, cid, path)
    if not entry.kind.is_file:
        raise CommitfsError(f"{path} is not a file in {cid.hex()[:12]}")
    readers, problems = [], []
    for repo in search:
        with LineageIndex(repo) as index:
            stats = index.update()
            problems.extend(stats.problems)
            problems.extend(f"{repo.url}: commit {c.hex()[:12]}: {m}" for c, m in index.problems()
                            if "read set" in m)
            for c, pos, name, url, input_id, p, t, summ in index.lookup_readers(entry.id):
                readers.append(Reader(repo.url, c, name, url, input_id, p, t, summ))
    return TrainedOnReport(dataset.url, cid, path, entry.id, readers, [r.url for r in search], problems)
