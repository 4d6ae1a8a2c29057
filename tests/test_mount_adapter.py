"""The pyfuse3 adapter without a kernel: errno mapping in one place, EIO for the unexpected."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio

from commitfs.errors import (
    CorruptObjectError,
    IsADirectoryError_,
    NotADirectoryError_,
    PathNotFoundError,
    RevisionError,
    StorageError,
    StorageTimeoutError,
)
from commitfs.fuse.adapter import Operations, errno_of
from commitfs.vfs import Attr
from commitfs.vfs.errors import BadHandleError, NoSuchAttributeError, ReadOnlyError


class RaisingFs:
    """A file system whose every request raises the exception it is given."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    async def lookup(self, parent_inode, name):
        raise self.exc

    async def read(self, fh, off, size):
        raise self.exc

    def forget(self, inode_list):
        raise self.exc

    def refuse_write(self, what):
        raise ReadOnlyError(f"{what}: read-only")

    async def getattr(self, inode):
        return Attr(inode, 0o100444, 10, 5_000_000_000, 86400.0, 86400.0)


@pytest.mark.parametrize("exc,code", [
    (PathNotFoundError("x"), errno.ENOENT),
    (RevisionError("x"), errno.ENOENT),
    (NotADirectoryError_("x"), errno.ENOTDIR),
    (IsADirectoryError_("x"), errno.EISDIR),
    (ReadOnlyError("x"), errno.EROFS),
    (NoSuchAttributeError("x"), errno.ENODATA),
    (BadHandleError("x"), errno.EBADF),
    (CorruptObjectError("x"), errno.EIO),
    (StorageTimeoutError("x"), errno.EIO),
    (StorageError("x"), errno.EIO),
    (RuntimeError("a bug"), errno.EIO),
    (KeyError("a bug"), errno.EIO),
])
def test_exceptions_become_errno(exc, code):
    ops = Operations(RaisingFs(exc))

    async def main():
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.lookup(1, b"x", None)
        assert raised.value.errno == code
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.read(1, 0, 10)
        assert raised.value.errno == code
    trio.run(main)


def test_unexpected_errors_are_logged_with_traceback_and_storage_errors_in_one_line(caplog):
    caplog.set_level(logging.INFO, logger="commitfs.fuse")
    assert errno_of(ValueError("boom"), "read") == errno.EIO
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    caplog.clear()
    assert errno_of(CorruptObjectError("chunk abc fails its hash check"), "read") == errno.EIO
    (record,) = caplog.records
    assert "fails its hash check" in record.getMessage() and record.exc_info is None
    caplog.clear()
    assert errno_of(PathNotFoundError("x"), "lookup") == errno.ENOENT
    assert caplog.records == []  # expected conditions are not logged


def test_forget_never_raises_and_writes_are_erofs(caplog):
    ops = Operations(RaisingFs(RuntimeError("bug in forget")))

    async def main():
        await ops.forget([(5, 1)])  # logged, not raised
        for name, args in [("setattr", (1, None, None, None, None)), ("mkdir", (1, b"d", 0o755, None)),
                           ("unlink", (1, b"f", None)), ("rename", (1, b"a", 1, b"b", 0, None)),
                           ("create", (1, b"f", 0o644, 0, None)), ("write", (1, 0, b"x")),
                           ("setxattr", (1, b"user.x", b"1", None)), ("symlink", (1, b"l", b"t", None)),
                           ("link", (1, 1, b"l", None)), ("mknod", (1, b"n", 0o644, 0, None)),
                           ("rmdir", (1, b"d", None)), ("removexattr", (1, b"user.x", None))]:
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await getattr(ops, name)(*args)
            assert raised.value.errno == errno.EROFS, name
        attr = await ops.getattr(7, None)
        assert (attr.st_ino, attr.st_size, attr.st_mode, attr.st_mtime_ns) == (7, 10, 0o100444, 5_000_000_000)
        assert attr.st_blocks == 1 and attr.st_blksize == 128 * 1024
    trio.run(main)
    assert any("forget failed" in r.getMessage() for r in caplog.records)


def test_unmount_waits_for_page_cache_hand_offs_and_refuses_new_ones(monkeypatch):
    """A notify-store in a worker thread must not run into pyfuse3.close: the
    daemon's end_page_stores waits (bounded) for one in flight, then later ones do
    nothing."""
    import threading

    from commitfs.fuse import adapter

    monkeypatch.setattr(adapter, "_stores_open", True)
    monkeypatch.setattr(adapter, "_stores_running", 0)
    entered, release, calls = threading.Event(), threading.Event(), []

    def notify_store(inode, offset, data):
        calls.append(inode)
        entered.set()
        release.wait(10)

    monkeypatch.setattr(adapter.pyfuse3, "notify_store", notify_store)
    t = threading.Thread(target=adapter.store_pages, args=(7, 0, b"x"))
    t.start()
    assert entered.wait(10)
    assert adapter.end_page_stores(timeout=0.2) is False  # still in flight: bounded wait
    release.set()
    t.join(10)
    assert adapter.end_page_stores(timeout=5) is True
    adapter.store_pages(8, 0, b"y")  # after the door closed: not handed to the kernel
    assert calls == [7]
