"""Commit a directory: scan, chunk what changed, build trees, move the branch.

One depth-first walk (names in sorted order) does it all, streaming:

1. each directory is listed and its entries stat'ed (metadata only), asking
   the stat cache whether they are unchanged since the last commit made from
   this directory; the files that changed are handed to a bounded thread
   pool to be read, cut, hashed and compressed (results consumed in walk
   order, so a directory's files lie together in a pack), large files
   streamed;
2. as soon as a directory's files are stored and its subdirectories built
   (post-order), its tree is built and stored, its stat-cache row recorded
   and its entries released;
3. then the commit, and the branch moves by compare-and-swap.

Memory follows the walk, not the dataset: the entries of the directories on
the current path, the read-ahead window (bounded in bytes and files) and the
writer's session (bounded by checkpoints).  The cost is a metadata scan plus
the changed bytes.  If the branch moved meanwhile, the caller gets
RefConflictError and every blob stays stored and indexed, so a retry uploads
nothing again.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import getpass
import operator
import os
import socket
import stat as statmod
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from commitfs.errors import (
    CorruptObjectError,
    InputError,
    NothingToCommitError,
    ObjectNotFoundError,
    RefConflictError,
)
from commitfs.model import chunker, splittree
from commitfs.model.ids import HASHER, hash_bytes
from commitfs.model.objects import MANIFEST_MAGIC, Commit, FileManifest, Kind, Tree, TreeEntry, symlink_entry
from commitfs.ops.statcache import _RACY_NS, ID_SIZE, UNTRUSTED, CachedDir, StatCache, trusted
from commitfs.repo.pack import BlobKind, Compression, maybe_compress
from commitfs.repo.repository import BlobWriter, Repository, WriteStats

try:
    from commitfs.ops import _fastscan
except ImportError:  # built without a C compiler: prepare_batch reads file by file in Python
    _fastscan = None

# Files up to this size are read whole by pool threads; larger ones stream.
_SMALL_FILE = 32 * 1024 * 1024
# Bound on file bytes read ahead by the pool and not yet packed: hundreds of
# images ahead of the packing thread keep four readers busy; it is most of a
# commit's memory beside the pack buffers (issue 19: under 200 MiB in all).
_READ_AHEAD_BYTES = 32 * 1024 * 1024
# ... and on files: a million 1 KB files fit the bytes bound, but each prepared file
# costs ~1 KB of objects beside its bytes.
_READ_AHEAD_FILES = 4096
_READ_THREADS = 4
# Small files go to the pool in batches of this many files (or bytes): a future per
# 1 KB file cost more than reading it (a million-file commit is mostly small files).
_BATCH_FILES = 64
_BATCH_BYTES = 1024 * 1024
# Blobs after which the writer indexes what it added and forgets it (BlobWriter.checkpoint):
# bounds its memory (~250 B a blob) at any file count.  Safe: files are stored chunks first,
# trees bottom-up.
_CHECKPOINT_BLOBS = 100_000
# Directories whose descriptors the walk keeps open at once while their files are read
# (at most those with files in the read-ahead window); past it, files are opened by path.
_DIR_FDS = 256


def default_author() -> str:
    author = os.environ.get("COMMITFS_AUTHOR")
    if author:
        return author
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class Progress:
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0


@dataclass
class CommitResult:
    commit_id: bytes
    tree_id: bytes
    created: bool
    files: int = 0
    files_read: int = 0
    bytes_read: int = 0
    write: WriteStats = field(default_factory=WriteStats)
    warnings: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Dir:
    rel: str
    path: str
    own: tuple = ()  # the directory's own (mtime_ns, inode)
    entries: list = field(default_factory=list)  # (name, kind, payload); a subdirectory's payload is its _Dir
    stat: list = field(default_factory=list)  # what the stat cache compares (statcache.py)
    cached: CachedDir | None = None  # the stat cache's row, when it matches ``stat``
    subdirs: list = field(default_factory=list)
    parent: _Dir | None = None
    #: What this directory's tree waits for: its own scan, each file being read, each subdirectory.
    left: int = 1
    #: Once built: (tree id, size, reused from the stat cache as it was).
    built: tuple | None = None
    nfiles: int = 0  # its files (of either kind)
    prev: CachedDir | None = None  # the stat cache's row of a large directory that changed
    #: The tree its stat-cache row names, for a directory that changed: its new tree
    #: may be stored as a delta of it (BlobWriter.add_tree, docs/FORMAT.md "Tree deltas").
    base: bytes | None = None
    dev: int = 0  # its st_dev (its files', but for a file mounted on one)
    #: Its descriptor, kept open while its files are read (opened relative to it), or None.
    fd: int | None = None
    reads: int = 0  # its files being read (its descriptor is closed after the last)


def _display(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_utf8(name: str, where: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"file name is not valid UTF-8: {_display(os.path.join(where, name))} (commitfs stores UTF-8 names only; rename it)"
        ) from None


def _read_error(path: str, exc: OSError) -> InputError:
    return InputError(f"cannot read {_display(path)}: {exc.strerror or exc}")


@dataclass
class PreparedFile:
    """A file cut, hashed and compressed, ready for BlobWriter.add."""

    ids: list[bytes] = field(default_factory=list)
    chunks: list = field(default_factory=list)  # raw chunk views
    stored: list = field(default_factory=list)  # what to store: the raw view or zstd bytes
    compression: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)

    def add(self, chunk) -> None:
        stored, comp = maybe_compress(chunk, BlobKind.CHUNK)
        self.ids.append(hash_bytes(chunk))
        self.chunks.append(chunk)
        self.stored.append(stored)
        self.compression.append(comp)


def prepare_chunks(chunks) -> PreparedFile:
    prepared = PreparedFile()
    for chunk in chunks:
        prepared.add(chunk)
    return prepared


_ONE_CHUNK = MANIFEST_MAGIC + b"\x01"  # a manifest of one chunk starts so (FileManifest.encode)


_open_fd = _os_open = os.open  # (a test makes it fail)
_os_read = os.read  # (a test makes reads short)
# A file the scan saw is opened so: never through a symlink swapped in since (O_NOFOLLOW), never
# waiting for a writer of a FIFO swapped in (O_NONBLOCK: opens at once; fstat then tells).
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
# A symlink (ELOOP), a socket (ENXIO) or a device without a driver (ENODEV, ENXIO) there now.
_NOT_A_FILE = {errno.ELOOP, errno.ENXIO, errno.ENODEV}


class _Changed(Exception):
    """What the scan saw as a regular file is not the same regular file any more."""


def _open_checked(path: str, where: tuple | None) -> int:
    """A descriptor of the regular file the scan saw at ``path``: ``where`` is
    (directory fd or None, name, st_dev, st_ino) from the scan, the name opened
    relative to the directory's descriptor when it is still open.  _Changed if
    something else is there now (another file, a symlink, a FIFO: fstat of the
    descriptor, never a read of it); InputError if it cannot be opened."""
    if where is None:
        dir_fd, name, dev, ino = None, path, None, None
    else:
        dir_fd, name, dev, ino = where
        if dir_fd is None:
            name = path
    try:
        fd = _open_fd(name, _OPEN_FLAGS, dir_fd=dir_fd) if dir_fd is not None else _open_fd(name, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in _NOT_A_FILE:
            raise _Changed() from None
        raise _read_error(path, exc) from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _read_error(path, exc) from None
    if not statmod.S_ISREG(st.st_mode) or (ino is not None and (st.st_ino != ino or st.st_dev != dev)):
        os.close(fd)
        raise _Changed()
    return fd


def _read_fd(fd: int, size: int) -> bytes:
    try:
        data = os.read(fd, size + 1)
    except BlockingIOError:  # (O_NONBLOCK on a regular file: honoured by no local file system)
        os.set_blocking(fd, True)
        data = os.read(fd, size + 1)
    return data


def _read_whole(path: str, size: int, where: tuple | None = None) -> bytes:
    """The bytes of file ``path``, which stat'ed as ``size`` bytes (read whole if it grew);
    _Changed if it is not the regular file the scan saw (``_open_checked``)."""
    fd = _open_checked(path, where)
    try:
        try:
            data = _read_fd(fd, size)
            if len(data) != size:
                # Grown, or a short read (which POSIX allows before the end: a FUSE
                # source with direct_io, a network file system, a signal): read on to
                # the end, so a short read is never taken for the file's end.  The
                # common case, exactly ``size`` bytes, costs no further call.
                parts = [data]
                while part := _read_fd(fd, (1 << 20) - 1):
                    parts.append(part)
                data = b"".join(parts)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _read_error(path, exc) from None
    return data


def prepare_batch(files: list[tuple]) -> list:
    """Read, cut, hash and compress each small file of ``files`` (path, st_size[, where]:
    _open_checked's), in one pool task (reading, cutting, hashing and zstd release the
    GIL: pool threads run in parallel and the committing thread only packs).  A file
    of one chunk (up to chunker.MIN_SIZE: most files of a million-file commit) is
    prepared as a tuple (chunk id, chunk, stored, compression, file id, manifest
    encoding), its manifest encoded and hashed here; any other as a PreparedFile; one that
    is not the regular file the scan saw (swapped for another, a symlink, a FIFO) as None."""
    out = []
    # Compiled: the batch's opens and reads with the GIL released once (not with a test's
    # _open_fd or os.read in place); what it does not read whole, _read_whole reads.
    read = _fastscan.read_files(files, _OPEN_FLAGS) \
        if _fastscan is not None and _open_fd is _os_open and os.read is _os_read else None
    CHUNK, MIN_SIZE, bytes_ = BlobKind.CHUNK, chunker.MIN_SIZE, bytes
    for k, item in enumerate(files):
        data = read[k] if read is not None else False
        if type(data) is not bytes_:
            path, size, *where = item
            if data is False:
                try:
                    data = _read_whole(path, size, where[0] if where else None)
                except _Changed:
                    out.append(None)
                    continue
            elif data is None:  # not the regular file the scan saw
                out.append(None)
                continue
            else:  # an errno
                raise _read_error(path, OSError(data, os.strerror(data)))
        n = len(data)
        if 0 < n <= MIN_SIZE:
            cid = HASHER(data).digest()
            stored, comp = maybe_compress(data, CHUNK)
            # FileManifest.encode of one chunk: its id and size (a varint: MIN_SIZE < 2**21).
            if n < 0x80:
                mdata = _ONE_CHUNK + cid + bytes_((n,))
            elif n < 0x4000:
                mdata = _ONE_CHUNK + cid + bytes_(((n & 0x7F) | 0x80, n >> 7))
            else:
                mdata = _ONE_CHUNK + cid + bytes_(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
            out.append((cid, data, stored, comp, HASHER(mdata).digest(), mdata))
        else:
            out.append(prepare_chunks(chunker.cut(data)))
    return out


def store_prepared(writer: BlobWriter, prepared: PreparedFile, manifest: bool = True) -> bytes | None:
    """Store a prepared file's chunks and (unless told not to) its manifest; return the file id."""
    for cid, chunk, stored, comp in zip(prepared.ids, prepared.chunks, prepared.stored, prepared.compression):
        writer.add(cid, BlobKind.CHUNK, chunk, stored=stored, compression=comp)
    if not manifest:
        return None
    return writer.add_manifest(FileManifest(tuple(prepared.ids), tuple(len(c) for c in prepared.chunks)))


def store_large_file(pool: ThreadPoolExecutor, writer: BlobWriter, path: str,
                     on_bytes: Callable[[int], None], where: tuple | None = None) -> tuple[bytes, int]:
    """Chunk a large file window by window, hashing and compressing windows in
    the pool while this thread packs earlier ones; bounded read-ahead.  _Changed
    (nothing stored) if it is not the regular file the scan saw (``_open_checked``)."""
    ids: list[bytes] = []
    sizes: list[int] = []
    pending: deque = deque()

    def drain() -> None:
        prepared = pending.popleft().result()
        store_prepared(writer, prepared, manifest=False)
        ids.extend(prepared.ids)
        sizes.extend(len(c) for c in prepared.chunks)
        on_bytes(prepared.size)

    fd = _open_checked(path, where)
    try:
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    try:
        with f:
            os.set_blocking(fd, True)
            for batch in chunker.iter_chunk_batches(f):
                pending.append(pool.submit(prepare_chunks, batch))
                if len(pending) > _READ_THREADS:  # bounded: ~5 windows of 8 MiB in memory
                    drain()
    except OSError as exc:
        raise _read_error(path, exc) from None
    while pending:
        drain()
    return writer.add_manifest(FileManifest(tuple(ids), tuple(sizes))), sum(sizes)


def store_stream(writer: BlobWriter, stream, on_bytes: Callable[[int], None] | None = None) -> tuple[bytes, int]:
    """Chunk and store a stream without holding it in memory; (file id, size)."""
    ids, sizes = [], []
    for chunk in chunker.iter_chunks(stream):
        cid = hash_bytes(chunk)
        writer.add(cid, BlobKind.CHUNK, chunk)
        ids.append(cid)
        sizes.append(len(chunk))
        if on_bytes:
            on_bytes(len(chunk))
    return writer.add_manifest(FileManifest(tuple(ids), tuple(sizes))), sum(sizes)


# Entry kinds in the stat cache's lists (statcache.py): file 0, executable 1, symlink 2, directory 3.


def _scan_dir(d: _Dir, cache: StatCache, warnings: list[str], keep_fd: bool = False) -> list[int]:
    """List and stat directory ``d``: fill its entries, stat list and subdirectories;
    return the slots of the files to read.  ``keep_fd``: if there are any, keep the
    directory's descriptor open in ``d.fd`` (its files are then opened relative to it;
    the caller closes it).

    A directory whose entries all stat as the stat cache recorded them keeps
    its cached row (``_Dir.cached``) and none of its files is looked up or
    read; in any other directory each file is looked up by name.
    """
    # Listed through a descriptor: each entry is then stat'ed by its name relative to
    # it (fstatat, as find does), not by its whole path walked again from the root.
    try:
        fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"cannot list {_display(d.path)}: {exc.strerror or exc}") from None
    try:
        to_read = _scan_fd(d, fd, cache, warnings)
    except BaseException:
        os.close(fd)
        raise
    if keep_fd and to_read:
        d.fd = fd
    else:
        os.close(fd)
    return to_read


_by_name = operator.attrgetter("name")


def _stat_tuple(st: os.stat_result) -> tuple:
    return st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev


def _list_and_stat(fd: int) -> tuple[list[str], object]:
    """The names of the directory open as ``fd`` in name order, and an iterator of
    each one's lstat relative to it (as find does): (st_mode, st_size, st_mtime_ns,
    st_ino, st_ctime_ns, st_dev), or the OSError of a name that cannot be stat'ed.
    Compiled: the stats with the GIL released once per _STAT_CHUNK names
    (_fastscan.lstat_names), not once per entry; a chunk at a time, so that a
    million-entry directory never holds a million of them at once."""
    if _fastscan is not None:
        names = os.listdir(fd)
        names.sort()
        return names, _compiled_stats(fd, names)
    with os.scandir(fd) as it:
        items = sorted(it, key=_by_name)
    return [e.name for e in items], _entry_stats(items)


# Names stat'ed per compiled call: ~0.6 MB of struct stat and ~1 MB of tuples.
_STAT_CHUNK = 4096


def _compiled_stats(fd: int, names: list[str]):
    for start in range(0, len(names), _STAT_CHUNK):
        chunk = names[start:start + _STAT_CHUNK] if len(names) > _STAT_CHUNK else names
        stats = _fastscan.lstat_names(fd, chunk)
        for k, st in enumerate(stats):
            if type(st) is not tuple:
                try:  # an errno, or None: a time past what the compiled path computes
                    stats[k] = _stat_tuple(os.stat(chunk[k], dir_fd=fd, follow_symlinks=False))
                except OSError as exc:
                    stats[k] = exc
        yield from stats


def _entry_stats(items: list):
    for e in items:
        try:
            yield _stat_tuple(e.stat(follow_symlinks=False))
        except OSError as exc:
            yield exc


def _scan_fd(d: _Dir, fd: int, cache: StatCache, warnings: list[str]) -> list[int]:
    try:
        names, stats = _list_and_stat(fd)
    except OSError as exc:
        raise InputError(f"cannot list {_display(d.path)}: {exc.strerror or exc}") from None
    stat = d.stat
    stat.append(("", -1, *d.own))
    entries = d.entries
    files = []
    join = os.path.join
    S_ISREG, S_ISDIR, S_ISLNK, S_IXUSR = statmod.S_ISREG, statmod.S_ISDIR, statmod.S_ISLNK, statmod.S_IXUSR
    FILE, EXEC = Kind.FILE, Kind.EXEC
    for name, st in zip(names, stats):
        if not name.isascii():
            _check_utf8(name, d.path)
        if type(st) is not tuple:
            raise _read_error(join(d.path, name), st) from None
        mode, size, mtime, ino, ctime, dev = st
        if S_ISREG(mode):
            kind = EXEC if mode & S_IXUSR else FILE
            files.append(len(entries))
            # (file id, size, mtime_ns): no stat_result kept (~600 B each, per file)
            entries.append((name, kind, (None, size, mtime)))
            stat.append((name, 1 if kind is EXEC else 0, size, mtime, ino, ctime))
        elif S_ISDIR(mode):
            rel = f"{d.rel}/{name}" if d.rel else name
            child = _Dir(rel, join(d.path, name), (mtime, ino))
            child.parent = d
            child.dev = dev
            entries.append((name, Kind.DIR, child))
            stat.append((name, 3, mtime, ino))
            d.subdirs.append(child)
        elif S_ISLNK(mode):
            try:
                target = os.readlink(os.fsencode(name), dir_fd=fd)
            except OSError as exc:
                raise _read_error(join(d.path, name), exc) from None
            entries.append((name, Kind.SYMLINK, target))
            stat.append((name, 2, target))
        else:
            warnings.append(_skipped(mode, join(d.path, name)))
    d.nfiles = len(files)
    cached = cache.take(d.rel)
    # (A row with a tree id has every file trusted: record_dir.)
    if cached is not None and cached.stat == stat and len(cached.ids) == ID_SIZE * len(files) \
            and (cached.tree is not None or UNTRUSTED not in _id_slots(cached.ids)):
        d.cached = cached  # every file unchanged: ids come from the row
        return []
    if cached is not None and cached.tree is not None:
        if len(cached.stat) > splittree.SPLIT_ENTRIES + 1:
            d.prev = cached  # a large directory that changed: its tree is edited (_Walk._edit_tree)
        else:
            d.base = cached.tree
    known = cached.file_ids() if cached is not None else {}
    if not known:  # (a first commit: every file is read)
        return files
    to_read = []
    for slot in files:
        name, kind, (_, size, mtime) = d.entries[slot]
        hit = known.get(name)
        if hit is not None and hit[1] != UNTRUSTED and hit[0] == stat[slot + 1]:
            d.entries[slot] = (name, kind, (hit[1], size, mtime))
        else:
            to_read.append(slot)
    return to_read


def _skipped(mode: int, path: str) -> str:
    """The warning for a special file a commit skips."""
    what = ("socket" if statmod.S_ISSOCK(mode) else "FIFO" if statmod.S_ISFIFO(mode)
            else "device" if statmod.S_ISCHR(mode) or statmod.S_ISBLK(mode) else "special file")
    return f"skipped {what} {_display(path)}"


def _id_slots(ids: bytes):
    return (ids[i:i + ID_SIZE] for i in range(0, len(ids), ID_SIZE))


def check_commit_text(message: str, metadata: dict[str, str] | None = None, author: str | None = None) -> None:
    """InputError unless the commit's text fields are valid Unicode (a command
    line's undecodable bytes arrive as lone surrogates): checked before any
    data is read or uploaded, not when the commit is finally encoded."""
    fields = [("the commit message", message), ("the author", author or "")]
    for k, v in (metadata or {}).items():
        fields += [("a --meta key", k), (f"--meta {k!r}", v)]
    for what, text in fields:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{what} is not valid UTF-8: {text.encode('utf-8', 'surrogateescape')[:60]!r}") from None
        except AttributeError:
            raise InputError(f"{what} is not text") from None


def commit_directory(
    repo: Repository,
    directory: str | os.PathLike,
    *,
    branch: str = "main",
    message: str,
    metadata: dict[str, str] | None = None,
    author: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    allow_empty: bool = False,
) -> CommitResult:
    """Commit ``directory`` to ``branch``; raise NothingToCommitError if unchanged."""
    from commitfs.repo.refs import check_ref_name

    check_ref_name(branch)
    check_commit_text(message, metadata, author)
    path = Path(directory)
    try:
        root = os.path.realpath(path, strict=True)
    except OSError as exc:
        raise InputError(f"{directory}: {exc.strerror or 'does not exist'}") from None
    if not os.path.isdir(root):
        raise InputError(f"{directory} is not a directory")
    head = repo.refs.lookup_branch(branch)
    cache = StatCache(repo.id, Path(root))
    if cache.commit_id and repo.has_commit(cache.commit_id):
        cache.load()
    scan_start = time.time_ns()
    warnings: list[str] = []
    prog = Progress()
    with _gc_paused(), repo.writer(checkpoint_blobs=_CHECKPOINT_BLOBS, remember_trees=False) as writer:
        walk = _Walk(writer, cache, scan_start, warnings, prog, progress)
        tree_id = walk.run(root)
    result = CommitResult(b"", tree_id, False, files=walk.files, files_read=prog.files_done,
                          bytes_read=prog.bytes_done, write=writer.stats, warnings=warnings)

    if head is not None and repo.load_commit(head).tree == tree_id and not allow_empty:
        cache.save(head)
        cache.close()
        raise NothingToCommitError(f"nothing to commit: {directory} matches {branch} ({head.hex()[:12]})", head,
                                   warnings)
    commit = Commit(
        tree=tree_id,
        parents=(head,) if head is not None else (),
        author=author or default_author(),
        time=int(time.time()),
        message=message,
        metadata=dict(metadata or {}),
    )
    cid = repo.save_commit(commit)
    result.write.bytes_stored += len(commit.encode())
    try:
        repo.refs.set_branch_if_equals(branch, cid, head)
    except RefConflictError:
        cache.close()
        now = repo.refs.lookup_branch(branch)
        moved = f"moved to {now.hex()[:12]}" if now else "was deleted"
        raise RefConflictError(
            f"branch {branch} {moved} while committing (another writer); your data is stored: "
            "re-run the commit to create it on top of the new head"
        ) from None
    cache.save(cid)
    cache.close()
    result.commit_id, result.created = cid, True
    return result


#: glibc's mmap threshold for a committing process (bound_allocator): blocks from this size
#: up are mmap'ed and go back to the system when freed.
MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def bound_allocator() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` for this process (the
    CLI's commit calls it; it owns its process).  glibc raises the threshold as
    the large blocks it mmap'ed are freed, up to 32 MiB, so that after the first
    few images, read windows and pack buffers of a commit come from its heaps and
    per-thread arenas, where what a commit frees in one thread is kept for that
    thread: the sample dataset's first commit peaked at 194-236 MB of RSS for
    about 125 MB of live Python memory, and at 157-166 MB with this call, in
    about the same time (docs/BENCH.md, "First commit memory").  Not done where
    the user set the threshold (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``)
    or off glibc.  True if it was set here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector paused for the walk (re-enabled after, if it was).
    A commit allocates a few tuples per file, long-lived ones (the writer's session, the
    directories on the walk's path) among them, and the collector's passes over them were
    a third of a first commit's CPU (50k files: 659 + 60 + 5 collections, 1.5 s, finding
    410 objects): the walk makes no reference cycles (a directory's links to its parent
    and children are cut when its tree is built: _Walk._build), so its memory is freed
    by reference counts alone, collector or not."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def store_tree(writer: BlobWriter, entries: list[TreeEntry], base: bytes | None = None) -> tuple[bytes, int]:
    """Store the tree of one directory from its entries (canonical: sorted,
    valid names); its (id, size).  Every tree of a commit is built here.
    ``base``: the directory's previous tree, which the new one may be stored
    as a delta of (BlobWriter.add_tree)."""
    tree = Tree(tuple(entries))
    return writer.add_tree(tree, base), tree.size


class _Walk:
    """The commit's one streaming pass (see the module's docstring).

    Reads of changed small files queue in ``pending`` in walk order, each
    waiting in the pool; the committing thread stores results from the head
    of the queue whenever the read-ahead bound is reached, and builds a
    directory's tree the moment nothing is left for it (``_Dir.left``): its
    files stored and its subdirectories built, so objects are always added
    after the objects beneath them (what the writer's checkpoints need)."""

    def __init__(self, writer: BlobWriter, cache: StatCache, scan_start: int, warnings: list[str],
                 prog: Progress, progress: Callable[[Progress], None] | None):
        self.writer, self.cache, self.scan_start, self.warnings = writer, cache, scan_start, warnings
        self.prog, self.progress = prog, progress
        self.pending: deque = deque()  # (files: [(dir, slot)], st_size bytes, future), in walk order
        self.queued = 0  # files of ``pending``
        self.batch: list = []  # small files not submitted yet: (path, st_size, where), prepare_batch's
        self.batch_slots: list = []  # ... and the (dir, slot) of each
        self.batch_bytes = 0
        self.inflight = 0  # st_size bytes of ``pending`` and ``batch``
        self.files = 0  # files in the commit
        self.pool: ThreadPoolExecutor | None = None
        self.open_dirs: dict[int, _Dir] = {}  # directories holding a descriptor (_Dir.fd), by id()
        self.gaps: set[int] = set()  # id() of directories with an entry dropped (_changed)
        #: statcache.trusted(mtime, scan_start) is ``mtime < trust_before`` (checked in _build_tree).
        self.trust_before = scan_start - _RACY_NS

    def _done(self, nbytes: int, files: int = 0) -> None:
        self.prog.bytes_done += nbytes
        self.prog.files_done += files
        if self.progress:
            self.progress(self.prog)

    def run(self, root: str) -> bytes:
        try:
            rst = os.stat(root)
        except OSError as exc:
            raise _read_error(root, exc) from None
        top = _Dir("", root, (rst.st_mtime_ns, rst.st_ino))
        top.dev = rst.st_dev
        try:
            with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="commitfs-read") as self.pool:
                stack = [top]
                while stack:
                    d = stack.pop()
                    to_read = _scan_dir(d, self.cache, self.warnings, keep_fd=len(self.open_dirs) < _DIR_FDS)
                    if d.fd is not None:
                        self.open_dirs[id(d)] = d
                    d.reads = len(to_read)
                    self.files += d.nfiles
                    if to_read:
                        self._read_all(d, to_read)
                    stack.extend(reversed(d.subdirs))  # popped in name order: the stat cache's key order
                    d.left += len(d.subdirs)
                    self._settle(d)  # its scan is done
                self._submit()
                while self.pending:
                    self._drain_one()
        finally:  # (the pool's threads are done with them)
            for d in self.open_dirs.values():
                os.close(d.fd)
                d.fd = None
            self.open_dirs.clear()
        assert top.built is not None
        return top.built[0]

    def _read_all(self, d: _Dir, slots: list[int]) -> None:
        """``_read`` each of ``slots``; small files in a loop of its own (once per file
        of a first commit: the directory's attributes read once, no os.path.join)."""
        prefix = d.path if d.path.endswith("/") else d.path + "/"
        entries, stat, fd, dev, prog = d.entries, d.stat, d.fd, d.dev, self.prog
        for slot in slots:
            name, _, (_, st_size, _) = entries[slot]
            if st_size > _SMALL_FILE:
                self._read(d, slot)
                continue
            prog.files_total += 1
            prog.bytes_total += st_size
            d.left += 1
            while (self.pending or self.batch) and (self.inflight + st_size > _READ_AHEAD_BYTES
                                                    or self.queued + len(self.batch) >= _READ_AHEAD_FILES):
                if not self.pending:
                    self._submit()
                self._drain_one()
            # Opened as the scan saw it: relative to the directory's descriptor, that inode.
            batch = self.batch
            batch.append((prefix + name, st_size, (fd, name, dev, stat[slot + 1][4])))
            self.batch_slots.append((d, slot))
            self.batch_bytes += st_size
            self.inflight += st_size
            if len(batch) >= _BATCH_FILES or self.batch_bytes >= _BATCH_BYTES:
                self._submit()

    def _read(self, d: _Dir, slot: int) -> None:
        name, _, (_, st_size, _) = d.entries[slot]
        path = os.path.join(d.path, name)
        # Opened as the scan saw it: relative to the directory's descriptor, that inode.
        where = (d.fd, name, d.dev, d.stat[slot + 1][4])
        self.prog.files_total += 1
        self.prog.bytes_total += st_size
        d.left += 1
        if st_size > _SMALL_FILE:
            self._submit()
            while self.pending:
                self._drain_one()
            try:
                fid, size = store_large_file(self.pool, self.writer, path, self._done, where)
            except _Changed:
                self._changed(d, slot)
                return
            self._stored(d, slot, fid, size, 0)  # its bytes counted as they were stored
            return
        while (self.pending or self.batch) and (self.inflight + st_size > _READ_AHEAD_BYTES
                                 or self.queued + len(self.batch) >= _READ_AHEAD_FILES):
            if not self.pending:
                self._submit()
            self._drain_one()
        self.batch.append((path, st_size, where))
        self.batch_slots.append((d, slot))
        self.batch_bytes += st_size
        self.inflight += st_size
        if len(self.batch) >= _BATCH_FILES or self.batch_bytes >= _BATCH_BYTES:
            self._submit()

    def _submit(self) -> None:
        """Hand the batch of small files to the pool."""
        if not self.batch:
            return
        batch, slots, nbytes = self.batch, self.batch_slots, self.batch_bytes
        self.batch, self.batch_slots, self.batch_bytes = [], [], 0
        fut = self.pool.submit(prepare_batch, batch)
        self.pending.append((slots, nbytes, fut))
        self.queued += len(batch)

    def _drain_one(self) -> None:
        files, st_bytes, fut = self.pending.popleft()
        results = fut.result()
        writer = self.writer
        if all(type(p) is tuple for p in results):  # (the common case: small files of one chunk each)
            writer.add_one_chunk_files(results)
            nbytes = 0
            settle = self._settle
            for (d, slot), prepared in zip(files, results):
                size = len(prepared[1])
                nbytes += size
                name, kind, (_, _, mtime) = d.entries[slot]
                d.entries[slot] = (name, kind, (prepared[4], size, mtime))
                d.reads -= 1
                if not d.reads and d.fd is not None:
                    self._close_dir(d)
                if d.left > 1:
                    d.left -= 1
                else:
                    settle(d)
            self.inflight -= st_bytes
            self.queued -= len(files)
            self._done(nbytes, len(files))
            return
        add = writer.add
        nbytes = 0
        # (Per file: enum members as locals, each attribute of an enum class being a Python call.)
        CHUNK, MANIFEST, NONE = BlobKind.CHUNK, BlobKind.MANIFEST, Compression.NONE
        for (d, slot), prepared in zip(files, results):
            if type(prepared) is tuple:  # one chunk (prepare_batch)
                cid, chunk, stored, comp, fid, mdata = prepared
                new = add(cid, CHUNK, chunk, stored=stored, compression=comp)
                add(fid, MANIFEST, mdata, stored=mdata, compression=NONE, above_new=new)
                size = len(chunk)
            elif prepared is None:  # not the file the scan saw
                self._changed(d, slot)
                continue
            else:
                fid = store_prepared(writer, prepared)
                size = prepared.size
            nbytes += size
            name, kind, (_, _, mtime) = d.entries[slot]
            d.entries[slot] = (name, kind, (fid, size, mtime))
            d.reads -= 1
            if not d.reads and d.fd is not None:
                self._close_dir(d)
            if d.left > 1:  # (_settle's common case inline)
                d.left -= 1
            else:
                self._settle(d)
        self.inflight -= st_bytes
        self.queued -= len(files)
        self._done(nbytes, len(files))

    def _stored(self, d: _Dir, slot: int, fid: bytes, size: int, nbytes: int) -> None:
        name, kind, (_, _, mtime) = d.entries[slot]
        d.entries[slot] = (name, kind, (fid, size, mtime))
        self._done(nbytes, 1)
        d.reads -= 1
        if not d.reads and d.fd is not None:
            self._close_dir(d)
        self._settle(d, 1)

    def _close_dir(self, d: _Dir) -> None:
        del self.open_dirs[id(d)]
        fd, d.fd = d.fd, None
        os.close(fd)

    def _changed(self, d: _Dir, slot: int) -> None:
        """File ``slot`` of ``d`` was not the regular file the scan saw when it was opened
        (swapped since for another file, a symlink, a FIFO...): stat it again and take
        what is there now, as a scan would have: a regular file is read (and checked
        again), a symlink recorded as a symlink, a special file skipped with the scan's
        warning.  Then settled as any read."""
        name = d.entries[slot][0]
        path = os.path.join(d.path, name)
        for _ in range(3):
            try:
                if d.fd is not None:
                    st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
                else:
                    st = os.lstat(path)
            except OSError as exc:
                raise _read_error(path, exc) from None
            mode = st.st_mode
            if statmod.S_ISREG(mode):
                kind = Kind.EXEC if mode & statmod.S_IXUSR else Kind.FILE
                where = (d.fd, name, st.st_dev, st.st_ino)
                try:
                    if st.st_size > _SMALL_FILE:
                        fid, size = store_large_file(self.pool, self.writer, path, self._done, where)
                    else:
                        [prepared] = prepare_batch([(path, st.st_size, where)])
                        if prepared is None:
                            continue
                        fid = store_prepared(self.writer, prepared) if type(prepared) is not tuple \
                            else self._store_one(prepared)
                        size = len(prepared[1]) if type(prepared) is tuple else prepared.size
                        self._done(size)
                except _Changed:
                    continue
                d.entries[slot] = (name, kind, (fid, size, st.st_mtime_ns))
                d.stat[slot + 1] = (name, 1 if kind is Kind.EXEC else 0, st.st_size, st.st_mtime_ns, st.st_ino,
                                    st.st_ctime_ns)
                break
            if statmod.S_ISDIR(mode):
                raise InputError(f"{_display(path)} became a directory while it was being committed: "
                                 "commit again")
            self.files -= 1
            if statmod.S_ISLNK(mode):
                try:
                    target = os.readlink(os.fsencode(name), dir_fd=d.fd) if d.fd is not None \
                        else os.readlink(os.fsencode(path))
                except OSError as exc:
                    raise _read_error(path, exc) from None
                d.entries[slot] = (name, Kind.SYMLINK, target)
                d.stat[slot + 1] = (name, 2, target)
            else:
                self.warnings.append(_skipped(mode, path))
                d.entries[slot] = (name, None, None)
                d.stat[slot + 1] = None
                self.gaps.add(id(d))
            break
        else:
            raise InputError(f"{_display(path)} kept changing while it was being committed: commit again")
        d.reads -= 1
        if not d.reads and d.fd is not None:
            self._close_dir(d)
        self._settle(d, 1)

    def _store_one(self, prepared: tuple) -> bytes:
        """Store a one-chunk file prepared by prepare_batch; its file id."""
        cid, chunk, stored, comp, fid, mdata = prepared
        self.writer.add(cid, BlobKind.CHUNK, chunk, stored=stored, compression=comp)
        self.writer.add(fid, BlobKind.MANIFEST, mdata, stored=mdata, compression=Compression.NONE)
        return fid

    def _settle(self, d: _Dir, n: int = 1) -> None:
        """``n`` things directory ``d`` waited for are done; build what is complete."""
        d.left -= n
        while d is not None and d.left == 0:
            self._build(d)
            d = d.parent
            if d is not None:
                d.left -= 1

    def _build(self, d: _Dir) -> None:
        """Build directory ``d``'s tree.  A directory the stat cache matched whose
        subdirectories were all reused is reused too: its cached tree id is taken
        as it is (nothing built, encoded or stored); the others are built and
        their rows recorded.  Then its entries are released."""
        cached = d.cached
        if cached is not None and cached.tree is not None and all(c.built[2] for c in d.subdirs):
            d.built = (cached.tree, cached.size, True)
        else:
            if d.prev is None and cached is not None and cached.tree is not None \
                    and len(cached.stat) > splittree.SPLIT_ENTRIES + 1:
                d.prev = cached  # a large directory whose files matched, a subdirectory not: edited too
            d.built = self._build_tree(d)
        d.entries = d.stat = d.subdirs = d.cached = d.prev = d.base = None  # done with: release as we go

    def _build_tree(self, d: _Dir) -> tuple[bytes, int, bool]:
        entries = []
        changed_dirs = []  # slots of the subdirectories built anew
        ids = []
        all_trusted = True
        cached_ids = d.cached.ids if d.cached is not None else None
        k = 0
        # (Once per entry of the commit: enum members as locals, statcache.trusted inlined,
        # entries made by tuple.__new__: a namedtuple's own __new__ is a Python function.)
        DIR, SYMLINK, FILE, EXEC = Kind.DIR, Kind.SYMLINK, Kind.FILE, Kind.EXEC
        assert trusted(self.trust_before - 1, self.scan_start) and not trusted(self.trust_before, self.scan_start)
        trust_before = self.trust_before
        new, append = tuple.__new__, entries.append
        for name, kind, payload in d.entries:
            if kind is FILE or kind is EXEC:
                fid, size, mtime = payload
                if fid is None:  # unchanged in a matched directory
                    fid = cached_ids[k * ID_SIZE:(k + 1) * ID_SIZE]
                k += 1
                if mtime < trust_before:
                    ids.append(fid)
                else:
                    ids.append(UNTRUSTED)
                    all_trusted = False
                append(new(TreeEntry, (name, kind, size, fid, b"")))
            elif kind is DIR:
                tid, size, reused = payload.built
                if not reused:
                    changed_dirs.append(len(entries))
                payload.parent = payload.built = None
                append(TreeEntry(name, DIR, size, tid))
            elif kind is SYMLINK:
                append(symlink_entry(name, payload))
            # else None: a file that became a special file (_changed): skipped
        # Already canonical: names come from the file system (never empty, '.',
        # '..', nor containing '/' or NUL), were checked as UTF-8 by the scan,
        # and are in code point order, which is UTF-8 byte order.
        if self.gaps and id(d) in self.gaps:  # the rows of the entries skipped (_changed) dropped
            self.gaps.discard(id(d))
            d.stat = [row for row in d.stat if row is not None]
        edited = self._edit_tree(d, entries, changed_dirs) if d.prev is not None else None
        if edited is None and d.base is None and d.cached is not None and d.cached.tree is not None:
            d.base = d.cached.tree  # its files matched, a subdirectory did not
        tid, size = edited or store_tree(self.writer, entries, d.base)
        self.cache.record_dir(d.rel, d.stat, b"".join(ids), tid if all_trusted else None, size)
        return tid, size, False

    def _edit_tree(self, d: _Dir, entries: list[TreeEntry], changed_dirs: list[int]) -> tuple[bytes, int] | None:
        """Store large directory ``d``'s new tree as an edit of the tree its stat-cache
        row names (model.splittree.split_edit: only the leaves near the changes are
        re-cut and re-encoded, and the index nodes above them; the same ids as
        encoding it whole).  The edits: the entries whose stat changed or that are
        new, the names gone, and the subdirectories built anew.  None (encode it
        whole) if that tree is not a split one or cannot be read, or if the edits
        fall in more than half of its leaves (splittree.edit_pays, from its index
        nodes alone: then encoding it whole costs less, and reads no old leaf)."""
        prev = d.prev
        old, new = set(prev.stat[1:]), set(d.stat[1:])
        changed = {t[0] for t in new - old}
        gone = {t[0] for t in old - new} - changed
        changed.update(entries[slot].name for slot in changed_dirs)
        if not changed and not gone:
            return prev.tree, prev.size
        try:
            base = self.writer.repo.load_tree(prev.tree, keep=False)
        except (ObjectNotFoundError, CorruptObjectError):
            return None  # gone or damaged: encoded whole
        if not isinstance(base, splittree.SplitTree):
            return None
        try:
            # Edits in most of its leaves (a touch of every file): encoded whole, no old leaf read.
            if not splittree.edit_pays(base, changed | gone):
                return None
            edits: dict[str, TreeEntry | None] = dict.fromkeys(gone)
            for e in entries:
                if e.name in changed:
                    edits[e.name] = e
            return self.writer.add_tree_edit(base, edits)
        except (ObjectNotFoundError, CorruptObjectError):  # an index node or leaf of it
            return None
