#!/usr/bin/env python3
"""A do-nothing read-only pyfuse3 file system: the ceiling of any pyfuse3 mount.

    scripts/nullfs.py [--sizes-only] SRC_DIR LIST_FILE MOUNTPOINT

Loads the files named in LIST_FILE (paths relative to SRC_DIR, one a line)
into memory (with --sizes-only only their sizes, for listing benchmarks: reads
return zeros, and a million files start in seconds, not minutes), mounts them at MOUNTPOINT with the same directory layout and
serves lookup, getattr, opendir/readdir, open/read/release from dicts: no
storage, no hashing, no caches of its own.  Everything else pyfuse3 gets is
what commitfs's daemon gets: the same mount options (commitfs.fuse.daemon),
the same ``pyfuse3.main`` task limits and kernel read-ahead
(commitfs.fuse.lifecycle.DaemonConfig),
day-long entry and attribute timeouts, ``keep_cache`` on open, flush and
fsync left to ENOSYS, and, with commitfs's fast path (commitfs.fuse.fastpath),
the kernel opening files itself (OPEN answered ENOSYS; reads then name the
inode, which is also nullfs's file handle).  So what scripts/bench.py reads through it is what the
framework (kernel round trips, pyfuse3, trio) costs per file, and a commitfs
mount of the same files can be judged against it.

Prints ``ready`` on stdout once the mount answers ``stat``; SIGTERM or
SIGINT (or an unmount from outside) ends it, and it unmounts on the way out.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time

from commitfs.fuse import fastpath  # isort: skip  (first: it loads its C module before pyfuse3)
import pyfuse3
import trio

from commitfs.fuse.daemon import mount_options, set_read_ahead
from commitfs.fuse.lifecycle import DaemonConfig

TIMEOUT_S = 86400.0  # as commitfs's immutable views: the kernel trusts entries for a day


class NullFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, files: dict[str, bytes]):
        super().__init__()
        self.data: dict[int, bytes] = {}  # inode -> file bytes
        self.dirs: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}  # inode -> name -> inode
        self.parent: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self.listing: dict[int, list[tuple[bytes, int]]] = {}
        self.mtime_ns = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.no_open = False  # set once the fast path is engaged (main)
        next_ino = pyfuse3.ROOT_INODE + 1
        for rel, data in sorted(files.items()):
            parent = pyfuse3.ROOT_INODE
            *dirs, name = rel.split("/")
            for d in dirs:
                child = self.dirs[parent].get(d.encode())
                if child is None:
                    child = next_ino
                    next_ino += 1
                    self.dirs[parent][d.encode()] = child
                    self.dirs[child] = {}
                    self.parent[child] = parent
                parent = child
            self.dirs[parent][name.encode()] = next_ino
            self.parent[next_ino] = parent
            self.data[next_ino] = data
            next_ino += 1
        for ino, entries in self.dirs.items():
            self.listing[ino] = sorted(entries.items())

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = TIMEOUT_S
        if ino in self.dirs:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFDIR | 0o555, 2, 0
        else:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o444, 1, len(self.data[ino])
        e.st_uid, e.st_gid = self.uid, self.gid
        e.st_blksize = 128 * 1024
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.mtime_ns
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self._attr(parent_inode)
        if name == b"..":
            return self._attr(self.parent[parent_inode])
        ino = self.dirs.get(parent_inode, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def forget(self, inode_list):
        pass  # nothing is ever freed: every inode lives as long as the mount

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def opendir(self, inode, ctx=None):
        if inode not in self.dirs:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = self.listing[fh]
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx=None):
        if inode in self.dirs:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # as commitfs: the kernel opens files itself
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return self.data[fh][off:off + size]

    async def release(self, fh):
        pass

    async def statfs(self, ctx=None):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(len(d) for d in self.data.values()) // 4096
        s.f_files = len(self.data) + len(self.dirs)
        s.f_namemax = 255
        return s


async def _serve(mountpoint: str, max_tasks: int, read_ahead_kb: int) -> None:
    async def announce() -> None:
        await trio.to_thread.run_sync(os.stat, mountpoint)
        if read_ahead_kb:
            await trio.to_thread.run_sync(set_read_ahead, mountpoint, read_ahead_kb)
        print("ready", flush=True)

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        nursery.start_soon(announce)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        nursery.cancel_scope.cancel()


class _Zeros:
    """A file's size without its bytes (--sizes-only): reads return zeros."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, s: slice) -> bytes:
        return bytes(len(range(*s.indices(self.size))))


def main(argv: list[str]) -> int:
    sizes_only = argv[:1] == ["--sizes-only"]
    if sizes_only:
        argv = argv[1:]
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    src, list_file, mountpoint = argv
    with open(list_file, encoding="utf-8") as f:
        rels = [line.rstrip("\n") for line in f if line.strip()]
    files = {}
    for rel in rels:
        if sizes_only:
            files[rel] = _Zeros(os.lstat(os.path.join(src, rel)).st_size)
            continue
        with open(os.path.join(src, rel), "rb") as f:
            files[rel] = f.read()
    config = DaemonConfig(repo="", mountpoint=mountpoint, cache_dir="", log_file="")
    options = {o for o in mount_options(config) if not o.startswith(("fsname=", "subtype="))}
    options |= {"fsname=nullfs", "subtype=nullfs"}
    fs = NullFS(files)
    pyfuse3.init(fs, mountpoint, options)
    missing = fastpath.engage()
    fs.no_open = missing is None
    if missing is not None:
        print(f"nullfs: warning: no fast path ({missing}): every open() is a round trip", file=sys.stderr)
    try:
        trio.run(_serve, mountpoint, config.max_tasks, config.read_ahead_kb)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
