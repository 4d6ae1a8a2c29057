"""Workspace verbs: status, reset (and the workspace half of ``commit``).

A writable mount (``commitfs mount BRANCH MOUNTPOINT --writable``) is served
by a daemon that owns the overlay; these verbs ask it over its control
socket (fuse/lifecycle.workspace_request), so they need no repository
option.  ``commitfs commit MOUNTPOINT`` lands here through ``commit_workspace``
when MOUNTPOINT is a workspace mount.
"""

from __future__ import annotations

import os
import sys

from commitfs.cli.output import human_size, print_json
from commitfs.errors import CommitfsError, InputError
from commitfs.fuse import lifecycle


class ConflictingCommitError(CommitfsError):
    """The branch moved and touched the same paths as the workspace."""


def _workspace(mountpoint: str) -> dict:
    record = lifecycle.lookup_workspace(mountpoint)
    if record is None:
        if lifecycle.find_mount(mountpoint) is not None and lifecycle.is_stale(mountpoint):
            raise InputError(f"{mountpoint} is a stale mount whose daemon died; remount it "
                             f"(commitfs umount {mountpoint}, then commitfs mount ... --writable)")
        raise InputError(f"{mountpoint} is not a writable workspace mount")
    return record


def _ask(record: dict, request: dict) -> dict:
    answer = lifecycle.workspace_request(record, request)
    if not answer.get("ok"):
        if answer.get("kind") == "conflict":
            raise ConflictingCommitError(answer["error"])
        raise CommitfsError(answer.get("error", "the workspace daemon failed"))
    return answer


def cmd_status(args) -> int:
    record = _workspace(args.mountpoint)
    answer = _ask(record, {"op": "status"})
    merge = answer.get("merge")
    if args.json:
        out = {"branch": answer["branch"], "base": answer["base"], "changes": answer["changes"]}
        if merge is not None:
            out["merge"] = merge
        print_json(out)
        return 0
    changes = answer["changes"]
    print(f"workspace on {answer['branch']} at {answer['base'][:12]}: "
          f"{len(changes) or 'no'} change{'s' if len(changes) != 1 else ''}")
    if merge is not None:
        left = merge.get("unresolved", [])
        print(f"merge of {merge['source_rev']} ({merge['source'][:12]}) in progress: "
              f"{len(left) or 'no'} unresolved path{'s' if len(left) != 1 else ''}"
              + ("" if left else " (commit to record it, reset to abandon it)"))
        for p in left:
            print(f"unresolved {p}")
    for c in changes:
        suffix = "/" if c["kind"] == "dir" else "@" if c["kind"] == "symlink" else ""
        print(f"{c['status']:<9} {human_size(c['size']):>10}  {c['path']}{suffix}")
    return 0


def _relative(mountpoint: str, path: str) -> str:
    """A PATH argument as a path inside the workspace."""
    root = lifecycle.canonical(mountpoint)
    if os.path.isabs(path):
        full = os.path.abspath(path)
    else:
        cwd = os.path.abspath(os.getcwd())
        inside = cwd == root or cwd.startswith(root + os.sep)
        full = os.path.abspath(os.path.join(cwd if inside else root, path))
    if full != root and not full.startswith(root + os.sep):
        raise InputError(f"{path} is not inside the workspace {mountpoint}")
    return os.path.relpath(full, root).replace(os.sep, "/")


def cmd_reset(args) -> int:
    record = _workspace(args.mountpoint)
    paths = [_relative(record["mountpoint"], p) for p in args.paths]
    if any(p == "." for p in paths):
        paths = []  # the root: everything
    _ask(record, {"op": "reset", "paths": paths})
    return 0


def _refuse_inside_a_mount(path: str) -> None:
    """A directory commit of files a commitfs mount serves would copy a revision's tree
    onto a branch (a read-only mount of tag v2 committed to main reverts main): refused."""
    mount = lifecycle.enclosing_mount(path)
    if mount is None:
        return
    workspace = lifecycle.lookup_workspace(mount.mountpoint)
    if workspace is not None:
        raise InputError(f"{path} is inside the workspace mount {mount.mountpoint}: commit the whole "
                         f"workspace with: commitfs commit {mount.mountpoint} -m MESSAGE")
    raise InputError(f"{path} is inside the read-only commitfs mount {mount.mountpoint}, whose files are "
                     "already committed; to change them, mount a branch with --writable and commit that "
                     "mount, or check the revision out (commitfs checkout REV DEST) and commit DEST")


def commit_workspace(args, metadata: dict[str, str]) -> int | None:
    """``commitfs commit DIR``: if DIR is a workspace mount, commit through its daemon
    and return the exit code; None if it is not one (the caller commits a directory)."""
    record = lifecycle.lookup_workspace(args.dir)
    if record is None:
        if lifecycle.find_mount(args.dir) is not None and lifecycle.is_stale(args.dir):
            raise InputError(f"{args.dir} is a stale mount whose daemon died; remount it to commit its edits")
        _refuse_inside_a_mount(args.dir)
        if not os.path.isdir(args.dir) and not args.repo:
            # (With a repository the directory commit says why: missing, not a directory.)
            raise InputError(f"{args.dir} is neither a writable workspace mount nor a directory")
        return None
    if getattr(args, "input", None):
        raise InputError("--input is not supported for a workspace commit yet (commit a directory instead)")
    if args.branch is not None and args.branch != record.get("branch"):
        raise InputError(f"{args.dir} is a workspace of branch {record.get('branch')!r}; "
                         f"it commits there, not to {args.branch!r}")
    request = {"op": "commit", "message": args.message, "metadata": metadata, "author": args.author}
    answer = lifecycle.workspace_request(record, request)
    if not answer.get("ok"):
        if answer.get("kind") == "nothing":
            if args.json:
                print_json({"id": answer.get("id"), "created": False})
            else:
                print(answer["error"], file=sys.stderr)
                print(answer.get("id"))
            return 0
        if answer.get("kind") == "conflict":
            raise ConflictingCommitError(answer["error"] + "; the workspace is unchanged")
        raise CommitfsError(answer.get("error", "the workspace daemon failed"))
    if args.json:
        print_json({k: answer[k] for k in ("id", "created", "parent", "rebased", "changes", "branch")})
    else:
        print(answer["id"])
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("status", parents=[common], help="edits of a writable workspace mount",
                       description="List what a workspace mount changed against its base commit: "
                                   "added, modified, deleted, with sizes.")
    p.set_defaults(handler=cmd_status)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reset", parents=[common], help="discard edits of a writable workspace mount",
                       description="Discard the edits of a workspace mount: all of them, or those at and "
                                   "below each PATH (relative to the workspace root, or to the current "
                                   "directory inside the mount).")
    p.set_defaults(handler=cmd_reset)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("paths", nargs="*", metavar="PATH")
