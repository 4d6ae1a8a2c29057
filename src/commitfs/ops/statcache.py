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
rule).  The cache is advisory: deleting it only costs a full re-read.  It is
read in one query and written in one transaction holding only the rows of
the directories that changed.
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


class StatCache:
    def __init__(self, repo_id: str, directory: Path):
        key = hash_bytes(f"{repo_id}\0{directory}".encode()).hex()[:32]
        self.path = cache_root() / "statcache" / f"{key}.sqlite"
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple] = []
        self.commit_id: bytes | None = None
        self._rows: dict[str, tuple] = {}
        self._known: set[str] = set()
        self._loaded = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path)
            self._db.execute("DROP TABLE IF EXISTS files")  # the per-file rows of older versions
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS dirs (path TEXT PRIMARY KEY, stat BLOB, ids BLOB, tree BLOB, size INT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB)")
            row = self._db.execute("SELECT v FROM meta WHERE k='commit'").fetchone()
            self.commit_id = row[0] if row else None
        except (sqlite3.Error, OSError):
            self._db = None  # an unusable cache only costs re-reading

    def load(self) -> None:
        """Read every row (one query); rows are decoded one directory at a time by take."""
        if self._db is None:
            return
        try:
            self._rows = {p: (s, i, t, z) for p, s, i, t, z in self._db.execute("SELECT * FROM dirs")}
            self._loaded = True
        except sqlite3.Error:
            self._rows = {}
        self._known = set(self._rows)

    def take(self, rel: str) -> CachedDir | None:
        """The row of directory ``rel`` (once: its memory is released)."""
        row = self._rows.pop(rel, None)
        if row is None:
            return None
        stat, ids, tree, size = row
        try:
            decoded = marshal.loads(stat)
            if not isinstance(decoded, list) or len(ids) % ID_SIZE:
                return None
        except Exception:  # a damaged cache file: re-read this directory
            return None
        return CachedDir(decoded, ids, tree if tree and len(tree) == ID_SIZE else None, size or 0)

    def record_dir(self, rel: str, stat: list, ids: bytes, tree: bytes | None, size: int) -> None:
        """Remember a directory whose tree was built by this commit."""
        self._pending.append((rel, marshal.dumps(stat), ids, tree, size))

    def keep(self, rel: str) -> None:
        """Directory ``rel`` is unchanged: its row stays as it is."""
        self._known.discard(rel)

    def save(self, commit_id: bytes) -> None:
        """Make the cache describe the commit just made: write the rows that
        changed and delete those of directories that are gone."""
        if self._db is None:
            return
        written = {row[0] for row in self._pending}
        gone = [(p,) for p in self._known - written]
        try:
            with self._db:
                if not self._loaded:  # not loaded (or stale): start afresh
                    self._db.execute("DELETE FROM dirs")
                self._db.executemany("DELETE FROM dirs WHERE path = ?", gone)
                self._db.executemany("INSERT OR REPLACE INTO dirs VALUES (?, ?, ?, ?, ?)", self._pending)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('commit', ?)", (commit_id,))
        except (sqlite3.Error, OSError):
            pass
        self._pending = []
        self._known = set()
        self._loaded = True

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
