"""``commitfs find PATTERN [REV...]``: the commits holding a path that matches a glob
(the search itself is ops/find.py)."""

from __future__ import annotations

import sys

from commitfs.cli.core import _time, open_repo
from commitfs.cli.output import human_size, print_json
from commitfs.ops.find import find


def cmd_find(args) -> int:
    repo = open_repo(args)
    starts = [repo.resolve(r) for r in args.revs] if args.revs else None
    found = find(repo, args.pattern, starts)
    if args.json:
        print_json([f.to_json() for f in found])
        return 0
    n = 0
    for f in found:
        n += 1
        summary = f.commit.message.splitlines()[0] if f.commit.message else ""
        print(f"commit {f.commit_id.hex()[:12]} {_time(f.commit.time)} {summary}")
        for m in f.matches:
            suffix = "/" if m.entry.is_dir else ""
            print(f"    {m.path}{suffix} ({human_size(m.entry.size)})")
    if not n:
        print(f"commitfs: no commit holds a path matching {args.pattern!r}", file=sys.stderr)
    return 0


def register(sub, common) -> None:
    help_ = "the commits holding a path that matches a glob, newest first"
    p = sub.add_parser("find", parents=[common], help=help_,
                       description=help_ + ".  A PATTERN without '/' matches entry names, one with '/' "
                                   "whole paths.  Searched: the history of each REV (every parent), "
                                   "or every commit a branch or tag reaches.")
    p.set_defaults(handler=cmd_find)
    p.add_argument("pattern", metavar="PATTERN", help="a glob, e.g. '*.safetensors' or 'train/*/img_0001.png'")
    p.add_argument("revs", nargs="*", metavar="REV")
    p.add_argument("--json", action="store_true")
