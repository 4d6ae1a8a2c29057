"""Alias verbs: alias set | ls | show | log | rm (the work is ops/alias.py)."""

from __future__ import annotations

from commitfs.cli.core import open_repo
from commitfs.cli.output import print_json, warn
from commitfs.ops import alias as alias_op


def _short(cid: bytes | None) -> str:
    return cid.hex()[:12] if cid else "-"


def cmd_alias_set(args) -> int:
    protect = True if args.protect else (False if args.unprotect else None)
    with open_repo(args) as repo:
        move = alias_op.set_alias(repo, args.name, args.rev, reason=args.message or "", protect=protect,
                                  force=args.force)
    if args.json:
        print_json(move.to_json())
    else:
        forced = " (forced)" if move.forced else ""
        print(f"alias {move.name}: {move.status} {_short(move.old)} -> {_short(move.new)}{forced}")
    return 0


def cmd_alias_rm(args) -> int:
    with open_repo(args) as repo:
        move = alias_op.remove_alias(repo, args.name, reason=args.message or "", force=args.force)
    print(f"alias {move.name}: removed (was {_short(move.old)})" + (" (forced)" if move.forced else ""))
    return 0


def cmd_alias_ls(args) -> int:
    with open_repo(args) as repo:
        infos = alias_op.list_aliases(repo, removed=args.all)
    if args.json:
        print_json([i.to_json() for i in infos])
        return 0
    for i in infos:
        flags = ",".join(f for f, on in (("protected", i.protected), ("removed", i.removed)) if on)
        last = f"  {i.last.when} {i.last.who}" + (f": {i.last.reason}" if i.last.reason else "") if i.last else ""
        print(f"{i.name}\t{i.commit.hex()}" + (f" [{flags}]" if flags else "") + last)
        if i.error:
            warn(f"alias {i.name}: {i.error}")
    return 0


def cmd_alias_show(args) -> int:
    with open_repo(args) as repo:
        info = alias_op.show_alias(repo, args.name)
    if args.json:
        print_json(info.to_json())
        return 0
    print(f"alias {info.name}" + (" (removed)" if info.removed else ""))
    print(f"commit    {info.commit.hex()}")
    print(f"protected {'yes' if info.protected else 'no'}")
    if info.last:
        print(f"last move {info.last.when} by {info.last.who}" + (f": {info.last.reason}" if info.last.reason else ""))
    if info.error:
        warn(f"alias {info.name}: {info.error}")
    return 0


def cmd_alias_log(args) -> int:
    with open_repo(args) as repo:
        entries = alias_op.alias_log(repo, args.name, limit=args.limit)
    if args.json:
        print_json([alias_op.entry_json(eid, e) for eid, e in entries])
        return 0
    for _eid, e in entries:
        what = {"set": f"{_short(e.old)} -> {_short(e.new)}", "rm": f"removed (was {_short(e.old)})",
                "protect": f"protected at {_short(e.new)}", "unprotect": f"unprotected at {_short(e.new)}"}
        line = f"{e.when}  {e.who}  {what.get(e.action, e.action)}"
        if e.forced:
            line += "  FORCED"
        if e.reason:
            line += f"  {e.reason}"
        print(line)
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("alias", parents=[common], help="movable names for commits (production, staging), with an audit log",
                       description="An alias names a commit; every move is logged in the repository (who, when, "
                                   "from, to, why). A protected alias moves only with --force.")
    asub = p.add_subparsers(dest="alias_command", metavar="ACTION")
    asub.required = True

    s = asub.add_parser("set", parents=[common], help="create or move an alias")
    s.set_defaults(handler=cmd_alias_set)
    s.add_argument("name", metavar="NAME")
    s.add_argument("rev", metavar="REV")
    s.add_argument("-m", "--message", metavar="REASON", help="why (recorded in the log)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--protect", action="store_true", help="from now on it moves only with --force")
    g.add_argument("--unprotect", action="store_true", help="lift the protection (needs --force)")
    s.add_argument("--force", action="store_true", help="move a protected alias (logged as forced)")
    s.add_argument("--json", action="store_true")

    s = asub.add_parser("ls", parents=[common], help="list aliases")
    s.set_defaults(handler=cmd_alias_ls)
    s.add_argument("--all", action="store_true", help="also removed aliases")
    s.add_argument("--json", action="store_true")

    s = asub.add_parser("show", parents=[common], help="what an alias names, and its last move")
    s.set_defaults(handler=cmd_alias_show)
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true")

    s = asub.add_parser("log", parents=[common], help="every move of an alias, newest first")
    s.set_defaults(handler=cmd_alias_log)
    s.add_argument("name", metavar="NAME")
    s.add_argument("-n", "--limit", type=int, metavar="N")
    s.add_argument("--json", action="store_true")

    s = asub.add_parser("rm", parents=[common], help="remove an alias (its log stays)")
    s.set_defaults(handler=cmd_alias_rm)
    s.add_argument("name", metavar="NAME")
    s.add_argument("-m", "--message", metavar="REASON")
    s.add_argument("--force", action="store_true", help="remove a protected alias (logged as forced)")
