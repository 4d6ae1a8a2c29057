"""Mount verbs: mount, umount.

pyfuse3 and trio are imported only when a mount is served (in the daemon, or
here with --foreground), so every other command works without them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from pathlib import Path

from commitfs.cli.repo import open_repo, repo_url
from commitfs.cli.output import warn
from commitfs.errors import InputError, UsageError
from commitfs.fuse import lifecycle


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{what} must be a number of seconds, got {text!r}") from None
    if value < 0 or value != value:
        raise InputError(f"{what} must not be negative")
    return value


def cmd_mount(args) -> int:
    if args.foreground:
        return _mount(args, None)
    # The daemon starts now, importing what it serves with while this process
    # checks the command line and the repository (issue 19: mount to first ls).
    pending = lifecycle.spawn_daemon(args.mountpoint)
    try:
        return _mount(args, pending)
    except BaseException:
        pending.cancel()
        raise


def _mount(args, pending) -> int:
    # Imported here, once the daemon is on its way (cmd_mount): the repository layers.
    from commitfs.cache import DEFAULT_MAX_BYTES, parse_size
    from commitfs.ops import browse
    from commitfs.ops.root import cache_root

    url = repo_url(args)
    refresh = _positive(args.refresh, "--refresh")
    io_timeout = _positive(args.io_timeout, "--io-timeout")
    if io_timeout == 0:
        raise InputError("--io-timeout must be positive")
    cache_size = parse_size(args.cache_size) if args.cache_size else DEFAULT_MAX_BYTES
    cache_dir = Path(args.cache_dir).expanduser().absolute() if args.cache_dir else cache_root()
    mountpoint = lifecycle.validate_mountpoint(args.mountpoint)
    rev, path = browse.split_rev_path(args.rev) if args.rev else (None, "")
    tree = None
    # Check the repository and the revision here, for a clear error before any daemon starts.
    with open_repo(args) as repo:
        if path and args.writable:
            raise UsageError("--writable mounts a whole branch; REV:PATH is for read-only mounts")
        if args.writable:
            if not args.rev:
                raise UsageError("--writable needs a BRANCH (commitfs mount BRANCH MOUNTPOINT --writable)")
            if repo.refs.lookup_branch(args.rev) is None:
                raise InputError(f"--writable needs a branch name; {args.rev!r} is not a branch")
        elif args.workspace:
            raise UsageError("--workspace goes with --writable")
        if args.record_reads and args.writable:
            raise UsageError("--record-reads is for read-only mounts")
        commit = repo.resolve(rev) if rev else None
        if path:
            entry = browse.lookup_path(repo, commit, path)
            if not entry.is_dir:
                raise InputError(f"{args.rev} is a file; mount REV:PATH needs a directory")
            tree = entry.id.hex()
        url = repo.url
    workspace = None
    if args.writable:
        if args.workspace:
            workspace = str(Path(args.workspace).expanduser().absolute())
        else:
            key = hashlib.sha256("\0".join([url, args.rev, mountpoint]).encode(errors="surrogateescape"))
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", args.rev)[-40:]
            workspace = str(cache_dir / "workspaces" / f"{safe}-{key.hexdigest()[:16]}")
    if args.log_file:
        log_file = str(Path(args.log_file).expanduser().absolute())
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = re.sub(r"[^A-Za-z0-9._-]+", "_", mountpoint.strip("/"))[-60:] or "root"
        log_file = str(cache_dir / "logs" / f"mount-{tag}-{stamp}-{os.getpid()}.log")
    config = lifecycle.DaemonConfig(
        repo=url, mountpoint=mountpoint, cache_dir=str(cache_dir), log_file=log_file,
        endpoint_url=args.endpoint_url, commit=commit.hex() if commit else None, rev=rev,
        cache_size=cache_size, refresh_s=refresh, io_timeout_s=io_timeout, allow_other=args.allow_other,
        writable=args.writable, workspace=workspace, path=path, tree=tree, disk_cache=not args.no_disk_cache,
        record_reads=str(Path(args.record_reads).expanduser().absolute()) if args.record_reads else None,
    )
    if pending is None:
        from commitfs.fuse.daemon import run_foreground

        return run_foreground(config)
    pending.start(config)
    record = lifecycle.lookup_record(mountpoint)
    if record is not None and record.get("fast_open") is False:
        warn(lifecycle.slow_open(record.get("fast_path_missing") or "see its log"))
    return 0


def cmd_umount(args) -> int:
    lifecycle.unmount(args.mountpoint, lazy=args.lazy)
    return 0


def register(sub, common) -> None:
    p = sub.add_parser(
        "mount", parents=[common], help="mount the repository (or one revision) read-only, or a branch writable",
        description="Mount read-only.  Without REV the root holds branches/NAME/, tags/NAME/ and "
                    "commits/ID/ (any unique id prefix resolves); with REV it is that revision's tree.  "
                    "Returns once the mount is live; the daemon logs under the cache directory.")
    p.set_defaults(handler=cmd_mount)
    p.add_argument("rev", nargs="?", metavar="REV[:PATH]",
                   help="a branch, tag or commit id (pinned at mount time); REV:PATH shows that directory "
                        "of the revision at the root")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where chunks of non-local repositories are cached (DIR/chunks) and logs "
                        "written (DIR/logs); default: $XDG_CACHE_HOME/commitfs or ~/.cache/commitfs")
    p.add_argument("--cache-size", metavar="SIZE", help="cap of the chunk cache, e.g. 20G (default: 10G)")
    p.add_argument("--no-disk-cache", action="store_true",
                   help="keep chunks of an S3 repository in memory only: nothing is written under "
                        "the cache directory but the log (--log-file elsewhere to avoid that too)")
    p.add_argument("--refresh", default="5", metavar="SECONDS",
                   help="branch views follow their branch within this many seconds (default: 5)")
    p.add_argument("--io-timeout", default="60", metavar="SECONDS",
                   help="a read that storage does not answer within this long fails with EIO (default: 60)")
    p.add_argument("--log-file", metavar="PATH", help="the daemon's log (default: under the cache directory)")
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("-w", "--writable", action="store_true",
                   help="a writable workspace over the branch REV: edits go to a local overlay; "
                        "see commitfs status/reset/commit MOUNTPOINT")
    p.add_argument("--record-reads", metavar="FILE",
                   help="append each file read (its content id and path) to FILE, once per first read "
                        "of the file; '#end' closes it at unmount (used by `commitfs run --record-reads`)")
    p.add_argument("--workspace", metavar="DIR",
                   help="with --writable: where the overlay lives (default: DIR/workspaces/ of the cache "
                        "directory, one per repository, branch and mountpoint); mounting it again resumes it")

    p = sub.add_parser("umount", parents=[common], help="unmount a commitfs mount (also a stale one)",
                       description="Unmount.  Fails if files in the mount are open, unless --lazy.")
    p.set_defaults(handler=cmd_umount)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-l", "--lazy", action="store_true",
                   help="detach now; the mount goes away when its last open file is closed")
