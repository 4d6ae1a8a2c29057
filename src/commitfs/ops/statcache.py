"""The stat cache: what makes re-committing a directory cost the change.

For each directory committed to a repository from this machine, a small
SQLite file under the user's cache directory remembers, per committed
directory (one row per directory, not per file):

- ``stat``: the directory's own (mtime_ns, inode) and, for each entry in
  name order, its name, kind and what ``lstat`` said of it (files: size,
  mtime_ns, inode, ctime_ns; symlinks: the target; directories: mtime_ns and
  inode), as one marshalled list;
- ``ids``: the file id committed for each file entry, 32 bytes each in entry
  order (zeros for a file not trusted, see below);
- ``tree``/``size``: the tree id and size committed for the directory, or
  NULL when some file in it was not trusted;

plus the commit the rows belong to.  A later commit from the same directory
to the same repository compares a directory's fresh ``stat`` list with the
row's: if equal, every file in it is unchanged (none is looked up one by
one), and if every subdirectory is unchanged too, its tree id is reused
without building, encoding or storing anything.  Otherwise each file whose
entry is unchanged keeps its id and only the others are read.

Racy entries are not trusted: a file modified within two seconds before the
scan that recorded it could change again without its mtime moving, so such
entries are stored without an id and re-read next time (git's "racy clean"
rule).  The cache is advisory: deleting it only costs a full re-read.

Memory does not grow with the dataset: rows are keyed by the directory's
path with NUL for '/' (``_key``), so key order is the order a depth-first
walk visiting names in sorted order meets directories (ops/snapshot.py walks
so).  ``load`` opens one cursor over the rows in that order and ``take``
advances it in step with the walk (a merge join: rows skipped are
directories that are gone), so only the row at hand is in memory.  Rows of
the directories that changed go to a staging table in batches as the commit
records them; ``save`` moves them in and deletes the gone rows in one
transaction, once the commit exists.  So a scan costs one query, writes cost
one statement per batch of rows, and a commit that fails leaves the cache as
it was.
"""

from __future__ import annotations

import marshal
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from commitfs.model.ids import hash_bytes
from commitfs.ops.root import cache_root

_RACY_NS = 2_000_000_000
ID_SIZE = 32
UNTRUSTED = bytes(ID_SIZE)  # the ids slot of a file that is read again next time


@dataclass
class CachedDir:
    stat: list
    ids: bytes
    tree: bytes | None
    size: int

    def file_ids(self) -> dict[str, tuple[tuple, bytes]]:
        """name -> (its stat tuple, its id) for the files of this row."""
        out = {}
        k = 0
        for t in self.stat[1:]:
            if t[1] < 2:  # a file or an executable
                out[t[0]] = (t, self.ids[k * ID_SIZE:(k + 1) * ID_SIZE])
                k += 1
        return out


def trusted(mtime_ns: int, scan_start_ns: int) -> bool:
    return mtime_ns < scan_start_ns - _RACY_NS


#: Rows staged per INSERT statement (and at most this many held in memory).
_BATCH_ROWS = 512


def _key(rel: str) -> bytes:
    """A directory's row key: its path, NUL for '/'.  Names hold no NUL, so the
    byte order of keys is the component-wise order of paths: parents before
    children, siblings by name bytes (a sorted depth-first walk's order)."""
    return rel.encode("utf-8", "surrogateescape").replace(b"/", b"\0")


class StatCache:
    def __init__(self, repo_id: str, directory: Path):
        key = hash_bytes(f"{repo_id}\0{directory}".encode()).hex()[:32]
        self.path = cache_root() / "statcache" / f"{key}.sqlite"
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple] = []
        self.commit_id: bytes | None = None
        self._cursor: sqlite3.Cursor | None = None
        self._next: tuple | None = None  # the cursor's row at hand, not taken yet
        self._gone: list[tuple[bytes]] = []  # keys of rows the walk passed by: directories gone
        self._loaded = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path)
            self._db.execute("DROP TABLE IF EXISTS files")  # the per-file rows of older versions
            self._db.execute("DROP TABLE IF EXISTS dirs")  # rows keyed by path (read all at once)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS dirs2 (key BLOB PRIMARY KEY, stat BLOB, ids BLOB, tree BLOB, size INT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB)")
            self._db.execute("DROP TABLE IF EXISTS staged")  # a killed commit's
            self._db.execute(
                "CREATE TABLE staged (key BLOB PRIMARY KEY, stat BLOB, ids BLOB, tree BLOB, size INT)")
            self._db.commit()
            row = self._db.execute("SELECT v FROM meta WHERE k='commit'").fetchone()
            self.commit_id = row[0] if row else None
        except (sqlite3.Error, OSError):
            self._db = None  # an unusable cache only costs re-reading

    def load(self) -> None:
        """Start reading the rows, in key order, as ``take`` asks for them (one query)."""
        if self._db is None:
            return
        try:
            self._cursor = self._db.execute("SELECT key, stat, ids, tree, size FROM dirs2 ORDER BY key")
            self._cursor.arraysize = _BATCH_ROWS
            self._loaded = True
        except sqlite3.Error:
            self._cursor = None

    def _advance(self) -> tuple | None:
        if self._next is None and self._cursor is not None:
            try:
                self._next = self._cursor.fetchone()
            except sqlite3.Error:
                self._next = None
            if self._next is None:
                self._cursor = None
        return self._next

    def take(self, rel: str) -> CachedDir | None:
        """The row of directory ``rel``; directories must be asked for in key
        order (``_key``), each once."""
        want = _key(rel)
        while (row := self._advance()) is not None and row[0] < want:
            self._gone.append((row[0],))  # passed by: that directory is gone
            self._next = None
        if row is None or row[0] != want:
            return None
        self._next = None
        _, stat, ids, tree, size = row
        try:
            decoded = marshal.loads(stat)
            if not isinstance(decoded, list) or len(ids) % ID_SIZE:
                return None
        except Exception:  # a damaged cache file: re-read this directory
            return None
        return CachedDir(decoded, ids, tree if tree and len(tree) == ID_SIZE else None, size or 0)

    def record_dir(self, rel: str, stat: list, ids: bytes, tree: bytes | None, size: int) -> None:
        """Remember a directory whose tree was built by this commit (staged in
        batches; made the cache's by ``save``)."""
        self._pending.append((_key(rel), marshal.dumps(stat), ids, tree, size))
        if len(self._pending) >= _BATCH_ROWS:
            self._stage()

    def _stage(self) -> None:
        rows, self._pending = self._pending, []
        if self._db is None or not rows:
            return
        try:
            self._db.executemany("INSERT OR REPLACE INTO staged VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error:
            self.close()  # unusable: this commit records nothing, the next one reads again

    def save(self, commit_id: bytes) -> None:
        """Make the cache describe the commit just made: the staged rows
        replace theirs, rows of directories that are gone are deleted."""
        if self._db is None:
            return
        while self._advance() is not None:  # rows after the last directory walked: gone
            self._gone.append((self._next[0],))
            self._next = None
        self._stage()
        try:
            with self._db:
                if not self._loaded:  # not loaded (or stale): start afresh
                    self._db.execute("DELETE FROM dirs2")
                self._db.executemany("DELETE FROM dirs2 WHERE key = ?", self._gone)
                self._db.execute("INSERT OR REPLACE INTO dirs2 SELECT * FROM staged")
                self._db.execute("DELETE FROM staged")
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('commit', ?)", (commit_id,))
        except (sqlite3.Error, OSError):
            pass
        self._gone = []
        self._loaded = True

    def close(self) -> None:
        self._cursor = self._next = None
        if self._db is not None:
            self._db.close()
            self._db = None
