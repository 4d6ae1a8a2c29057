"""Random reads of a large file: a random read's neighbouring chunks are read,
verified and handed to the kernel's page cache off the event loop
(vfs/core.py, FileSystem._publish_around; fuse/adapter.py, PageStorer.later),
so a random reader's later reads near earlier ones make no request."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import trio

from core_fixtures import write_file
from mount_fixtures import fs_of, run_commitfs
from test_vfs import lookup_path_ino
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.pack import pack_key
from commitfs.repo.repository import Repository
from commitfs.vfs import core

pytestmark = pytest.mark.timeout(120)

SIZE = 8 * 1024 * 1024


def _committed_weights(tmp_path, seed: int, size: int = SIZE) -> tuple[str, bytes, bytes]:
    """A repository with one random ``weights.bin`` of ``size`` bytes: (url, commit id, its bytes)."""
    data = random.Random(seed).randbytes(size)
    write_file(tmp_path / "src" / "weights.bin", data)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit = commit_directory(repo, tmp_path / "src", message="m").commit_id
    return url, commit, data


def _starts(manifest) -> list[int]:
    """Every chunk's file offset, and the file's size last."""
    out = [0]
    for s in manifest.chunk_sizes:
        out.append(out[-1] + s)
    return out


def test_a_random_read_publishes_its_verified_neighbours_once(tmp_path, cache_home):
    """A read away from any stream publishes its own chunk (page_store) and hands
    the page-store thread a job (page_store_later) that yields, verified, the
    chunks within PUBLISH_AROUND_BYTES on each side; a second random read nearby
    queues only chunks not queued before (each run reaching one chunk into its
    published neighbours, for the page across the boundary); and a neighbour
    whose stored bytes are corrupt is not published at all (the read of it then
    fails as any other)."""
    url, commit, data = _committed_weights(tmp_path, 61)
    stored: list[tuple[int, int, bytes]] = []  # page_store's hand-offs
    jobs: list[list[tuple[int, bytes]]] = []  # what each job yielded
    queued: list[int] = []  # each job's announced bytes

    def later(ino, job, nbytes):
        queued.append(nbytes)
        jobs.append([(off, bytes(got)) for off, got in job()])  # run at once, as the thread would
        return True

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                fs.page_store = lambda ino, off, got: stored.append((ino, off, bytes(got)))
                fs.page_store_later = later
                ino = await lookup_path_ino(fs, "weights.bin")
                manifest = await fs.loader.manifest(fs._node(ino).entry.id)
                starts = _starts(manifest)
                k = len(starts) // 2
                off = starts[k] + 100
                assert await fs.read_inode(ino, off, 4096) == data[off:off + 4096]
                first_jobs = list(jobs)
                # A second seek, some chunks on: its window overlaps the first's.
                k2 = next(i for i in range(k, len(starts) - 1)
                          if starts[i] - starts[k] > core.PUBLISH_AROUND_BYTES // 2)
                off2 = starts[k2] + 50
                assert await fs.read_inode(ino, off2, 4096) == data[off2:off2 + 4096]
                return starts, k, k2, first_jobs
    starts, k, k2, first_jobs = trio.run(main)
    assert [off for _, off, _ in stored] == [starts[k], starts[k2]]
    assert len(first_jobs) == 1
    spans = first_jobs[0]
    for off, got in spans:  # verified bytes at their file offsets
        assert got == data[off:off + len(got)]
    covered = sorted((off, off + len(got)) for off, got in spans)
    # The first job: from the chunk PUBLISH_AROUND_BYTES before chunk k to the one as far after it
    # (its two runs each reach one chunk into chunk k, published by the read).
    lo = max(i for i in range(k + 1) if starts[k] - starts[i] >= core.PUBLISH_AROUND_BYTES)
    hi = min(i for i in range(k + 1, len(starts)) if starts[i] - starts[k + 1] >= core.PUBLISH_AROUND_BYTES)
    assert covered[0][0] == starts[lo] and covered[-1][1] == starts[hi], (covered, starts[lo], starts[hi])
    assert all(a[1] >= b[0] for a, b in zip(covered, covered[1:]))  # no hole: chunk k is inside a span
    # The second job covers only what the first did not, from one chunk of overlap on.
    assert len(jobs) == 2
    (second_span,) = jobs[1][:1]
    assert second_span[0] == starts[hi - 1]
    assert queued[1] < queued[0]


def test_a_corrupt_neighbour_is_not_published(tmp_path, cache_home):
    """The page-store thread's job verifies what it publishes: a neighbouring
    chunk whose bytes in the pack were altered makes its span publish nothing,
    and a read of it fails (CorruptObjectError: EIO through FUSE), never wrong bytes."""
    from commitfs.errors import CorruptObjectError

    url, commit, data = _committed_weights(tmp_path, 62)
    jobs: list[list[tuple[int, bytes]]] = []

    def later(ino, job, nbytes):
        jobs.append([(off, bytes(got)) for off, got in job()])
        return True

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                fs.page_store = lambda ino, off, got: None
                fs.page_store_later = later
                ino = await lookup_path_ino(fs, "weights.bin")
                manifest = await fs.loader.manifest(fs._node(ino).entry.id)
                starts = _starts(manifest)
                k = len(starts) // 2
                # Flip a byte of chunk k + 2 in its pack file.
                loc = repo.reads.locate(manifest.chunk_ids[k + 2])
                path = repo.store.local_path(pack_key(loc.pack))
                with open(path, "r+b") as f:
                    f.seek(loc.offset + loc.stored // 2)
                    b = f.read(1)
                    f.seek(-1, os.SEEK_CUR)
                    f.write(bytes([b[0] ^ 1]))
                off = starts[k] + 100
                assert await fs.read_inode(ino, off, 4096) == data[off:off + 4096]
                bad = starts[k + 2] + 10
                with pytest.raises(CorruptObjectError):
                    await fs.read_inode(ino, bad, 4096)
                return starts, k
    starts, k = trio.run(main)
    assert jobs
    for off, got in jobs[0]:
        assert got == data[off:off + len(got)]
        assert not off <= starts[k + 2] < off + len(got), "a span holding the corrupt chunk was published"


# --- through a real mount ----------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
PAGE = mmap.PAGESIZE


def _resident(path, start: int, end: int) -> bool:
    """Whether the page cache holds every page wholly inside [start, end) of ``path``
    (mincore of a mapping: reads nothing, so asks the daemon nothing)."""
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    assert last > first
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, last - first, mmap.PROT_READ, mmap.MAP_SHARED, fd, first)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((last - first) // PAGE)
            assert _libc.mincore(addr, last - first, vec) == 0, os.strerror(ctypes.get_errno())
            return all(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, last - first)
    finally:
        os.close(fd)


def test_after_a_random_read_a_neighbouring_chunk_is_read_without_the_daemon(tmp_path, cache_home, mounts):
    """One 4 KiB read in the middle of a large file through a mount: a chunk
    several hundred KiB further on (beyond the kernel's own read-ahead and the
    read's own chunk) comes into the page cache, verified, without being read;
    with the daemon stopped (SIGSTOP), reads in it then return the right bytes
    at once: they never reach the daemon."""
    url, commit, data = _committed_weights(tmp_path, 63)
    with Repository.open(url) as repo:
        tree = repo.load_tree(repo.load_commit(commit).tree)
        starts = _starts(repo.load_manifest(tree.get("weights.bin").id))
    k = len(starts) // 2
    # A chunk starting 300 KiB to 900 KiB past chunk k's end (within PUBLISH_AROUND_BYTES).
    j = next(i for i in range(k + 1, len(starts) - 1)
             if starts[i] - starts[k + 1] > 300 * 1024 and starts[i + 1] - starts[k + 1] < 900 * 1024)
    mnt = mounts.mountpoint()
    mounts.mount(url, mnt, rev="main")
    path = mnt / "weights.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        off = starts[k] + 100
        assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)
    deadline = time.monotonic() + 30  # a bound on a wait for a condition, not a sleep-as-sync
    while not _resident(path, starts[j], starts[j + 1]):
        assert time.monotonic() < deadline, "the neighbouring chunk never came into the page cache"
        time.sleep(0.01)
    from commitfs.fuse.lifecycle import lookup_daemon_pid
    pid = lookup_daemon_pid(mnt)
    at = starts[j] + (starts[j + 1] - starts[j]) // 2 - 2048
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import os,sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "sys.stdout.buffer.write(os.pread(fd, 4096, int(sys.argv[2])))", str(path), str(at)],
            capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a read of the published neighbour waited for the daemon")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 0 and proc.stdout == data[at:at + 4096]
    assert run_commitfs("umount", str(mnt)).returncode == 0


def test_page_store_jobs_run_in_its_thread_in_order_and_yield_to_hand_offs(monkeypatch):
    """PageStorer.later: a job runs in the page-store thread, in queue order with
    the plain hand-offs, and what it yields is stored; it is queued only while
    the queue holds less than PAGE_STORE_JOB_SHARE of its bound, where a plain
    hand-off still fits; and end_page_stores waits for a job that is running."""
    import threading

    from commitfs.fuse import adapter

    monkeypatch.setattr(adapter, "_stores_open", True)
    monkeypatch.setattr(adapter, "_stores_running", 0)
    monkeypatch.setattr(adapter, "_session", 0)
    storer = adapter.PageStorer(max_bytes=1000)
    entered, release, done, calls = threading.Event(), threading.Event(), threading.Event(), []
    threads = set()

    def notify_store(inode, offset, data):
        calls.append((inode, offset, bytes(data)))
        threads.add(threading.current_thread().name)
        if inode == 1:
            entered.set()
            release.wait(20)
        if inode == 9:
            done.set()

    def job():
        yield 0, b"j0"
        yield 4096, b"j1"

    monkeypatch.setattr(adapter.pyfuse3, "notify_store", notify_store)
    try:
        assert storer(1, 0, b"a" * 100)
        assert entered.wait(10)  # the thread holds the first: the rest wait in the queue
        assert storer.later(2, job, 300)
        assert not storer.later(3, job, 200)  # 600 queued would pass half the bound
        assert storer(4, 0, b"d" * 400)  # a hand-off still fits
        assert not storer(5, 0, b"e" * 201)  # past the whole bound (800 queued)
    finally:
        release.set()
    assert storer(9, 0, b"z")
    assert done.wait(10)
    assert calls == [(1, 0, b"a" * 100), (2, 0, b"j0"), (2, 4096, b"j1"), (4, 0, b"d" * 400), (9, 0, b"z")]
    assert threads == {"commitfs-page-store"} and storer._queued == 0 and storer.dropped == 2

    # A job in flight holds up end_page_stores (bounded), as a hand-off does.
    entered.clear()
    gate = threading.Event()

    def slow_job():
        entered.set()
        gate.wait(20)
        yield 0, b"late"

    assert storer.later(6, slow_job, 10)
    assert entered.wait(10)
    assert adapter.end_page_stores(timeout=0.2) is False
    gate.set()
    assert adapter.end_page_stores(timeout=10) is True
    assert (6, 0, b"late") not in calls  # the door closed while it ran: nothing stored after
