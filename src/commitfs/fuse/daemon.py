"""The mount daemon: one process serving one mountpoint until it is unmounted.

Start-up, in order: open the repository (with the chunk cache unless it is a
local directory, which is read in place), load the root commit if one was
asked for, mount (pyfuse3.init), start the trio loop, and once ``stat`` of the
mountpoint answers, record the daemon (lifecycle.write_record) and report
``ok``.  Any failure before that is reported as ``error: MESSAGE`` (one line)
and the daemon exits 1; the mount, if it was made, is removed again.

Running: pyfuse3.main with up to ``max_tasks`` request tasks, so slow reads
(a chunk fetch from S3) do not hold up other requests; the file system's own
nursery holds read-ahead fetches.  SIGTERM, SIGINT and SIGHUP end the loop;
the mount is then detached.  When the mount is unmounted from outside
(``commitfs umount``, fusermount3 -u) the loop ends by itself.  Either way the
daemon unmounts (if still mounted), closes the repository and removes its
record.

Run as ``python -m commitfs.fuse.daemon [--ready-fd N] CONFIG_JSON``
(lifecycle.start_daemon does), or in-process by ``commitfs mount --foreground``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable

from commitfs.fuse import fastpath  # isort: skip  (first: it loads its C module before pyfuse3)
import pyfuse3
import trio

from commitfs.cache import DiskChunkCache
from commitfs.errors import CommitfsError, MountError
from commitfs.fuse.adapter import (
    Operations,
    WorkspaceOperations,
    end_page_stores,
    page_storer,
    reopen_page_stores,
)
from commitfs.fuse.lifecycle import (
    DaemonConfig,
    abort_connection,
    control_socket_path,
    detach,
    fuse_connection,
    remove_record,
    slow_open,
    write_record,
)
from commitfs.ops.root import open_repository
from commitfs.vfs import FileSystem, VfsOptions
from commitfs.vfs.inode import PREFERRED_IO_SIZE, XATTR_PREFIX

log = logging.getLogger("commitfs.mount")

Report = Callable[[str], None]


def set_read_ahead(mountpoint: str, kib: int) -> str | None:
    """Set the kernel's read-ahead of a live FUSE mount (its backing device's
    ``read_ahead_kb``); None if done, else why not (needs root).

    The kernel gives a FUSE mount 128 KiB, so a sequential reader of a large
    file sends 128 KiB requests, one round trip to the daemon each, and a
    150 KB image takes two.  With 1 MiB, the most one FUSE request carries
    (libfuse's max_pages), a first read of a large file runs about twice as
    fast and most images take one request."""
    st = os.stat(mountpoint)
    knob = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        return f"{knob}: {exc.strerror}"
    return None


def mount_options(config: DaemonConfig) -> set[str]:
    # ro: the kernel itself refuses writes with EROFS before asking us;
    # default_permissions: the kernel checks modes, we never see access().
    opts = {"fsname=commitfs", "subtype=commitfs", "default_permissions", "noatime"}
    if not config.writable:
        opts.add("ro")
    if config.allow_other:
        opts.add("allow_other")
    return opts


def _open(config: DaemonConfig):
    repo = open_repository(config.repo, cache_dir=config.cache_dir if config.disk_cache else False,
                           cache_size=config.cache_size, endpoint_url=config.endpoint_url)
    try:
        cache = repo.chunk_cache
        if isinstance(cache, DiskChunkCache):
            log.info("chunk cache %s, capped at %d bytes", cache.path, cache.max_bytes)
            cache.write_behind()  # a read does not wait for its chunks' files (cache/disk.py)
        elif repo.is_local:
            log.info("repository %s is local: read in place, no chunk cache", repo.url)
        else:
            log.info("no disk cache (--no-disk-cache): chunks of %s are kept in memory only", repo.url)
        if config.writable:
            from commitfs.fuse import control
            from commitfs.vfs.workspace import WorkspaceOptions

            options = WorkspaceOptions(io_timeout_s=config.io_timeout_s, io_threads=config.io_threads)
            fs = control.open_workspace(repo, config.workspace, config.rev, options)
            log.info("workspace %s over branch %s at %s", config.workspace, config.rev, fs.base.hex())
            return repo, fs
        commit = bytes.fromhex(config.commit) if config.commit else None
        if commit is not None:
            repo.load_commit(commit)  # fail now, not at the first ls
        options = VfsOptions(refresh_s=config.refresh_s, io_timeout_s=config.io_timeout_s,
                             io_threads=config.io_threads, record_reads=config.record_reads)
        tree = bytes.fromhex(config.tree) if config.tree else None
        if tree is not None:
            repo.load_tree(tree)
            log.info("root: %s of the commit (tree %s)", config.path, config.tree)
        return repo, FileSystem(repo, commit, options, root_tree=tree)
    except BaseException:
        repo.close()
        raise


def serve(config: DaemonConfig, report: Report) -> int:
    """Mount, serve until unmounted; ``report`` gets 'ok' or 'error: ...' once."""
    log.info("starting: %s %s at %s (pid %d)", config.repo, config.rev or "(all refs)", config.mountpoint,
             os.getpid())
    try:
        repo, fs = _open(config)
    except CommitfsError as exc:
        report(f"error: {exc}")
        return 1
    try:
        try:
            reopen_page_stores()  # a process may serve one mount after another (--foreground in tests)
            ops = WorkspaceOperations(fs) if config.writable else Operations(fs)
            pyfuse3.init(ops, config.mountpoint, mount_options(config))
        except RuntimeError as exc:
            if config.writable:
                fs.shutdown()
            report(f"error: cannot mount at {config.mountpoint} ({exc}; see {config.log_file})")
            return 1
        # Read-only: the kernel opens files itself once the fast path is on (before the
        # first request: pyfuse3.main has not started).
        missing = None
        if config.writable:
            unwritten = fastpath.engage_writes(fs.write_fd, fs.wrote)  # WRITEs pwritten in C
            if unwritten is not None:
                log.warning("every WRITE goes through pyfuse3's coroutine (%s)", unwritten)
        if not config.writable:
            missing = fastpath.engage() if config.no_open else "no_open is off in the daemon's configuration"
            ops.no_open = missing is None
            if missing is not None and config.no_open:
                log.warning(slow_open(missing))
            log.info("files are opened by %s", "the kernel alone" if ops.no_open else "the daemon")
            # The kernel's cache of commit directories' listings, and adaptive readdirplus if
            # asked for (fuse/fastpath.py), both settled at the kernel's INIT, in pyfuse3.main.
            adaptive = fastpath.adaptive_asked()
            unlisted = (fastpath.engage_listings(adaptive) if config.no_open
                        else "no_open is off in the daemon's configuration")
            ops.cache_listings = unlisted is None
            ops.adaptive_listings = unlisted is None and adaptive
            if unlisted is None:
                log.info("directory listings: commit directories cached by the kernel, %s",
                         "adaptive readdirplus" if adaptive else "READDIRPLUS only")
            else:
                log.warning("directory listings are READDIRPLUS only and never cached by the kernel (%s)", unlisted)
            # GETXATTRs of the names a commit mount never has (ls(1)'s security.selinux, ACLs)
            # are answered in C.
            unanswered = (fastpath.engage_xattrs(XATTR_PREFIX.encode()) if config.no_open
                          else "no_open is off in the daemon's configuration")
            if unanswered is not None:
                log.warning("every GETXATTR is answered by the file system (%s)", unanswered)
            # LOOKUPs of listed (or looked-up) commit directories' files are answered in C.
            looked = (fastpath.engage_lookups(ops.uid, ops.gid, PREFERRED_IO_SIZE) if config.no_open
                      else "no_open is off in the daemon's configuration")
            if isinstance(looked, str):
                log.warning("every LOOKUP is answered by the file system (%s)", looked)
            else:
                fs.external_lookups = looked
            # READs answered from memory are answered as the C module reads them.
            unread = fastpath.engage_reads(fs.read_now) if ops.no_open else "the kernel does not open files itself"
            if unread is None:
                fs.on_tasks = fastpath.yield_loop
                maps = fastpath.engage_chunk_maps()  # random small READs of large files, in C
                if isinstance(maps, str):
                    log.warning("random READs of large files go through Python (%s)", maps)
                else:
                    fs.chunk_maps = maps
            else:
                log.warning("every READ goes through pyfuse3's coroutine (%s)", unread)
        connection = fuse_connection(config.mountpoint)
        try:
            trio.run(_main, fs, config, report, missing)
        finally:
            _close(config, connection)
            fastpath.disengage()
            remove_record(config.mountpoint)
        log.info("unmounted %s; repository loads: %d from memory on the event loop, %d in worker threads; "
                 "chunks found in flight and waited for: %d",
                 config.mountpoint, fs.loader.inline, fs.loader.in_threads, fs.loader.chunks_joined)
        if config.writable:
            log.info("WRITEs pwritten in C: %d", fastpath.writes_in_c())
        if not config.writable:
            log.info("OPEN requests: %d", ops.opens)
            log.info("READs by inode (fast path): %d", fastpath.reads_by_inode())
            offered, answered_reads, refused = fastpath.read_counts()
            log.info("READs answered from memory as read (C): %d of %d offered; refused for an error: %d",
                     answered_reads, offered, refused)
            log.info("READs answered from chunk maps (C): %d; not answerable there: %d", *fastpath.map_counts())
            log.info("READDIR requests: %d (plain: %d); OPENDIRs answered cacheable: %d",
                     ops.readdirs, ops.plain_readdirs, fastpath.listing_counts()[1])
            log.info("GETXATTR requests: %d answered ENODATA in C, %d by the file system",
                     fastpath.xattrs_refused(), ops.getxattrs)
            answered, early, waited, _, _ = fastpath.lookup_counts()
            log.info("LOOKUPs answered in C: %d (%d before pyfuse3's loop, %d of them without its wait); "
                     "references lost: %d", answered, early, waited, getattr(fs.table, "external_lost", 0))
            log.info("page-cache hand-offs dropped (queue full): %d", page_storer.dropped)
        cache = repo.chunk_cache
        if isinstance(cache, DiskChunkCache):
            cache.close()  # the chunks still pending are written
            # Every counter (memory_hits, listed_misses, put_failures too), as name=value.
            log.info("chunk cache: %s", " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cache.stats).items()))
        return 0
    finally:
        if isinstance(repo.chunk_cache, DiskChunkCache):
            repo.chunk_cache.close()
        repo.close()


def _close(config: DaemonConfig, connection: str | None) -> None:
    """Unmount and free the FUSE session, once no page-cache hand-off can touch it.
    A stop by signal ended them while requests were still answered (_on_signals);
    one that still runs 5 s into the unmount waits for a READ nobody answers any
    more, so the connection is aborted (that READ fails, the hand-off ends); if
    it still runs, the session is left allocated (the process is ending) and the
    mount only detached, never freed under it (adapter.py, end_page_stores)."""
    if end_page_stores(abort=functools.partial(abort_connection, connection)):
        pyfuse3.close(unmount=True)
    else:
        detach(config.mountpoint)


async def _main(fs, config: DaemonConfig, report: Report, fast_path_missing: str | None) -> None:
    async with fs.running():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals)
            # What `commitfs mounts` lists (lifecycle.list_mounts).
            extra = {"repo": config.repo, "rev": config.rev, "commit": config.commit, "path": config.path,
                     "writable": config.writable,
                     # False: a read-only mount answering every open (no fast path): slow.
                     "fast_open": config.writable or not config.no_open or fast_path_missing is None,
                     "fast_path_missing": None if config.writable or not config.no_open else fast_path_missing,
                     "cache": None if not config.disk_cache or fs.repo.is_local else config.cache_dir,
                     "cache_size": config.cache_size}
            if config.writable:
                from commitfs.fuse import control

                sock = control_socket_path(config.mountpoint)
                await nursery.start(control.serve, fs, sock)
                extra.update({"control": sock, "workspace": config.workspace, "branch": config.rev})
            nursery.start_soon(_announce, config, report, extra)
            await pyfuse3.main(min_tasks=1, max_tasks=config.max_tasks)
            nursery.cancel_scope.cancel()


async def _announce(config: DaemonConfig, report: Report, extra: dict) -> None:
    """Report ready once the kernel has finished the handshake and a stat is answered."""
    try:
        await trio.to_thread.run_sync(os.stat, config.mountpoint, abandon_on_cancel=True)
    except OSError as exc:
        report(f"error: the mount at {config.mountpoint} does not answer: {exc.strerror}")
        pyfuse3.terminate()
        return
    if config.read_ahead_kb:
        why_not = await trio.to_thread.run_sync(set_read_ahead, config.mountpoint, config.read_ahead_kb,
                                                abandon_on_cancel=True)
        if why_not:
            log.info("read-ahead left at the kernel's default (%s)", why_not)
        else:
            log.info("read-ahead %d KiB", config.read_ahead_kb)
    granted = fastpath.granted_capabilities()  # the INIT is done: the stat was answered
    if granted is not None:
        log.info("FUSE capabilities granted: 0x%x", granted)
    # (In a thread: it writes the record and reads the others, to remove dead daemons'.)
    await trio.to_thread.run_sync(functools.partial(write_record, config.mountpoint, config.log_file, **extra))
    log.info("ready")
    report("ok")


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: stopping", signal.Signals(signum).name)
            # The page-cache hand-offs end first, while requests are still answered: one
            # may wait for a READ of a page it stores (adapter.py, end_page_stores).
            await trio.to_thread.run_sync(end_page_stores, abandon_on_cancel=True)
            pyfuse3.terminate()
            return


def run_foreground(config: DaemonConfig) -> int:
    """``commitfs mount --foreground``: serve in this process, log to stderr."""
    _setup_logging()
    failure: list[str] = []

    def report(message: str) -> None:
        if message.startswith("error: "):
            failure.append(message[len("error: "):])

    code = serve(config, report)
    if failure:
        raise MountError(failure[0])
    return code


def _read_all(fd: int) -> str:
    parts = []
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(65536):
            parts.append(chunk)
    return b"".join(parts).decode()


def _log_to(path: str) -> None:
    """Send stdout and stderr to the mount's log (as lifecycle.start_daemon once did)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="commitfs.fuse.daemon")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--config-fd", type=int,
                        help="read CONFIG_JSON from this descriptor (lifecycle.spawn_daemon: the daemon is "
                             "started before its configuration is known); none: exit")
    parser.add_argument("--mountpoint", help="(with --config-fd) the mount it is for, for ps; the config decides")
    parser.add_argument("config", nargs="?")
    args = parser.parse_args(argv)
    if args.config_fd is not None:
        text = _read_all(args.config_fd)
        if not text:
            return 0  # the caller gave up on the mount (PendingDaemon.cancel)
        config = DaemonConfig.from_json(text)
        _log_to(config.log_file)
    elif args.config is not None:
        config = DaemonConfig.from_json(args.config)
    else:
        parser.error("CONFIG_JSON or --config-fd is required")
    _setup_logging()
    os.chdir("/")  # hold no directory of the caller busy

    reported = False

    def report(message: str) -> None:
        nonlocal reported
        if reported or args.ready_fd is None:
            return
        reported = True
        try:
            os.write(args.ready_fd, message.replace("\n", " ").encode() + b"\n")
            os.close(args.ready_fd)
        except OSError:
            pass  # the caller is gone; carry on serving

    try:
        return serve(config, report)
    except BaseException as exc:
        log.exception("daemon failed")
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # trio's nurseries wrap
            exc = exc.exceptions[0]
        report(f"error: the mount daemon failed: {exc} (see {config.log_file})")
        return 1


if __name__ == "__main__":
    sys.exit(main())
