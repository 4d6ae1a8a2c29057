"""Looking inside changes: diff (with row and tensor diffs), stats, and the
detail of show and log (--stat, log -- PATH).  The work is in
ops/contentdiff.py, ops/tablediff.py, ops/tensordiff.py and ops/stats.py;
this module parses and prints, one file at a time (never the whole output
held at once)."""

from __future__ import annotations

import json
import sys

from commitfs.cli.output import count_of, human_size, print_json
from commitfs.errors import AttributesError, TableError, UsageError

# The operations are imported where used: core's parser takes add_log_options
# from here for every verb of core (`commitfs commit` included).

_SIGN = {"added": "A", "removed": "D", "modified": "M"}
_ROW_SIGN = {"added": "+", "removed": "-", "changed": "~", "moved": ">"}


class _DashDashParser:
    """Mixed into a verb's parser: operands after ``--`` are paths
    (``args.paths``), whatever the operands before it."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        paths = None
        if "--" in args:
            i = args.index("--")
            args, paths = args[:i], args[i + 1:]
        ns, extra = super().parse_known_args(args, namespace)
        if paths is not None or not hasattr(ns, "paths"):
            ns.paths = paths or []
        return ns, extra


def _with_paths(parser) -> None:
    parser.__class__ = type("PathsParser", (_DashDashParser, parser.__class__), {})


# --- printing one file's diff -----------------------------------------------------
def _sizes(c) -> str:
    return f"{c.old.size} -> {c.new.size}" if c.status == "modified" else str((c.new or c.old).size)


def _counts_line(fd: FileDiff) -> str | None:
    if fd.table is not None:
        t = fd.table
        n = t.counts
        parts = [f"rows: {n['added']} added, {n['removed']} removed, {n['changed']} changed"
                 + (f", {n['moved']} moved" if not t.keys else "")]
        if t.columns_added:
            parts.append("columns added: " + ", ".join(t.columns_added))
        if t.columns_removed:
            parts.append("columns removed: " + ", ".join(t.columns_removed))
        if t.columns_renamed:
            parts.append("columns renamed: " + ", ".join(f"{a} -> {b}" for a, b in t.columns_renamed))
        return "; ".join(parts)
    if fd.tensors is not None:
        t = fd.tensors
        if t.binary:
            return f"binary change ({t.reason})"
        n = t.counts
        return (f"tensors: {n['added']} added, {n['removed']} removed, {n['changed']} changed, "
                f"{n['unchanged']} unchanged" + ("; metadata changed" if t.metadata_changed else ""))
    return None


def _cell(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."


def _row_lines(fd: FileDiff, cap: int):
    t = fd.table
    shown = 0
    for r in t.rows:
        if shown >= cap:
            break
        shown += 1
        if r.key is not None:
            where = "key " + ",".join(_cell(k) for k in r.key)
        else:
            line = r.new_line if r.status != "removed" else r.old_line
            off = r.new_offset if r.status != "removed" else r.old_offset
            where = f"line {line}" if line is not None else f"byte {off}"
        if r.status == "changed":
            yield f"  ~ {where}: " + "; ".join(f"{c.column}: {_cell(c.old)} -> {_cell(c.new)}" for c in r.cells)
        else:
            cells = r.new if r.status != "removed" else r.old
            yield f"  {_ROW_SIGN[r.status]} {where}: " + ", ".join(f"{k}={_cell(v)}" for k, v in (cells or {}).items())
    more = t.counts["added"] + t.counts["removed"] + t.counts["changed"] + t.counts["moved"] - shown
    if more > 0:
        yield f"  ... {more} more rows (--json gives all)"


def _shape(t) -> str:
    return f"{t.dtype}[{', '.join(map(str, t.shape))}]"


def _tensor_lines(fd: FileDiff, cap: int):
    t = fd.tensors
    for c in t.changes[:cap]:
        if c.status == "added":
            yield f"  + {c.name} {_shape(c.new)}"
        elif c.status == "removed":
            yield f"  - {c.name} {_shape(c.old)}"
        else:
            what = [w for w, on in (("dtype", c.dtype_changed), ("shape", c.shape_changed),
                                    ("bytes", c.bytes_changed)) if on]
            shape = _shape(c.old) if _shape(c.old) == _shape(c.new) else f"{_shape(c.old)} -> {_shape(c.new)}"
            extra = ""
            if c.max_abs_diff is not None:
                extra = f" (max abs diff {c.max_abs_diff:.6g}, relative L2 {c.rel_l2:.6g})"
            elif c.bytes_equal:
                extra = " (bytes equal)"
            yield f"  ~ {c.name} {shape}: {', '.join(what)} changed{extra}"
    if len(t.changes) > cap:
        yield f"  ... {len(t.changes) - cap} more tensors (--json gives all)"


def _print_file(fd: FileDiff, *, stat: bool, rows: bool, cap: int) -> None:
    c = fd.change
    print(f"{_SIGN[c.status]} {c.path} ({_sizes(c)})")
    if fd.error is not None:
        return
    if stat or rows:
        line = _counts_line(fd)
        if line:
            print(f"  {line}")
    if rows:
        if fd.table is not None:
            for line in _row_lines(fd, cap):
                print(line)
        elif fd.tensors is not None and not fd.tensors.binary:
            for line in _tensor_lines(fd, cap):
                print(line)


def _stream_json(items) -> None:
    out = sys.stdout
    out.write("[")
    first = True
    for item in items:
        out.write("\n" if first else ",\n")
        first = False
        out.write(json.dumps(item, indent=2, ensure_ascii=False))
    out.write("\n]\n" if not first else "]\n")


def _report_errors(errors: list[str]) -> int:
    for e in errors:
        print(f"commitfs: {e}", file=sys.stderr)
    return 1 if errors else 0


# --- verbs ------------------------------------------------------------------------
def cmd_diff(args) -> int:
    from commitfs.ops import contentdiff

    from commitfs.cli.core import open_repo

    repo = open_repo(args)
    old, new = contentdiff.resolve_pair(repo, args.old, args.new)
    contents = bool(args.stat or args.rows or args.key or args.values)
    cap = args.max_rows
    diffs = contentdiff.iter_file_diffs(repo, old, new, args.paths, contents=contents, keys=args.key or (),
                                        values=args.values, max_rows=None if args.json else cap)
    errors: list[str] = []

    def noted(items):
        for fd in items:
            if fd.error is not None:
                errors.append(fd.error)
            yield fd

    if args.json:
        out = sys.stdout
        out.write("[")
        first = True
        key_of = contentdiff.keys_for(repo, old, new) if contents and not args.key else None
        for change in contentdiff.iter_changes(repo, old, new, args.paths):
            out.write("\n" if first else ",\n")
            first = False
            _write_file_json(repo, change, contents, args, errors, key_of)
        out.write("\n]\n" if not first else "]\n")
        return _report_errors(errors)
    totals = {"added": 0, "removed": 0, "modified": 0}
    for fd in noted(diffs):
        totals[fd.change.status] += 1
        _print_file(fd, stat=args.stat, rows=args.rows or bool(args.key) or args.values, cap=cap)
        sys.stdout.flush()
    if args.stat:
        n = sum(totals.values())
        print(f"{n} file{'s' if n != 1 else ''} changed: {totals['added']} added, {totals['removed']} removed, "
              f"{totals['modified']} modified")
    return _report_errors(errors)


def _stat_json(fd: FileDiff) -> dict:
    out = fd.change.to_json()
    if fd.table is not None:
        out["rows"] = dict(fd.table.counts)
        out["columns"] = {"added": fd.table.columns_added, "removed": fd.table.columns_removed,
                          "renamed": [list(p) for p in fd.table.columns_renamed]}
    if fd.tensors is not None:
        out["tensors"] = fd.tensors.counts if not fd.tensors.binary else {"binary": fd.tensors.reason}
    if fd.error is not None:
        out["error"] = fd.error
    return out


def add_log_options(p) -> None:
    """log's --stat and ``-- PATH...`` (the parser is core's)."""
    _with_paths(p)
    p.add_argument("--stat", action="store_true", help="the files each commit changed, with counts")
    p.usage = "%(prog)s [REV] [-n N] [--oneline] [--graph] [--stat] [--json] [-- PATH...]"


def print_log(args, repo, start: bytes, print_commit, items=None) -> int:
    """log with --stat or -- PATH...; ``items``: the commits of a range or --all."""
    from commitfs.ops import contentdiff, history

    paths = [p.strip("/") for p in args.paths]
    if len(paths) > 1:
        raise UsageError("log -- PATH takes one path")
    if items is not None:
        if paths:
            raise UsageError("log -- PATH follows one revision's first parents; not with A..B or --all")
    elif paths:
        items = ((cid, c) for cid, c, _, _ in contentdiff.path_history(repo, start, paths[0], args.limit))
    else:
        items = history.log(repo, start, args.limit)
    if args.json:
        def records():
            for cid, c in items:
                rec = history.commit_json(cid, c)
                if args.stat:
                    rec["changes"] = show_changes_for(repo, cid, c, paths, True)
                yield rec
        _stream_json(records())
        return 0
    for cid, c in items:
        if args.oneline:
            print(f"{cid.hex()[:12]} {c.message.splitlines()[0] if c.message else ''}")
        else:
            print_commit(cid, c)
        if args.stat:
            if not args.oneline:
                print()
            show_changes_for(repo, cid, c, paths, False)
        if not args.oneline:
            print()
    return 0


def _indent(text: str, by: str) -> str:
    return "\n".join(by + line for line in text.split("\n"))


def _write_file_json(repo, change, contents: bool, args, errors: list[str], key_of) -> None:
    """One file of ``diff --json``; a table's rows are written as the diff
    finds them, never all held (ops/tablediff.py's on_row)."""
    from commitfs.ops import contentdiff
    from commitfs.ops.contentdiff import FileDiff
    from commitfs.ops.tablediff import diff_table

    out = sys.stdout
    keys = args.key or ()
    if key_of is not None and contentdiff.content_kind(change.path) == "table":
        try:
            keys = key_of(change.path)
        except AttributesError as exc:
            errors.append(str(exc))
            out.write(json.dumps(FileDiff(change, error=str(exc)).to_json(), indent=2, ensure_ascii=False))
            return
    entries = [e if e is not None and e.kind.is_file else None for e in (change.old, change.new)]
    if not contents or contentdiff.content_kind(change.path) != "table" or entries == [None, None]:
        fd = contentdiff.file_diff(repo, change, keys=keys, values=args.values) if contents else FileDiff(change)
        if fd.error is not None:
            errors.append(fd.error)
        out.write(json.dumps(fd.to_json(), indent=2, ensure_ascii=False))
        return
    head = json.dumps(change.to_json(), indent=2, ensure_ascii=False)
    out.write(head[:-2] + ',\n  "table": {\n    "rows": [')
    n = 0

    def sink(r) -> None:
        nonlocal n
        out.write(("\n" if n == 0 else ",\n") + "      " + json.dumps(r.to_json(), ensure_ascii=False))
        n += 1

    try:
        t = diff_table(repo, entries[0], entries[1], change.path, keys, on_row=sink)
    except TableError as exc:  # the rows found before the error stay
        errors.append(str(exc))
        out.write(("\n    " if n else "") + ']\n  },\n  "error": ' + json.dumps(str(exc), ensure_ascii=False) + "\n}")
        return
    rest = t.to_json()
    del rest["rows"]
    inner = json.dumps(rest, indent=2, ensure_ascii=False)[1:-1].strip("\n")
    out.write(("\n    " if n else "") + "],\n" + _indent(inner, "  ") + "\n  }\n}")


def show_changes_for(repo, cid: bytes, c, paths, json_out: bool):
    from commitfs.ops import contentdiff

    old = c.parents[0] if c.parents else None
    diffs = contentdiff.iter_file_diffs(repo, old, cid, paths, max_rows=0)
    if json_out:
        return [_stat_json(fd) for fd in diffs]
    for fd in diffs:
        _print_file(fd, stat=True, rows=False, cap=0)
    return None


def cmd_stats(args) -> int:
    from commitfs.ops.stats import commit_stats, repository_stats

    from commitfs.cli.core import open_repo

    repo = open_repo(args)
    if args.rev is not None:
        s = commit_stats(repo, repo.resolve(args.rev))
        if args.json:
            print_json(s.to_json())
            return 0
        print(f"commit {s.commit}")
        print(f"files:          {s.files}")
        print(f"logical bytes:  {s.logical_bytes} ({human_size(s.logical_bytes)})")
        print(f"chunks:         {s.chunks}")
        print(f"stored bytes:   {s.stored_bytes} ({human_size(s.stored_bytes)})")
        print(f"  unique:       {s.unique_stored_bytes} ({human_size(s.unique_stored_bytes)}; no parent has them)")
        print(f"  shared:       {s.shared_stored_bytes} ({human_size(s.shared_stored_bytes)}; a parent has them)")
        return 0
    r = repository_stats(repo)
    if args.json:
        print_json(r.to_json())
        return 0
    print(f"commits:        {r.commits}")
    print(f"packs:          {r.packs} ({human_size(r.pack_bytes)})")
    print(f"objects:        {r.objects} ({r.chunks} chunks)")
    print(f"stored bytes:   {r.pack_bytes} ({human_size(r.pack_bytes)})")
    print(f"logical bytes:  {r.logical_bytes} ({human_size(r.logical_bytes)}; every commit's files, summed)")
    print(f"dedup ratio:    {r.dedup_ratio if r.dedup_ratio is not None else '-'}")
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("diff", parents=[common], help="what changed between two revisions, and inside files",
                       description="Files added, removed and modified from A to B (B omitted: from A's first "
                                   "parent to A); with --stat/--rows, the rows of tables and tensors of "
                                   ".safetensors files that changed.",
                       usage="%(prog)s A [B] [--stat] [--rows] [--key COLUMN]... [--values] [--json] [-- PATH...]")
    _with_paths(p)
    p.set_defaults(handler=cmd_diff)
    p.add_argument("old", metavar="A")
    p.add_argument("new", nargs="?", metavar="B", help="default: compare A's first parent with A")
    p.add_argument("--stat", action="store_true", help="counts per file (rows, tensors) and a total")
    p.add_argument("--rows", action="store_true", help="the changed rows of tables and tensors of weights")
    p.add_argument("--key", action="append", metavar="COLUMN",
                   help="match table rows by this column (repeatable: a compound key); implies --rows")
    p.add_argument("--values", action="store_true",
                   help="read changed tensors: max abs difference, relative L2 (needs numpy); implies --rows")
    p.add_argument("--max-rows", type=count_of("rows"), default=20, metavar="N",
                   help="rows (and tensors) printed per file, default 20 (--json gives all)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stats", parents=[common], help="sizes and dedup of a commit or the repository",
                       description="With REV: a commit's files, logical bytes, stored bytes unique to it and "
                                   "shared with its parents. Without: the repository's commits, packs, objects, "
                                   "stored and logical bytes, dedup ratio.")
    p.set_defaults(handler=cmd_stats)
    p.add_argument("rev", nargs="?", metavar="REV")
    p.add_argument("--json", action="store_true")
