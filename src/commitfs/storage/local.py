"""A store on a local directory.

Objects are files written to a temporary name, fsync'd and renamed into place,
so they appear whole or not at all.  References are files too; their
compare-and-swap holds an flock on ``refs/.lock`` around read-compare-rename,
which serialises writers across processes on this machine (and on NFS with
working locks).  Reads use pread on cached descriptors: packs are read in
place, never copied.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from commitfs.errors import ObjectNotFoundError, RefConflictError, StorageError
from commitfs.storage.base import Store

_REFS = "refs"
# Open descriptors kept for pread; packs are large, so a few hundred cover a
# working set while staying far below the usual 1024-descriptor limit.
_FD_CACHE_SIZE = 256
# Bytes copied at a time by a streamed save (save_object_from).
_COPY_BLOCK = 1024 * 1024
#: Seconds between checks for kept descriptors of files removed behind the store's
#: back (another process's gc): the most their space stays held past a read.
RECHECK_S = 2.0


class _Descriptor:
    __slots__ = ("fd", "users", "retired")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0  # reads using it right now
        self.retired = False  # let go by the table: closed once unused


class _FdTable:
    """Open descriptors by key, at most ``size``, the least recently used let go
    first.  A read holds its descriptor (``acquire`` ... ``release``), and one let
    go while a read holds it is closed when that read ends: a descriptor number
    is never closed under a reader, where another thread could reopen it for
    another file and the read would return that file's bytes (which the hash
    check would then report as corruption).

    A file removed by another process (a pack gc deleted or replaced) would stay
    allocated on disk while its descriptor is kept: at most every ``RECHECK_S``
    an ``acquire`` first lets go of those whose file has no name left (fstat's
    ``st_nlink == 0``); a later read of the key opens it by name again, and
    finds it gone (ObjectNotFoundError) or replaced."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._by_key: OrderedDict[str, _Descriptor] = OrderedDict()
        self._checked = time.monotonic()

    def _let_go_of_removed(self) -> list[int]:
        """(Under the lock.) Retire descriptors of files with no name left; the fds to close."""
        self._checked = time.monotonic()
        gone = []
        for key, d in self._by_key.items():
            try:
                if os.fstat(d.fd).st_nlink == 0:
                    gone.append(key)
            except OSError:
                gone.append(key)
        return [self._retire(self._by_key.pop(key)) for key in gone]

    def acquire(self, key: str) -> _Descriptor | None:
        closing: list[int] = []
        try:
            with self._lock:
                if self._by_key and time.monotonic() - self._checked >= RECHECK_S:
                    closing = self._let_go_of_removed()
                d = self._by_key.get(key)
                if d is not None:
                    self._by_key.move_to_end(key)
                    d.users += 1
                return d
        finally:
            _close_all(closing)

    def add(self, key: str, fd: int) -> _Descriptor:
        """Keep a descriptor just opened (or use one another thread added first), acquired."""
        with self._lock:
            d = self._by_key.get(key)
            if d is None:
                d = self._by_key[key] = _Descriptor(fd)
                fd = -1
            d.users += 1
            closing = [self._retire(self._by_key.popitem(last=False)[1])
                       for _ in range(len(self._by_key) - self.size)]
        _close_all([fd, *closing])
        return d

    def release(self, d: _Descriptor) -> None:
        with self._lock:
            d.users -= 1
            fd = d.fd if d.retired and d.users == 0 else -1
        _close_all([fd])

    def discard(self, key: str | None = None) -> None:
        """Let go of ``key``'s descriptor (None: of every one)."""
        with self._lock:
            if key is None:
                gone = list(self._by_key.values())
                self._by_key.clear()
            else:
                d = self._by_key.pop(key, None)
                gone = [] if d is None else [d]
            closing = [self._retire(d) for d in gone]
        _close_all(closing)

    @staticmethod
    def _retire(d: _Descriptor) -> int:
        d.retired = True
        return d.fd if d.users == 0 else -1

    def __len__(self) -> int:
        return len(self._by_key)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _storage_error(exc: OSError, what: str, root: Path | None = None) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on device while writing {what}")
    if exc.errno == errno.ENOTDIR and root is not None and not root.is_dir():
        # (-r data/labels.csv: a file where the repository should be.)
        return StorageError(f"{root} is not a directory (a local repository is a directory)")
    where = f" in {root}" if root is not None else ""
    return StorageError(f"{what}{where}: {exc.strerror or exc}")


class LocalStore(Store):
    def __init__(self, path: str | os.PathLike):
        try:
            self.root = Path(path).expanduser().absolute()
        except RuntimeError:  # "~nouser/x": no such user, no home directory
            raise StorageError(f"cannot find the home directory in {os.fspath(path)!r}") from None
        self.url = str(self.root)
        self._fds = _FdTable(_FD_CACHE_SIZE)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return self.root / key

    # --- objects -------------------------------------------------------------
    def save_object(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._write_atomic(path, data, what=key)

    def save_object_from(self, key: str, f: BinaryIO, size: int) -> None:
        """Streamed: copied a block at a time into the temporary file renamed into place."""
        def blocks():
            f.seek(0)
            left = size
            while left:
                block = f.read(min(left, _COPY_BLOCK))
                if not block:
                    raise OSError(errno.EIO, f"the file to store as {key} ended {left} bytes early")
                left -= len(block)
                yield block
        self._write_atomic(self._path(key), blocks(), what=key)

    def _write_atomic(self, path: Path, data, what: str) -> None:
        """Write ``data`` (bytes-like, or an iterator of bytes-like blocks) to ``path``
        through a temporary file fsync'd and renamed into place."""
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for block in (data if isinstance(data, Iterator) else (data,)):
                    view = memoryview(block)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException as exc:  # a Ctrl-C in a long streamed copy too: no .tmp- file left
            try:
                tmp.unlink()
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise _storage_error(exc, what, self.root) from exc
            raise

    def _acquire(self, key: str) -> _Descriptor:
        """``key``'s descriptor, opened if need be; give it back with ``self._fds.release``."""
        d = self._fds.acquire(key)
        if d is not None:
            return d
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key} is missing from the repository") from None
        except OSError as exc:
            raise _storage_error(exc, key, self.root) from exc
        return self._fds.add(key, fd)

    def load_object(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key} is missing from the repository") from None
        except OSError as exc:
            raise _storage_error(exc, key, self.root) from exc

    def load_range(self, key: str, offset: int, length: int) -> bytes:
        d = self._acquire(key)
        try:
            return os.pread(d.fd, length, offset)
        except OSError as exc:
            raise _storage_error(exc, key, self.root) from exc
        finally:
            self._fds.release(d)

    def lookup_size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _storage_error(exc, key, self.root) from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        # Walk only the directory the prefix lies in.
        head, _, _ = prefix.rpartition("/")
        base = self._path(head) if head else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            if rel == "" and _REFS in dirnames:
                dirnames.remove(_REFS)
            for name in filenames:
                if name.startswith(".tmp-") or name.startswith("."):
                    continue
                key = rel + name
                if key.startswith(prefix):
                    yield key

    def iter_objects(self, prefix: str = "") -> Iterator[tuple[str, int, float | None]]:
        for key in self.iter_keys(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                continue  # removed since listed
            except OSError as exc:
                raise _storage_error(exc, key) from exc
            yield key, st.st_size, st.st_mtime

    def remove_object(self, key: str) -> None:
        self._fds.discard(key)
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error(exc, key, self.root) from exc

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    # --- references ----------------------------------------------------------
    def _ref_path(self, name: str) -> Path:
        return self._path(f"{_REFS}/{name}")

    def load_ref(self, name: str) -> bytes | None:
        try:
            return self._ref_path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _storage_error(exc, f"reference {name}", self.root) from exc

    def save_ref_if_equals(self, name: str, new: bytes | None, expected: bytes | None) -> None:
        path = self._ref_path(name)
        lock_path = self.root / _REFS / ".lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _storage_error(exc, f"reference {name}", self.root) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            current = self.load_ref(name)
            if current != expected:
                raise RefConflictError(f"reference {name} changed meanwhile")
            if new is None:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            else:
                self._write_atomic(path, new, what=f"reference {name}")
        finally:
            os.close(lock_fd)  # releases the flock

    def iter_refs(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        base = self.root / _REFS
        if not base.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            for fname in filenames:
                if fname.startswith("."):
                    continue
                name = os.path.relpath(os.path.join(dirpath, fname), base)
                if name.startswith(prefix):
                    value = self.load_ref(name)
                    if value is not None:
                        yield name, value

    def close(self) -> None:
        self._fds.discard()
