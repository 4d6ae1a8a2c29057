"""The merge verb: ``commitfs merge SOURCE [--into BRANCH] ...`` (the work is ops/merge.py)."""

from __future__ import annotations

import sys

from commitfs.cli.core import open_repo
from commitfs.cli.output import print_json
from commitfs.errors import UsageError
from commitfs.ops.changes import Conflict
from commitfs.ops.merge import MergeError, MergeOptions, MergeResult, merge_into, parse_key, parse_rule


def _short(cid: bytes | None) -> str:
    return cid.hex()[:12] if cid else "nothing"


def conflict_lines(c: Conflict) -> list[str]:
    lines = [f"CONFLICT ({c.kind}) {c.path}" + (f": {c.note}" if c.note else "")]
    for d in c.details[:20]:
        lines.append("    " + d.get("text", str(d)))
    if len(c.details) > 20:
        lines.append(f"    ... {len(c.details) - 20} more")
    return lines


def _print(result: MergeResult, source_rev: str) -> None:
    b = result.branch
    if result.status == "up-to-date":
        print(f"{b} is already up to date with {source_rev} ({_short(result.head)})")
        return
    if len(result.bases) > 1:
        print(f"note: {len(result.bases)} nearest common ancestors; merged against the newest, "
              f"{_short(result.base)}")
    for r in result.resolved:
        print(f"resolved ({r.kind}) {r.path}: {r.how}")
    if result.status == "fast-forward":
        verb = "would fast-forward" if result.dry_run else "fast-forwarded"
        print(f"{verb} {b} from {_short(result.head)} to {_short(result.source)}")
        return
    if result.status == "conflicts":
        for c in result.conflicts:
            for line in conflict_lines(c):
                print(line)
        return
    if result.dry_run:
        print(f"would merge {source_rev} into {b} cleanly (base {_short(result.base)})")
        return
    print(result.commit_id.hex())


def cmd_merge(args) -> int:
    try:
        options = MergeOptions(args.strategy, [parse_rule(r) for r in args.rule or []],
                               [parse_key(k) for k in args.key or []])
    except MergeError as exc:
        raise UsageError(str(exc)) from None
    if args.mountpoint:
        return _merge_workspace(args, options)
    repo = open_repo(args)
    result = merge_into(repo, args.source, args.into, message=args.message, no_ff=args.no_ff,
                        options=options, dry_run=args.dry_run)
    if args.json:
        print_json(result.to_json())
    else:
        _print(result, args.source)
    if result.status == "conflicts":
        n = len(result.conflicts)
        print(f"commitfs: merging {args.source} into {args.into}: {n} conflict{'s' if n != 1 else ''}; "
              f"nothing was changed (resolve with --strategy or --rule)", file=sys.stderr)
        return 1
    return 0


def _merge_workspace(args, options: MergeOptions) -> int:
    from commitfs.cli.workspace import _ask, _workspace

    record = _workspace(args.mountpoint)
    if args.dry_run or args.no_ff or args.message:
        raise UsageError("merging into a workspace mount takes no --dry-run, --no-ff or -m "
                         "(the commit of the mount records the merge)")
    if args.into not in ("main", record.get("branch")):
        raise UsageError(f"{args.mountpoint} is a workspace of branch {record.get('branch')!r}; "
                         f"it merges there, not into {args.into!r}")
    answer = _ask(record, {"op": "merge", "source": args.source, "strategy": options.strategy,
                           "rules": [list(r) for r in options.rules],
                           "keys": [[g, list(c)] for g, c in options.keys]})
    if args.json:
        print_json({k: v for k, v in answer.items() if k != "ok"})
    elif answer["status"] == "up-to-date":
        print(f"{answer['branch']} is already up to date with {args.source}")
    else:
        for r in answer["resolved"]:
            print(f"resolved ({r['kind']}) {r['path']}: {r['resolved']}")
        for c in answer["conflicts"]:
            how = ("conflict markers in it" if c["style"] == "markers" else
                   "ours as it is, " + " and ".join(c["files"]) if c["files"] else "ours as it is")
            print(f"CONFLICT ({c['kind']}) {c['path']}: {how}" + (f" ({c['note']})" if c.get("note") else ""))
    if answer["status"] == "conflicts":
        n = len(answer["conflicts"])
        print(f"commitfs: merging {args.source} into the workspace {args.mountpoint}: {n} conflict"
              f"{'s' if n != 1 else ''} to resolve in the mount, then commitfs commit {args.mountpoint} "
              f"(or commitfs reset {args.mountpoint} to abandon)", file=sys.stderr)
        return 1
    if not args.json and answer["status"] == "merged":
        print(f"merged {args.source} into the workspace: commit {args.mountpoint} to record it")
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("merge", parents=[common], help="merge a branch (or any revision) into a branch",
                       description="Three-way merge of SOURCE into BRANCH against their merge base: "
                                   "fast-forward when possible, else a two-parent merge commit; tables merge "
                                   "by rows. Conflicts move nothing and exit 1. See docs/MERGE.md.")
    p.set_defaults(handler=cmd_merge)
    p.add_argument("source", metavar="SOURCE", help="the revision to merge (a branch, tag or commit)")
    p.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                   help="a writable workspace mount of BRANCH: apply the merge there as pending edits")
    p.add_argument("--into", default="main", metavar="BRANCH", help="the branch to merge into (default: main)")
    p.add_argument("-m", "--message", help="the merge commit's message")
    p.add_argument("--no-ff", action="store_true", help="make a merge commit even when a fast-forward would do")
    p.add_argument("--strategy", choices=["ours", "theirs"], help="resolve every conflict taking one side")
    p.add_argument("--rule", action="append", metavar="GLOB=ours|theirs|rows",
                   help="how conflicts at matching paths resolve (repeatable; first match wins)")
    p.add_argument("--key", action="append", metavar="GLOB=COLUMN[,COLUMN]",
                   help="key columns of matching tables, for the row-level merge (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="report what would happen; change nothing")
    p.add_argument("--json", action="store_true")
