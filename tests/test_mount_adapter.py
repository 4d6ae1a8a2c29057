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
    from commitfs.fuse import adapter

    t, release, calls = _blocked_hand_off(monkeypatch)
    assert adapter.end_page_stores(timeout=0.2) is False  # still in flight: bounded wait
    release.set()
    t.join(10)
    assert adapter.end_page_stores(timeout=5) is True
    adapter.store_pages(8, 0, b"y")  # after the door closed: not handed to the kernel
    assert calls == [7]


def test_hand_offs_queued_in_an_ended_session_never_reach_the_next_one(monkeypatch):
    """A process may serve one mount after another (daemon.py: reopen_page_stores).
    Hand-offs still queued for the PageStorer's thread when a session ends name
    that session's inodes; in the next session the same numbers are other files,
    so they are dropped, never stored into its page cache."""
    import threading

    from commitfs.fuse import adapter

    monkeypatch.setattr(adapter, "_stores_open", True)
    monkeypatch.setattr(adapter, "_stores_running", 0)
    monkeypatch.setattr(adapter, "_session", 0)
    storer = adapter.PageStorer()
    monkeypatch.setattr(adapter, "page_storer", storer)
    entered, release, done, calls = threading.Event(), threading.Event(), threading.Event(), []

    def notify_store(inode, offset, data):
        calls.append(inode)
        if inode == 1:
            entered.set()
            release.wait(20)
        if inode == 5:
            done.set()

    monkeypatch.setattr(adapter.pyfuse3, "notify_store", notify_store)
    try:
        assert storer(1, 0, b"a")
        assert entered.wait(10)  # the thread is in the first hand-off: the next ones wait in the queue
        assert storer(2, 0, b"b") and storer(3, 0, b"c")
        assert adapter.end_page_stores(timeout=0.2) is False  # the first still in flight
        adapter.reopen_page_stores()  # a new session in the same process
        assert storer(4, 0, b"d")
    finally:
        release.set()
    assert storer(5, 0, b"e")
    assert done.wait(10)  # (the queue is in order: all before it were handled)
    assert calls == [1, 4, 5] and storer._queued == 0


def _blocked_hand_off(monkeypatch):
    """A hand-off stuck in notify_store until ``release`` is set (as one waiting for a
    page a READ nobody answers holds locked); returns (thread, release, calls)."""
    import threading

    from commitfs.fuse import adapter

    monkeypatch.setattr(adapter, "_stores_open", True)
    monkeypatch.setattr(adapter, "_stores_running", 0)
    monkeypatch.setattr(adapter, "ABORTED_WAIT_S", 5.0)
    entered, release, calls = threading.Event(), threading.Event(), []

    def notify_store(inode, offset, data):
        calls.append(inode)
        entered.set()
        release.wait(20)

    monkeypatch.setattr(adapter.pyfuse3, "notify_store", notify_store)
    t = threading.Thread(target=adapter.store_pages, args=(7, 0, b"x"))
    t.start()
    assert entered.wait(10)
    return t, release, calls


def test_a_hand_off_still_running_at_unmount_is_ended_by_aborting_the_connection(monkeypatch, caplog):
    """A hand-off still in flight at the timeout: the FUSE connection is aborted (which
    ends the READ it waits for: here, the stand-in's release), then the wait goes on,
    bounded, and the session may be freed."""
    from commitfs.fuse import adapter

    t, release, calls = _blocked_hand_off(monkeypatch)
    aborted = []

    def abort():
        aborted.append(True)
        release.set()
        return None

    with caplog.at_level(logging.WARNING, logger="commitfs.fuse.adapter"):
        assert adapter.end_page_stores(timeout=0.2, abort=abort) is True
    t.join(10)
    assert aborted == [True] and calls == [7]
    assert any("FUSE connection aborted" in r.getMessage() for r in caplog.records)


def test_a_hand_off_that_outlives_the_abort_keeps_the_session_allocated(monkeypatch, caplog):
    """Where the connection cannot be aborted (not root, no fusectl), or the hand-off
    still runs after it, end_page_stores says so (False, an ERROR naming why), and the
    daemon's close then only detaches the mount: pyfuse3.close, which frees the session
    the hand-off writes to, is not called."""
    from commitfs.fuse import adapter, daemon
    from commitfs.fuse.lifecycle import DaemonConfig

    t, release, _ = _blocked_hand_off(monkeypatch)
    monkeypatch.setattr(adapter, "ABORTED_WAIT_S", 0.2)
    try:
        with caplog.at_level(logging.ERROR, logger="commitfs.fuse.adapter"):
            assert adapter.end_page_stores(timeout=0.2, abort=lambda: "cannot abort it here") is False
        assert any("cannot abort it here" in r.getMessage() and "left allocated" in r.getMessage()
                   for r in caplog.records)
        closed, detached = [], []
        monkeypatch.setattr(daemon.pyfuse3, "close", lambda unmount=True: closed.append(unmount))
        monkeypatch.setattr(daemon, "detach", detached.append)
        monkeypatch.setattr(daemon, "end_page_stores", lambda abort=None: adapter.end_page_stores(0.2, abort))
        config = DaemonConfig(repo="/nonexistent/repo", mountpoint="/nonexistent/mnt", cache_dir="/nonexistent",
                              log_file="/dev/null")
        daemon._close(config, "/nonexistent/connection")  # its abort fails: no such file
        assert closed == [] and detached == ["/nonexistent/mnt"]
        release.set()
        t.join(10)
        daemon._close(config, None)  # nothing in flight: closed as usual
        assert closed == [True]
    finally:
        release.set()
        t.join(10)

