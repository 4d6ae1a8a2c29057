"""Bytes of a local repository's pack files that the page cache holds, read without waiting.

The mount's event loop serves what is in memory itself (vfs/loader.py): a hop
to a worker thread and back costs about 100 µs of CPU here, more than reading
and verifying a cached image.  For a local repository "in memory" includes the
kernel's page cache, so the read engine's memory path (repo/engine.py,
``*_from_memory``) reads pack files through this module:

* ``preadv2(RWF_NOWAIT)`` returns the page cache's bytes or fails with EAGAIN
  rather than read the disk;
* a pack file not yet open is opened with ``openat2(RESOLVE_CACHED)``, which
  fails rather than read a directory from disk (Linux 5.12; an older kernel:
  a pack's first touch then always takes the thread path).

Open descriptors are kept (up to ``MAX_OPEN``), so a pack gc has deleted or
replaced would stay allocated on disk, held by its descriptor, until the mount
ends.  So at most every ``RECHECK_S`` a read first checks the descriptors it
keeps (``fstat``: no disk I/O) and closes those whose file has no name left
(``st_nlink == 0``): the next read of that key opens it again by name, which
fails for a deleted pack and takes the blocking path, where the repository
re-lists the index and reads the blob at its new place (docs/SEMANTICS.md,
garbage collection).

Anything short of that (not cached, partly cached, past the end, the file
gone, no such syscall) is ``None``: the caller takes the blocking path in a
worker thread, which reads through the store and reports errors.  Storage
knows nothing of this; the store only says where a key lives on disk
(Store.local_path).  Bytes read here are verified by the engine as any
others.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections import OrderedDict

from commitfs.storage.base import Store

#: Pack descriptors kept open: packs are large, a few dozen cover a working set.
MAX_OPEN = 64
#: Seconds between checks for kept descriptors of packs gc removed (module doc):
#: the most a removed pack's space stays held past a read of the mount.
RECHECK_S = 2.0


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added in 5.6)
_RESOLVE_CACHED = 0x20  # Linux 5.12: fail with EAGAIN unless the path resolves from the dentry cache
_AT_FDCWD = -100


class _CachedOpener:
    """open(2) that never waits for the disk (``openat2(RESOLVE_CACHED)``)."""

    def __init__(self):
        try:
            self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            self._syscall = None
        self._how = _OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
        self._how_ref = ctypes.byref(self._how)
        self._how_size = ctypes.sizeof(self._how)

    def __call__(self, path: bytes) -> int | None:
        """A descriptor for ``path``, or None if opening it might block (or the
        kernel lacks openat2/RESOLVE_CACHED, which is then not tried again)."""
        if self._syscall is None:
            return None
        fd = self._syscall(_SYS_OPENAT2, _AT_FDCWD, path, self._how_ref, self._how_size)
        if fd >= 0:
            return fd
        if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.E2BIG):
            self._syscall = None  # an older kernel: the blocking open in a thread it is
        return None


_open_cached = _CachedOpener()


class ResidentReader:
    """Reads of one local store's objects from the page cache (module doc)."""

    def __init__(self, store: Store):
        self.store = store
        self._fds: OrderedDict[str, int] = OrderedDict()
        # Held across a read: a descriptor is never closed (and its number
        # reused for another file) under a reader.  Every call is non-blocking.
        self._lock = threading.Lock()
        self._checked = time.monotonic()  # the last release_removed()
        #: Descriptors closed because their pack file was removed (tests, the log).
        self.released = 0

    def release_removed(self) -> int:
        """Close the kept descriptors whose file no longer has a name (deleted or
        replaced by gc); how many.  Never blocks (fstat of open files)."""
        with self._lock:
            return self._release_removed()

    def _release_removed(self) -> int:
        self._checked = time.monotonic()
        gone = []
        for key, fd in self._fds.items():
            try:
                if os.fstat(fd).st_nlink == 0:
                    gone.append(key)
            except OSError:
                gone.append(key)
        for key in gone:
            try:
                os.close(self._fds.pop(key))
            except OSError:
                pass
        self.released += len(gone)
        return len(gone)

    def read_into(self, key: str, offset: int, buf) -> bool:
        """Fill the writable buffer ``buf`` with the bytes at ``offset`` of
        ``key`` if the page cache holds all of them; False otherwise."""
        with self._lock:
            if self._fds and time.monotonic() - self._checked >= RECHECK_S:
                self._release_removed()
            fd = self._fds.get(key)
            if fd is None:
                path = self.store.local_path(key)
                fd = None if path is None else _open_cached(os.fsencode(path))
                if fd is None:
                    return False
                self._fds[key] = fd
                while len(self._fds) > MAX_OPEN:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(key)
            try:
                n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
            except OSError:  # EAGAIN; or EOPNOTSUPP: the blocking path will tell
                return False
        return n == len(buf)  # partly cached, or the object's end: the blocking path decides

    def load_range(self, key: str, offset: int, length: int):
        """``length`` bytes at ``offset`` as a read-only buffer, or None (read_into)."""
        if length <= 0:
            return None
        buf = bytearray(length)
        if not self.read_into(key, offset, buf):
            return None
        return memoryview(buf).toreadonly()

    def close(self) -> None:
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
