"""The gc verb: parse, call ops.gc, print.  The work is in commitfs.ops.gc."""

from __future__ import annotations

import sys

from commitfs.cli.core import open_repo
from commitfs.cli.output import human_size, print_json
from commitfs.ops.gc import DEFAULT_GRACE, DEFAULT_REPACK_BELOW, collect, parse_duration


def _fraction(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction between 0 and 1, not {text}")
    return value


def cmd_gc(args) -> int:
    grace = parse_duration(args.grace) if args.grace is not None else DEFAULT_GRACE
    repo = open_repo(args)
    progress = None
    if not args.json and sys.stderr.isatty():
        def progress(msg: str) -> None:
            print(f"commitfs gc: {msg}", file=sys.stderr)
    report = collect(repo, grace=grace, repack_below=args.repack_below, dry_run=args.dry_run,
                     force=args.force, wait=not args.no_wait, progress=progress)
    if args.json:
        print_json(report.to_json())
        return 0
    verb = "would" if report.dry_run else ""
    for p in report.plan:
        if p.action == "keep":
            continue
        freed = p.size if p.action == "delete" else p.dead
        print(f"{'would ' if report.dry_run else ''}{p.action} pack {p.pack.hex()}: "
              f"{human_size(p.size)}, {human_size(p.live)} live, frees {human_size(freed)} ({p.why})")
    for note in report.notes:
        print(note)
    if report.dry_run:
        print(f"dry run: {verb} free {human_size(report.bytes_freed)} of {human_size(report.bytes_before)} "
              f"({report.packs_deleted} packs, {report.packs_repacked} of them repacked); nothing changed")
    else:
        print(f"freed {human_size(report.bytes_freed)}: {human_size(report.bytes_before)} before, "
              f"{human_size(report.bytes_after)} after; {report.packs_deleted} packs deleted, "
              f"{report.packs_written} written ({human_size(report.bytes_copied)} copied), "
              f"{report.commits_deleted} commits deleted, in {report.seconds:.1f}s")
    return 0


def register(sub, common) -> None:
    help_ = "free the space of packs, index segments and commits nothing reaches"
    p = sub.add_parser("gc", parents=[common], help=help_, description=help_ + " (safe with concurrent writers)")
    p.set_defaults(handler=cmd_gc)
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted and repacked; change nothing")
    p.add_argument("--grace", metavar="DURATION", default=None,
                   help="keep anything written this recently, and wait this long between condemning and "
                        "deleting (default 1h; e.g. 30m, 2h)")
    p.add_argument("--repack-below", type=_fraction, default=DEFAULT_REPACK_BELOW, metavar="FRACTION",
                   help=f"copy the live blobs of packs less live than this, then delete them "
                        f"(default {DEFAULT_REPACK_BELOW})")
    p.add_argument("--force", action="store_true",
                   help="accept a grace period below the safe minimum (10m): only when nothing else writes")
    p.add_argument("--no-wait", action="store_true",
                   help="condemn, then leave the deleting to a later run once the grace period is over")
    p.add_argument("--json", action="store_true")
