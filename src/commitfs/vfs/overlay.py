"""The persistent overlay of a writable workspace: what changed, on local disk, crash-safe.

Design
------
A workspace shows a base commit's tree plus local edits.  The edits live in
a *workspace directory* (default under the cache directory) holding

* ``overlay.sqlite``: an SQLite database (WAL journal) describing the overlay
  tree,
* ``data/``: one file per written or new regular file, named by its node id
  (sparse for a committed file written in place: copy-on-write, below), and
* ``overlay.db``: a placeholder, not a database (the name older commitfs open;
  see the versions below), and
* ``lock``: flocked (exclusive) by the process that has the overlay open, for
  as long as it does (it holds that process's pid, for the error message).  A
  second opener (a second mount of the workspace) is refused: two daemons on
  one overlay would each keep their own in-memory tree and lose edits, and two
  upgrades of an older layout at once could lose the database.

The database has four tables (``ranges``, of copy-on-write, is described
below).  ``meta`` holds key/values: the repository URL,
the branch, the base commit (hex) and ``pending`` (a commit this workspace is
about to move the branch to, see below).  ``nodes`` holds one row per node of
the overlay tree: ``id``, ``parent``, ``name``, ``kind`` (dir/file/symlink/special),
the *origin* (the base TreeEntry the node shows, if any: kind, size, id,
target), ``materialized`` (for a directory: its entries are the rows whose
parent it is; otherwise they are its origin tree's entries, lazily), ``upper``
(for a file: its content is ``data/<upper>``; otherwise its origin's bytes),
``mode``, ``mtime_ns``, a symlink's ``target``, and the owner (``uid``,
``gid``) and ``atime_ns``/``ctime_ns`` (NULL: the mount's user, the mtime),
which the workspace keeps but a commit does not record.  ``links`` holds the
extra names of hard-linked nodes: ``id``, ``parent`` (a materialized
directory's row), ``name`` and ``node`` (the row of the node it names).  A
node's own row holds its first name and everything else; unlinking that name
while links remain moves the oldest link's name into the node row and
deletes the link, in one transaction, so a node has a row as long as it has
a name.  Version 2 of the overlay (meta ``version``) added the table; an
older overlay gains it, empty, on open, and an overlay of a version this
code does not know is refused (``SCHEMA_VERSION``).

Why rows per node rather than a path-keyed journal of whiteouts and renames:
renames of directories, renames over existing targets and edits below a
renamed directory are then plain row updates (``parent``, ``name``), and the
tree the workspace shows is exactly the rows plus the lazy origins below
unmaterialized directories.  There are no whiteouts: a materialized
directory's rows are its whole listing, so a deleted name is simply a row
that is gone.  A directory is materialized (its origin tree copied into rows,
one per entry, no file bytes read) the first time something inside it
changes; untouched subtrees stay lazy and cost nothing.  The root is row 1.

Crash safety.  Every metadata change (create, mkdir, unlink, rename, chmod,
materialize, a first write, a truncate) is one SQLite transaction, written before the
in-memory tree changes, so a killed daemon leaves the database at a
transaction boundary; WAL mode commits survive SIGKILL (the WAL is in the OS
page cache).  Data files are written in place with pwrite; their sizes are
taken from the files themselves on open, so a write that reached the kernel
is never lost to a crash of the daemon.  ``sync`` (the fsync handler) fsyncs
the file, the data directory and the WAL, which makes everything up to then
durable against power loss too.  Files of ``data/`` no row names (a first
write or create interrupted before its row was written, or an unlinked file) are
deleted on open.

Copy-on-write is chunk-level (vfs/wscow.py): the first write to an
untouched committed file copies nothing.  Its data file is made sparse at
the file's size and holds only what is written since; the row names the
base file (``cow_base``, its id) and how far the base shows through
(``cow_until``), and the ``ranges`` table (``node``, ``start``, ``end``)
holds the written ranges below that.  A row without ``cow_base`` whose file
has a data file is the data file's bytes alone (a new file, or one
truncated to zero).  Ranges are written at flush, release and fsync, each
time after an fdatasync of the data file (no row is durable before its
bytes), and a truncate's deletions at once, after the data file's
ftruncate: a range without its row (the daemon killed before) reads as the
base again, and on open ``cow_until`` is clamped to the data file's size.
Version 3 of the overlay added them (an older overlay gains the table,
empty, and the columns, NULL, on open).  A commitfs from before version 2
never checked the version and would have read a version-3 overlay's sparse
data files as whole files, so version 4 moved the database: it is
``overlay.sqlite``, and ``overlay.db``, the name every older commitfs opens,
is a placeholder that is not a database, which they refuse ("file is not a
database").  A version 1-3 overlay is moved to this layout when opened (its
WAL folded into the database, the database hard-linked as ``overlay.sqlite``,
the directory fsync'd, then the placeholder renamed over ``overlay.db``: so
``overlay.db`` always exists, and until the placeholder it is the same
database; each step is redone by the next open after a crash, see
``_adopt_legacy``).  An overlay of a version this code does not know is
refused, its version read (read-only) before anything is written.

Committing.  Before moving the branch, the workspace records the new commit
id as ``pending`` (durably); after the branch moved, ``clear`` deletes every
row, sets the new base and removes ``pending`` in one transaction.  A crash
between the two leaves ``pending`` set; ``resolve_pending`` (on the next open)
checks whether the branch reached that commit and, if so, clears the overlay
as the interrupted commit would have, else drops ``pending`` and keeps every
edit.  So the branch is at the old commit with the edits pending, or at the
new one with none pending, never in between.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from commitfs.errors import CommitfsError, InputError
from commitfs.model.objects import Kind, TreeEntry
from commitfs.vfs.errors import NoSpaceError, OverlayBusyError
from commitfs.vfs.inode import NodeKind

#: 2: the ``links`` table (hard links).  3: chunk-level copy-on-write (the ``ranges``
#: table, ``cow_base``/``cow_until``): a data file may hold only part of its file, so
#: a commitfs that reads 1 or 2 only must not open it.  4: the database is
#: ``overlay.sqlite`` and ``overlay.db`` a placeholder that is not a database, so
#: every older commitfs refuses the workspace (one before version 2 never checked the
#: version and would have read a version-3 overlay's sparse data files as whole
#: files).  An older overlay is moved to this layout and gains the tables (empty) and
#: columns (NULL) on open.
SCHEMA_VERSION = "4"
_KNOWN_VERSIONS = ("1", "2", "3", "4")
#: Versions whose database is ``overlay.db`` (moved to DB_NAME on open).
_LEGACY_VERSIONS = ("1", "2", "3")
DB_NAME = "overlay.sqlite"
LEGACY_DB_NAME = "overlay.db"
#: Held (flock, exclusive) by the one process that has the overlay open, for as long as it does.
LOCK_NAME = "lock"
_SQLITE_MAGIC = b"SQLite format 3\0"
PLACEHOLDER = (b"commitfs workspace overlay, format 4 or later: the database is overlay.sqlite.\n"
               b"This file is not a database, so a commitfs older than format 4 refuses the workspace\n"
               b"instead of misreading it.\n")
ROOT_ID = 1
#: Space kept in reserve (a file) so that deleting files still works on a full disk:
#: SQLite needs a few pages to record a deletion.  Released when a transaction finds
#: the disk full (the request is then retried once), re-made when space is back.
RESERVE_BYTES = 256 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY,
    parent INTEGER,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    okind BLOB, osize INTEGER, oid BLOB, otarget BLOB,
    materialized INTEGER NOT NULL DEFAULT 0,
    upper TEXT,
    mode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    target BLOB,
    uid INTEGER, gid INTEGER, atime_ns INTEGER, ctime_ns INTEGER, rdev INTEGER,
    cow_base BLOB, cow_until INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS nodes_by_name ON nodes(parent, name);
CREATE TABLE IF NOT EXISTS ranges (node INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
                                   PRIMARY KEY (node, start));
CREATE TABLE IF NOT EXISTS links (
    id INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    node INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS links_by_name ON links(parent, name);
"""

_COLUMNS = ("id", "parent", "name", "kind", "okind", "osize", "oid", "otarget", "materialized", "upper", "mode",
            "mtime_ns", "target", "uid", "gid", "atime_ns", "ctime_ns", "rdev", "cow_base", "cow_until")
#: Columns added after version 1's first release (owner and times, never committed;
#: the copy-on-write base): an older overlay gains them on open (NULL: the mount's
#: user, times from mtime, a data file holding the whole file).
_ADDED_COLUMNS = {"uid": "INTEGER", "gid": "INTEGER", "atime_ns": "INTEGER", "ctime_ns": "INTEGER",
                  "rdev": "INTEGER", "cow_base": "BLOB", "cow_until": "INTEGER"}
_INSERT = f"INSERT INTO nodes ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


@dataclass
class Row:
    id: int
    parent: int | None
    name: str
    kind: NodeKind  # stored as its value: "dir", "file", "symlink", "special"
    origin: TreeEntry | None
    materialized: bool
    upper: str | None
    mode: int
    mtime_ns: int
    target: bytes | None
    #: Owner and the other two times (None: the mount's user; mtime): kept by the
    #: workspace, not by a commit (docs/SEMANTICS.md).
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    ctime_ns: int | None = None
    #: A special file's device number (kind "special": FIFO, socket, device; mode has its type).
    rdev: int | None = None
    #: Chunk-level copy-on-write (vfs/wscow.py): the base file's id and how far it
    #: shows through; None: the data file (if any) holds the whole file.
    cow_base: bytes | None = None
    cow_until: int | None = None

    def values(self) -> tuple:
        o = self.origin
        return (self.id, self.parent, self.name, self.kind.value, o.kind.value if o else None, o.size if o else None,
                o.id if o else None, o.target if o else None, int(self.materialized), self.upper, self.mode,
                self.mtime_ns, self.target, self.uid, self.gid, self.atime_ns, self.ctime_ns, self.rdev,
                self.cow_base, self.cow_until)


@dataclass
class Link:
    """An extra name of a hard-linked node: ``name`` in directory row ``parent`` is node
    row ``node`` too (whose own row holds its first name, its data and metadata)."""
    id: int
    parent: int
    name: str
    node: int


def _row(values) -> Row:
    (id_, parent, name, kind, okind, osize, oid, otarget, mat, upper, mode, mtime, target,
     uid, gid, atime, ctime, rdev, cow_base, cow_until) = values
    origin = TreeEntry(name, Kind(bytes(okind)), osize, bytes(oid), bytes(otarget or b"")) if okind else None
    return Row(id_, parent, name, NodeKind(kind), origin, bool(mat), upper, mode, mtime,
               bytes(target) if target is not None else None, uid, gid, atime, ctime, rdev,
               bytes(cow_base) if cow_base is not None else None, cow_until)


class SpaceReleasedError(NoSpaceError):
    """The disk was full; the reserve was released: retry the request once."""


class WorkspaceMismatchError(InputError):
    """The workspace directory belongs to another repository or branch."""


class WorkspaceBusyError(InputError):
    """Another process has the workspace's overlay open (it holds the lock)."""


def _full(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "full" in text or "disk i/o" in text


def _head(path: Path, n: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path) -> int:
    """The workspace directory's lock file, open and flocked (exclusive): one process
    at a time has an overlay open (a second mount of the workspace would lose edits).
    The kernel drops the lock when the process dies, however it dies."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CommitfsError(f"cannot open the workspace {path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise WorkspaceBusyError(f"the workspace {path} is in use by another commitfs"
                                 f"{f' (process {holder})' if holder.isdigit() else ''}: "
                                 f"is it mounted already?") from None
    except OSError as exc:
        os.close(fd)
        raise CommitfsError(f"cannot lock the workspace {path}: {exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message of whoever comes next
    except OSError:
        pass
    return fd


def _sqlite_uri(file: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(str(file))}?mode={mode}"


def _read_version(file: Path) -> str | None:
    """``meta.version`` of an overlay database, read-only, leaving nothing behind (the
    ``-wal``/``-shm`` a read-only connection makes are removed); None: no database,
    no meta or no version in it."""
    if not file.exists():
        return None
    extra = [Path(f"{file}{suffix}") for suffix in ("-wal", "-shm")]
    had = [p.exists() for p in extra]
    conn = sqlite3.connect(_sqlite_uri(file, "ro"), uri=True)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        return row[0] if row else None
    finally:
        conn.close()
        for p, existed in zip(extra, had):
            if not existed:  # made by this read (the caller holds the lock: no one else has it open)
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass


def _check_version(path: Path, version: str | None) -> None:
    """Refuse an overlay of a version this commitfs does not know (before anything is written)."""
    if version is not None and version not in _KNOWN_VERSIONS:
        raise WorkspaceMismatchError(
            f"workspace {path} has overlay format {version!r}; this commitfs reads "
            f"{', '.join(_KNOWN_VERSIONS)} (a newer commitfs wrote it)")


def _adopt_legacy(path: Path) -> None:
    """The layout of version 4 (see SCHEMA_VERSION), made in place from an older one.

    A version 1-3 database (``overlay.db``) has its WAL folded in (journal mode
    DELETE) and is hard-linked as DB_NAME (never over an existing one), the
    directory fsync'd; then the placeholder replaces ``overlay.db`` (a temporary
    file, fsync'd, renamed over it).  At every point ``overlay.db`` exists: before
    the placeholder it is the same database as DB_NAME, which an older commitfs
    still reads as its own, and the next open redoes every step (the WAL such a
    commitfs left beside ``overlay.db`` is folded in again).  A database
    ``overlay.db`` beside a *different* DB_NAME is an error, never overwritten.
    Anything else that is not a database beside DB_NAME (a newer format's
    placeholder) is left alone: the caller reads DB_NAME's version before it
    writes anything."""
    db, legacy = path / DB_NAME, path / LEGACY_DB_NAME
    head = _head(legacy, len(PLACEHOLDER))
    if head == PLACEHOLDER:
        return
    if head is not None and head.startswith(_SQLITE_MAGIC):
        if db.exists() and not os.path.samefile(legacy, db):
            raise CommitfsError(
                f"cannot open the workspace {path}: {LEGACY_DB_NAME} and {DB_NAME} are two different overlay "
                f"databases (an older commitfs opened it during an upgrade?): keep the one with the edits "
                f"(format 4 and later: {DB_NAME}) and move the other away")
        version = _read_version(legacy) or "1"
        if version not in _LEGACY_VERSIONS:
            raise WorkspaceMismatchError(
                f"workspace {path} has overlay format {version!r} in {LEGACY_DB_NAME}; this commitfs reads "
                f"{', '.join(_LEGACY_VERSIONS)} there (something else wrote it)")
        # mode=rw: a database that vanished is an error, never a new empty one.
        conn = sqlite3.connect(_sqlite_uri(legacy, "rw"), uri=True, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")  # the WAL folded into the database, removed
        finally:
            conn.close()
        if not db.exists():
            os.link(legacy, db)  # never over an existing DB_NAME (EEXIST)
        _fsync_dir(path)
    elif head is not None:
        if db.exists():
            return  # not ours (a newer format's placeholder): the caller reads DB_NAME's version
        raise CommitfsError(f"cannot open the workspace {path}: {LEGACY_DB_NAME} is neither an overlay "
                            f"database nor the placeholder of one")
    else:
        _check_version(path, _read_version(db))  # no placeholder yet: nothing written for a newer one
    tmp = path / (LEGACY_DB_NAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(PLACEHOLDER)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, legacy)
    _fsync_dir(path)


class Overlay:
    """The on-disk state of one workspace (see the module doc)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None = None):
        self.path = path
        self._lock_fd = lock_fd
        self.data = path / "data"
        self._conn = conn
        self._batch = 0
        self._mutex = threading.Lock()
        self._owner: int | None = None  # the thread whose transaction is open
        #: The event loop's thread while a workspace runs on it (WorkspaceFS.running):
        #: a transaction there never waits for the mutex (see ``batch``).
        self.loop_thread: int | None = None
        self._next_id = max(conn.execute("SELECT max(id) FROM nodes").fetchone()[0] or ROOT_ID,
                            conn.execute("SELECT max(id) FROM links").fetchone()[0] or ROOT_ID) + 1

    # --- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, repo_url: str, branch: str) -> Overlay:
        path = Path(path)
        lock_fd = _lock(path)
        try:
            ov = cls._open_locked(path, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            ov._settle_meta(repo_url, branch)
        except BaseException:
            ov.close()
            raise
        return ov

    @classmethod
    def _open_locked(cls, path: Path, lock_fd: int) -> Overlay:
        conn = None
        try:
            _adopt_legacy(path)
            # A newer overlay is refused before anything is written (journal mode,
            # schema, columns, data/, the reserve).
            _check_version(path, _read_version(path / DB_NAME))
            (path / "data").mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path / DB_NAME), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Deleted rows are not zeroed at the cost of extra writes (SQLite builds
            # may default to secure_delete=ON): a commit's clear of a 100k-row overlay
            # wrote 10 MB of zeroed pages to the WAL, 120 ms on the event loop, against
            # 25 ms (measured with 100k rows of this schema's shape).  The rows hold
            # names and metadata of the workspace, whose bytes lie in data/ anyway.
            conn.execute("PRAGMA secure_delete=FAST")
            conn.executescript(_SCHEMA)
            have = {r[1] for r in conn.execute("PRAGMA table_info(nodes)")}
            for col, type_ in _ADDED_COLUMNS.items():
                if col not in have:
                    conn.execute(f"ALTER TABLE nodes ADD COLUMN {col} {type_}")
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            raise CommitfsError(f"cannot open the workspace {path}: {exc}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return cls(path, conn, lock_fd)

    def _settle_meta(self, repo_url: str, branch: str) -> None:
        ov, path = self, self.path
        ov.make_reserve()
        repo, br = ov.get_meta("repo"), ov.get_meta("branch")
        if repo is None:
            with ov.batch():
                ov.set_meta("version", SCHEMA_VERSION)
                ov.set_meta("repo", repo_url)
                ov.set_meta("branch", branch)
        elif repo != repo_url or br != branch:
            raise WorkspaceMismatchError(
                f"workspace {path} belongs to branch {br!r} of {repo}, not {branch!r} of {repo_url}")
        else:
            version = ov.get_meta("version") or "1"
            _check_version(path, version)
            if version != SCHEMA_VERSION:
                ov.set_meta("version", SCHEMA_VERSION)  # the new tables were created above

    def close(self) -> None:
        try:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._conn.close()
        finally:
            self.unlock()

    def unlock(self) -> None:
        """Let another process open the overlay (``close`` does; the kernel does for a killed one)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the flock goes with it
            self._lock_fd = None

    # --- transactions -------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group statements into one transaction (nested batches join the outer one).

        The event loop and worker threads (a flush of a file's ranges) share the
        connection: a transaction holds the overlay's mutex from BEGIN to COMMIT,
        so one thread's statements never land in another's transaction.

        On the event loop's thread (``loop_thread``) the mutex is only tried: the
        loop's changes run one at a time under the workspace's lock, so a thread
        holding it there is one abandoned after the I/O timeout (loader.io), which
        may hold it for as long as the disk stalls; the change is then refused
        (OverlayBusyError, EIO) instead of blocking every request of the mount."""
        me = threading.get_ident()
        if self._batch and self._owner == me:
            self._batch += 1
            try:
                yield
            finally:
                self._batch -= 1
            return
        if me == self.loop_thread:
            if not self._mutex.acquire(blocking=False):
                raise OverlayBusyError(f"the workspace {self.path}: an earlier write to its database "
                                       "has not finished (the disk is not answering)")
        else:
            self._mutex.acquire()
        self._owner = threading.get_ident()
        self._batch = 1
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if _full(exc):
                if self.release_reserve():
                    raise SpaceReleasedError(f"the workspace {self.path} is full") from None
                raise NoSpaceError(f"the workspace {self.path} is full") from None
            raise CommitfsError(f"workspace database {self.path}: {exc}") from None
        finally:
            self._batch = 0
            self._owner = None
            self._mutex.release()

    def _exec(self, sql: str, args=()) -> sqlite3.Cursor:
        with self.batch():
            return self._conn.execute(sql, args)

    # --- meta ----------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._exec("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self._exec("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def base(self) -> bytes | None:
        v = self.get_meta("base")
        return bytes.fromhex(v) if v else None

    @property
    def pending(self) -> bytes | None:
        v = self.get_meta("pending")
        return bytes.fromhex(v) if v else None

    def set_pending(self, cid: bytes | None) -> None:
        self.set_meta("pending", cid.hex() if cid else None)
        self.sync_db()

    # --- rows ------------------------------------------------------------------------
    def new_id(self) -> int:
        nid = self._next_id
        self._next_id += 1
        return nid

    def rows(self) -> list[Row]:
        cur = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM nodes ORDER BY id")
        return [_row(v) for v in cur]

    def insert(self, rows: list[Row]) -> None:
        with self.batch():
            self._conn.executemany(_INSERT,
                                   [r.values() for r in rows])

    def update(self, node_id: int, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE nodes SET {sets} WHERE id = ?", (*fields.values(), node_id))

    def delete(self, ids: list[int]) -> None:
        with self.batch():
            self._conn.executemany("DELETE FROM nodes WHERE id = ?", [(i,) for i in ids])
            self._conn.executemany("DELETE FROM ranges WHERE node = ?", [(i,) for i in ids])

    def load_ranges(self) -> dict[int, list[tuple[int, int]]]:
        """The written ranges of every copy-on-write file, by node id, in order."""
        out: dict[int, list[tuple[int, int]]] = {}
        for node, a, b in self._conn.execute('SELECT node, start, "end" FROM ranges ORDER BY node, start'):
            out.setdefault(node, []).append((a, b))
        return out

    def update_ranges(self, node_id: int, put: list[tuple[int, int]], gone: list[int]) -> None:
        """Change a node's written ranges (vfs/wscow.py): the rows of ``put`` (start,
        end) written, those starting at ``gone`` deleted; the others stay as they are."""
        with self.batch():
            if gone:
                self._conn.executemany("DELETE FROM ranges WHERE node = ? AND start = ?",
                                       [(node_id, a) for a in gone])
            if put:
                self._conn.executemany('INSERT OR REPLACE INTO ranges (node, start, "end") VALUES (?, ?, ?)',
                                       [(node_id, a, b) for a, b in put])

    # --- links: the extra names of hard-linked nodes -------------------------------------
    def links(self) -> list[Link]:
        cur = self._conn.execute("SELECT id, parent, name, node FROM links ORDER BY id")
        return [Link(*v) for v in cur]

    def insert_link(self, link: Link) -> None:
        self._exec("INSERT INTO links (id, parent, name, node) VALUES (?, ?, ?, ?)",
                   (link.id, link.parent, link.name, link.node))

    def update_link(self, link_id: int, parent: int, name: str) -> None:
        self._exec("UPDATE links SET parent = ?, name = ? WHERE id = ?", (parent, name, link_id))

    def delete_links(self, ids: list[int]) -> None:
        with self.batch():
            self._conn.executemany("DELETE FROM links WHERE id = ?", [(i,) for i in ids])

    def is_clean(self) -> bool:
        """No edits: only an unmaterialized root row (or none), and no merge in progress."""
        n = self._conn.execute("SELECT count(*), max(materialized) FROM nodes").fetchone()
        return (n[0] == 0 or (n[0] == 1 and not n[1])) and self.get_meta("merge") is None

    @property
    def merge(self) -> str | None:
        """The merge in progress (a JSON document the control channel wrote), or None."""
        return self.get_meta("merge")

    def clear(self, base: bytes, root: Row, merge: str | None = None, finish: bool = True) -> int:
        """Drop every edit and make ``base`` the base, in one transaction; then delete data files.

        ``merge``: a merge in progress to record in the same transaction (the
        root row then names the merged tree); without it any merge is over.

        ``finish=False`` (a running workspace, on the event loop) stops after the
        transaction: the caller then runs ``finish_clear`` of the returned bound in
        a worker thread (the WAL's fsync and the data files' removal block)."""
        with self.batch():
            self._conn.execute("DELETE FROM nodes")
            self._conn.execute("DELETE FROM ranges")
            self._conn.execute("DELETE FROM links")
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)", (base.hex(),))
            self._conn.execute("DELETE FROM meta WHERE key = 'pending'")
            self._conn.execute("DELETE FROM meta WHERE key = 'merge'")
            if merge is not None:
                self._conn.execute("INSERT INTO meta VALUES ('merge', ?)", (merge,))
            self._conn.execute(_INSERT, root.values())
        below = self._next_id
        if finish:
            self.sync_db()
            self.collect_garbage()
        return below

    def finish_clear(self, below: int) -> int:
        """The blocking half of a ``clear(finish=False)`` (any thread; no database
        access): fsync the WAL, then delete the cleared rows' data files, those named
        by a node id below ``below`` (a file created after the clear, for a new node,
        has a higher id, so a late run never takes it).  Returns how many."""
        self.sync_db()
        return self._remove_data_files(lambda name: name.isdigit() and int(name) < below)

    # --- the reserve ----------------------------------------------------------------
    def make_reserve(self) -> None:
        """Set space aside (best effort; nothing happens if the disk is full)."""
        path = self.path / "reserve"
        try:
            if path.exists() and path.stat().st_size == RESERVE_BYTES:
                return
            with open(path, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            try:
                path.unlink()
            except OSError:
                pass

    def release_reserve(self) -> bool:
        try:
            (self.path / "reserve").unlink()
            return True
        except OSError:
            return False

    # --- data files ------------------------------------------------------------------
    def data_path(self, name: str) -> str:
        return str(self.data / name)

    def create_data(self, name: str) -> int:
        """A new empty data file, open for reading and writing."""
        return os.open(self.data_path(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def open_data(self, name: str) -> int:
        return os.open(self.data_path(name), os.O_RDWR)

    def remove_data(self, name: str) -> None:
        try:
            os.unlink(self.data_path(name))
        except FileNotFoundError:
            pass

    def anonymous_file(self, tag: str) -> int:
        """An unnamed data file (for a file unlinked while open): gone when closed."""
        path = self.data_path(f"anon-{tag}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.unlink(path)
        return fd

    def collect_garbage(self) -> int:
        """Delete data files no row names; return how many."""
        named = {r[0] for r in self._conn.execute("SELECT upper FROM nodes WHERE upper IS NOT NULL")}
        return self._remove_data_files(lambda name: name not in named)

    def _remove_data_files(self, doomed) -> int:
        """Delete the data files whose names ``doomed`` says; return how many went."""
        removed = 0
        for entry in os.scandir(self.data):
            if doomed(entry.name):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
        return removed

    def sync_db(self) -> None:
        """Make every committed transaction durable (fsync the WAL)."""
        for suffix in ("-wal", ""):
            try:
                fd = os.open(str(self.path / DB_NAME) + suffix, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def sync(self, fd: int | None = None) -> None:
        """fsync: the file's data, the data directory's entries, the database."""
        if fd is not None:
            os.fsync(fd)
        dfd = os.open(self.data, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.sync_db()

