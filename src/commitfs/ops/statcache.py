"""The stat cache: what makes re-committing a directory cost the change.

For each directory committed to a repository from this machine, a small
SQLite file under the user's cache directory remembers, per relative path,
(size, mtime_ns, inode) and the file id committed for it, plus the commit it
belongs to.  A later commit from the same directory to the same repository
trusts a file whose size, mtime and inode are unchanged and does not read it.

Racy entries are not trusted: a file modified within two seconds before the
scan that recorded it could change again without its mtime moving, so such
entries are stored without an id and re-read next time (git's "racy clean"
rule).  The cache is advisory: deleting it only costs a full re-read.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from commitfs.model.ids import hash_bytes
from commitfs.ops.root import cache_root

_RACY_NS = 2_000_000_000


class StatCache:
    def __init__(self, repo_id: str, directory: Path):
        key = hash_bytes(f"{repo_id}\0{directory}".encode()).hex()[:32]
        self.path = cache_root() / "statcache" / f"{key}.sqlite"
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple] = []
        self.commit_id: bytes | None = None
        self._rows: dict[str, tuple[int, int, int, bytes]] = {}
        self._seen: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime INT, ino INT, id BLOB)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB)")
            row = self._db.execute("SELECT v FROM meta WHERE k='commit'").fetchone()
            self.commit_id = row[0] if row else None
        except (sqlite3.Error, OSError):
            self._db = None  # an unusable cache only costs re-reading

    def load(self) -> None:
        """Read every row into memory (one query instead of one per file)."""
        if self._db is None:
            return
        try:
            self._rows = {p: (s, m, i, fid) for p, s, m, i, fid in self._db.execute("SELECT * FROM files")}
        except sqlite3.Error:
            self._rows = {}

    def lookup(self, rel: str, st: os.stat_result) -> bytes | None:
        row = self._rows.get(rel)
        if row and row[3] and row[0] == st.st_size and row[1] == st.st_mtime_ns and row[2] == st.st_ino:
            return row[3]
        return None

    def record(self, rel: str, st: os.stat_result, file_id: bytes, scan_start_ns: int) -> None:
        trusted = st.st_mtime_ns < scan_start_ns - _RACY_NS
        row = (st.st_size, st.st_mtime_ns, st.st_ino, file_id if trusted else None)
        self._seen.add(rel)
        if self._rows.get(rel) != row:
            self._pending.append((rel, *row))

    def save(self, commit_id: bytes) -> None:
        """Make the cache describe the commit just made: write the rows that
        changed and delete those of paths that are gone (cost follows the change)."""
        if self._db is None:
            return
        gone = [(p,) for p in self._rows.keys() - self._seen]
        try:
            with self._db:
                if not self._rows:  # not loaded (or stale): start afresh
                    self._db.execute("DELETE FROM files")
                self._db.executemany("DELETE FROM files WHERE path = ?", gone)
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", self._pending)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('commit', ?)", (commit_id,))
        except (sqlite3.Error, OSError):
            pass
        self._pending = []
        self._seen = set()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
