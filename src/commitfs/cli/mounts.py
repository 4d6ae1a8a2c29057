"""``commitfs mounts [--json]``: the live commitfs mounts of this machine."""

from __future__ import annotations

from commitfs.cli.output import print_json, warn
from commitfs.fuse import lifecycle


def cmd_mounts(args) -> int:
    mounts = lifecycle.list_mounts()
    if args.json:
        print_json(mounts)
        return 0
    for m in mounts:
        if m["stale"]:
            print(f"{m['mountpoint']}: stale (its daemon died; clean up with: commitfs umount {m['mountpoint']})")
            continue
        what = m["rev"] or "all branches, tags and commits"
        if m["path"]:
            what += f":{m['path']}"
        if m["commit"]:
            what += f" at {m['commit'][:12]}"
        mode = "writable workspace" if m["writable"] else "read-only"
        if not m["fast_open"]:
            mode += ", without the fast path"
        print(f"{m['mountpoint']}: {m['repo']} {what} ({mode}), pid {m['pid']}, "
              f"cache {m['cache'] or 'none'}, log {m['log']}")
        if not m["fast_open"]:
            warn(f"{m['mountpoint']}: {lifecycle.slow_open(m['fast_path_missing'] or 'see its log')}")
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("mounts", parents=[common], help="list the live commitfs mounts of this machine",
                       description="List the commitfs mounts of this machine: repository, revision "
                                   "(and PATH), commit, daemon pid, chunk cache directory, log file; a read-only "
                                   "mount without the fast path (every open() a round trip) is marked "
                                   "and warned about on stderr.")
    p.set_defaults(handler=cmd_mounts)
    p.add_argument("--json", action="store_true")
