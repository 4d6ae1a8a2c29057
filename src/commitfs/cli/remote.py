"""Sync verbs: clone, remote add|remove|list, push, pull.

A REMOTE argument is a remote's name (``origin``) or directly a repository
URL (a path or ``s3://BUCKET/PREFIX``).  A remote added with ``--endpoint-url``
remembers that endpoint; otherwise the global ``--endpoint-url`` (or the AWS
configuration) applies to every S3 repository the command opens.
"""

from __future__ import annotations

import argparse
import os
import sys

from commitfs.cli.core import open_repo, open_url, store_options
from commitfs.cli.output import ProgressBar, human_size, print_json
from commitfs.errors import ConflictError, UsageError
from commitfs.ops import sync
from commitfs.repo.remotes import DEFAULT_REMOTE, Remotes, normalize_url
from commitfs.repo.repository import Repository


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith(("/", ".", "~")) or os.sep in spec


def _open_remote(args, local: Repository, spec: str) -> tuple[str, Repository]:
    """(display name, repository) for a remote name or URL."""
    if _is_url(spec):
        return spec, open_url(args, normalize_url(spec))
    remote = Remotes(local.store).get(spec)
    return spec, open_url(args, remote.url, remote.endpoint_url)


class _Progress:
    """Progress callback for ops.sync: a count while scanning, then a bar."""

    def __init__(self, label: str):
        self.label = label
        self.scan = ProgressBar(f"{label}: scanning", unit="objects")
        self.send: ProgressBar | None = None

    def __call__(self, p: sync.SyncProgress) -> None:
        if p.phase == "scan":
            self.scan.count(p.objects_done)
            return
        if self.send is None:
            self.scan.close()
            self.send = ProgressBar(self.label, unit="objects")
        self.send.update(p.bytes_done, p.bytes_total, p.objects_done, p.objects_total)

    def close(self) -> None:
        self.scan.close()
        if self.send is not None:
            self.send.close()


def _run(label: str, fn):
    progress = _Progress(label)
    try:
        return fn(progress)
    finally:
        progress.close()


def _summary(stats: sync.SyncStats, moved: str = "sent") -> str:
    """``moved``: "sent" (push) or "received" (clone, pull): the bytes come here."""
    if not stats.objects:
        return "nothing to send" if moved == "sent" else "nothing to fetch"
    return (f"{moved} {stats.objects} objects ({stats.commits} commits, {stats.trees} trees, "
            f"{stats.manifests} files, {stats.chunks} chunks), {human_size(stats.bytes_sent)} in "
            f"{stats.packs} packs")


def _report(args, verb: str, where: str, result: sync.SyncResult) -> None:
    if args.json:
        print_json(result.to_json())
        return
    for u in result.updates:
        old = u.old.hex()[:12] if u.old else "(none)"
        if u.status == "diverged":
            print(f"{u.kind} {u.name}: diverged ({old} here, {u.new.hex()[:12]} there, different logs): "
                  "left as it is; compare `commitfs alias log`")
        elif u.status in ("up-to-date", "ahead"):
            what = "up to date" if u.status == "up-to-date" else "already contains it (nothing to pull)"
            print(f"{u.kind} {u.name}: {what} at {old}")
        else:
            print(f"{u.kind} {u.name}: {old} -> {u.new.hex()[:12]} ({u.status})")
    moved = "sent" if verb.startswith("pushed") else "received"
    print(f"{verb} {where}: {_summary(result.stats, moved)}", file=sys.stderr)


# --- verbs ------------------------------------------------------------------------
def cmd_clone(args) -> int:
    url = normalize_url(args.url)
    dest = normalize_url(args.dir)
    source = open_url(args, url)
    # New, or an interrupted clone of the same source (killed at any point): resumed.
    local = sync.open_clone_destination(dest, url, args.endpoint_url, shown=args.dir, **store_options(args))
    result = _run("clone", lambda progress: sync.clone(local, source, threads=args.jobs, progress=progress))
    _report(args, "cloned", f"{args.url} into {args.dir}", result)
    return 0


def cmd_remote(args) -> int:
    local = open_repo(args)
    remotes = Remotes(local.store)
    if args.action == "add":
        if not args.name or not args.url:
            raise UsageError("remote add needs NAME and URL")
        remote = remotes.add(args.name, args.url, args.endpoint_url)
        print(f"added remote {remote.name} -> {remote.url}")
    elif args.action == "remove":
        if not args.name or args.url:
            raise UsageError("remote remove needs NAME only")
        remote = remotes.remove(args.name)
        print(f"removed remote {remote.name} (was {remote.url})")
    else:
        if args.name:
            raise UsageError("remote list takes no arguments")
        items = remotes.list()
        if args.json:
            print_json({r.name: {"url": r.url, "endpoint_url": r.endpoint_url} for r in items})
        else:
            for r in items:
                print(f"{r.name} {r.url}" + (f" (endpoint {r.endpoint_url})" if r.endpoint_url else ""))
    return 0


def cmd_push(args) -> int:
    local = open_repo(args)
    name, remote = _open_remote(args, local, args.remote)
    result = _run("push", lambda progress: sync.push(
        local, remote, args.branch, remote_branch=args.to, force=args.force, tags=args.tags, threads=args.jobs,
        progress=progress))
    _report(args, "pushed to", name, result)
    return 0


def cmd_pull(args) -> int:
    local = open_repo(args)
    name, remote = _open_remote(args, local, args.remote)
    if args.merge and args.force:
        raise UsageError("pull takes --merge or --force, not both")
    try:
        result = _run("pull", lambda progress: sync.pull(
            local, remote, args.branch, local_branch=args.to, force=args.force, threads=args.jobs,
            progress=progress, merge=args.merge))
    except ConflictError as exc:
        from commitfs.cli.merge import conflict_lines

        for c in exc.conflicts:
            for line in conflict_lines(c):
                print(line)
        raise
    _report(args, "pulled from", name, result)
    return 0


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 256, got {text!r}")
    return n


def register(sub, common) -> None:
    def add(name, handler, help_, **kw):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_, **kw)
        p.set_defaults(handler=handler)
        return p

    def transfer_options(p) -> None:
        p.add_argument("-j", "--jobs", type=_jobs, default=sync.DEFAULT_THREADS, metavar="N",
                       help=f"parallel reads (default {sync.DEFAULT_THREADS})")
        p.add_argument("--json", action="store_true")

    p = add("clone", cmd_clone, "copy a repository (every branch and tag) into DIR, with remote origin = URL")
    p.add_argument("url", metavar="URL")
    p.add_argument("dir", metavar="DIR", help="a new local directory (or any repository URL)")
    transfer_options(p)

    p = add("remote", cmd_remote, "add, remove or list remotes (names for other repositories)")
    p.add_argument("action", choices=["add", "remove", "list"], nargs="?", default="list")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("url", nargs="?", metavar="URL")
    p.add_argument("--json", action="store_true")

    p = add("push", cmd_push, "send a branch and the data it needs to a remote; move the remote branch")
    p.add_argument("remote", nargs="?", default=DEFAULT_REMOTE, metavar="REMOTE", help="a remote name or URL")
    p.add_argument("branch", nargs="?", default="main", metavar="BRANCH")
    p.add_argument("--to", metavar="NAME", help="the remote branch to move (default: BRANCH)")
    p.add_argument("-f", "--force", action="store_true", help="move the remote branch even if it is not an "
                   "ancestor of BRANCH (its other commits are no longer on it)")
    p.add_argument("--tags", action="store_true", help="also send every tag the remote lacks")
    transfer_options(p)

    p = add("pull", cmd_pull, "fetch a remote branch and fast-forward the local branch to it")
    p.add_argument("remote", nargs="?", default=DEFAULT_REMOTE, metavar="REMOTE", help="a remote name or URL")
    p.add_argument("branch", nargs="?", default="main", metavar="BRANCH")
    p.add_argument("--to", metavar="NAME", help="the local branch to move (default: BRANCH)")
    p.add_argument("-f", "--force", action="store_true",
                   help="move the local branch even if it has diverged (its own commits are no longer on it)")
    p.add_argument("--merge", action="store_true",
                   help="merge a diverged remote branch into the local one (as commitfs merge does) instead of "
                        "refusing; conflicts move nothing, exit 1")
    transfer_options(p)
