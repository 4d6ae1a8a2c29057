"""Row-level three-way merge of a table both sides changed (.csv, .tsv, .jsonl).

The merge (ops/merge.py) hands over a file conflict whose two sides are
tables; the three versions are parsed by ops/table.py (the one parser).

* **Keyed** (key columns from ``--key`` or the attributes file): rows are
  matched by key and merged cell by cell, columns by name.  Different cells
  of one row changed on the two sides merge; the same cell changed two ways
  is a conflict naming the key, the column and the three values; a row
  deleted on one side and edited on the other is a conflict; rows added on
  both sides with the same key merge cell by cell against nothing.  The
  header is merged by columns: columns added on either side are kept (ours
  first, then theirs' new ones), a column deleted on one side is dropped
  (a conflict if the other side changed a value in it).  Rows keep ours'
  order; rows only theirs added follow, in theirs' order.
* **Unkeyed**: a line-based three-way merge of the rows (header kept; it
  must be the same on all three sides, or the table conflicts asking for a
  key).  Changes to different rows merge; both sides inserting at the same
  place (both appended rows, say) keeps both, ours first (once, when the
  rows are the same); overlapping different changes conflict.

Rows nobody changed keep their exact bytes; merged rows are written by
``table.write_table``.  With ``prefer`` ("ours"/"theirs", from
``--strategy``), conflicting cells and rows take that side instead of
conflicting.  A missing key column or a key that is not unique raises
TableKeyError (the merge stops); a side that does not parse raises
TableParseError (the merge reports the file as a conflict with that error).
"""

from __future__ import annotations

import bisect
import difflib
import gc
from collections.abc import Sequence
from dataclasses import dataclass

from commitfs.errors import TableError, TableKeyError
from commitfs.model.draft import NewFile
from commitfs.model.objects import Kind, TreeEntry
from commitfs.ops.changes import Conflict
from commitfs.ops.table import LINE_FORMATS, Row, open_table, table_format, write_table
from commitfs.repo.repository import Repository

_ABSENT = object()


@dataclass
class _Side:
    name: str
    data: bytes
    header: tuple[str, ...] | None
    rows: list[Row]

    def raw(self, row: Row) -> bytes:
        b = self.data[row.start:row.end]
        return b if b.endswith(b"\n") else b + b"\n"

    def raw_header(self, start: int) -> bytes:
        b = self.data[:start]
        return b if b.endswith(b"\n") or not b else b + b"\n"


def _read(repo: Repository, entry, path: str, side: str) -> tuple[_Side, int]:
    data = bytes(repo.load_file(entry.id)) if isinstance(entry, TreeEntry) and entry.size else b""
    t = open_table(data, path, side)
    return _Side(side, data, t.header, list(t)), t.data_start


def _show(v) -> str:
    return "(absent)" if v is _ABSENT else repr(v)


def _merge_value(b, o, t):
    """The three-way merge of one value; _ABSENT stands for none; raises LookupError on a conflict."""
    if o == t:
        return o
    if b == o:
        return t
    if b == t:
        return o
    raise LookupError


def merge_tables(repo: Repository, conflict: Conflict, keys: Sequence[str] = (),
                 prefer: str | None = None) -> NewFile | Conflict:
    # Millions of small objects (rows): the cycle collector would walk them again and
    # again while they are made, for nothing (rows hold no cycles).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _merge_tables(repo, conflict, keys, prefer)
    finally:
        if enabled:
            gc.enable()


def _merge_tables(repo: Repository, conflict: Conflict, keys: Sequence[str], prefer: str | None):
    if keys:
        got = _merge_regions(repo, conflict, tuple(keys), prefer)
        if got is not None:
            return got
    return _merge_whole(repo, conflict, keys, prefer)


def _merge_whole(repo: Repository, conflict: Conflict, keys: Sequence[str], prefer: str | None):
    """The merge parsing all three versions whole (the fallback; the unkeyed merge)."""
    path = conflict.path
    fmt = table_format(path)
    base, bstart = _read(repo, conflict.base if isinstance(conflict.base, TreeEntry) and
                         conflict.base.kind.is_file else None, path, "base")
    ours, ostart = _read(repo, conflict.ours, path, "ours")
    theirs, tstart = _read(repo, conflict.theirs, path, "theirs")
    if keys:
        pieces, details = _keyed(fmt, path, base, ours, theirs, tuple(keys), prefer, ostart, tstart)
    else:
        if ours.header != theirs.header or (base.header != ours.header and (base.rows or base.data)):
            conflict.note = ("the header changed; a line-based merge keeps one header: give key columns "
                             "(--key or the attributes file) to merge by columns")
            return conflict
        pieces, details = _unkeyed(ours, theirs, base, prefer, ostart)
    if details:
        conflict.details = details
        conflict.note = f"{len(details)} conflicting {'cells/rows' if keys else 'row ranges'}"
        return conflict
    data = b"".join(pieces)
    executable = isinstance(conflict.ours, TreeEntry) and conflict.ours.kind is Kind.EXEC
    return NewFile(data=data, executable=executable, size=len(data))


# --- keyed ----------------------------------------------------------------------------------
def _index(side: _Side, keys: tuple[str, ...], path: str) -> tuple[dict[tuple, Row], list[tuple]]:
    """{key: row} and the keys in row order; TableKeyError for a missing key column or a duplicate."""
    out: dict[tuple, Row] = {}
    order: list[tuple] = []
    positions = None
    if side.header is not None:
        missing = [k for k in keys if k not in side.header]
        if missing and (side.rows or side.data):
            raise TableKeyError(f"{path} ({side.name} side): no key column {missing[0]!r} "
                                f"(columns: {', '.join(side.header)})")
        positions = [side.header.index(k) for k in keys]
    for row in side.rows:
        try:
            if positions is not None:
                v = row.values
                key = tuple(v[i] for i in positions)
            else:
                key = tuple(row.values[k] for k in keys)
            if key in out:
                shown = key[0] if len(key) == 1 else key
                raise TableKeyError(f"{path} ({side.name} side): key column {', '.join(keys)}: key {shown!r} is "
                                    f"not unique (lines {out[key].line} and {row.line})", key)
        except KeyError as exc:
            raise TableKeyError(f"{path} ({side.name} side), line {row.line}: the row has no key column "
                                f"{exc.args[0]!r}") from None
        except TypeError:
            raise TableKeyError(f"{path} ({side.name} side), line {row.line}: a key value is not hashable") from None
        out[key] = row
        order.append(key)
    return out, order


def _columns(b, o, t) -> list[str]:
    b, o, t = list(b or ()), list(o or ()), list(t or ())
    return [c for c in o if c in t or c not in b] + [c for c in t if c not in o and c not in b]


def _keyed(fmt, path, base: _Side, ours: _Side, theirs: _Side, keys, prefer, ostart, tstart):
    (ib, _), (io_, oorder), (it, torder) = (_index(s, keys, path) for s in (base, ours, theirs))
    jsonl = fmt == "jsonl"
    header = None if jsonl else tuple(_columns(base.header, ours.header, theirs.header))
    details: list[dict] = []
    out_rows: list = []  # bytes (kept as they were) or a merged dict
    # One layout on all sides (the common case): rows compare as tuples, no dict per row.
    same_all = not jsonl and header == ours.header == theirs.header and (base.header in (header, ())
                                                                          or not base.rows)

    def eq(x: Row | None, xs: _Side, y: Row | None, ys: _Side) -> bool:
        if x is None or y is None:
            return x is y
        return x.values == y.values if same_all else x.as_dict(xs.header) == y.as_dict(ys.header)

    def conflict(key, column, b, o, t, what="cell"):
        shown = key[0] if len(key) == 1 else key
        text = (f"key {shown!r}, column {column!r}: base {_show(b)}, ours {_show(o)}, theirs {_show(t)}"
                if what == "cell" else f"key {shown!r}: {what}")
        details.append({"key": list(key), "column": column, "base": None if b is _ABSENT else b,
                        "ours": None if o is _ABSENT else o, "theirs": None if t is _ABSENT else t, "text": text})

    def cells(key, db, do, dt):
        cols = list(do.keys()) + [c for c in dt.keys() if c not in do] + [c for c in db.keys()
                                                                          if c not in do and c not in dt]
        merged = {}
        for c in cols:
            b, o, t = db.get(c, _ABSENT), do.get(c, _ABSENT), dt.get(c, _ABSENT)
            try:
                v = _merge_value(b, o, t)
            except LookupError:
                if prefer is None:
                    conflict(key, c, b, o, t)
                    continue
                v = o if prefer == "ours" else t
            if header is not None and c not in header:
                if v is not _ABSENT and v != db.get(c, _ABSENT) and b is not _ABSENT:
                    if prefer is None:
                        conflict(key, c, b, o, t)
                continue
            if v is not _ABSENT:
                merged[c] = v
        return merged

    def as_dict(row: Row | None, side: _Side) -> dict | None:
        return row.as_dict(side.header) if row is not None else None

    same_layout = header == ours.header
    for key in oorder:
        ro = io_[key]
        rb = ib.get(key)
        rt = it.get(key)
        if rb is not None and rt is None:  # theirs deleted the row
            if eq(ro, ours, rb, base) or prefer == "theirs":
                continue
            if prefer is None:
                conflict(key, None, as_dict(rb, base), as_dict(ro, ours), _ABSENT, "deleted by theirs, edited by ours")
                continue
        if rt is not None and same_layout and (eq(rt, theirs, ro, ours) or eq(rt, theirs, rb, base)):
            out_rows.append(ours.raw(ro))  # theirs left it alone (or agrees): ours' bytes
            continue
        if rt is None:
            out_rows.append(ours.raw(ro) if same_layout else as_dict(ro, ours))
            continue
        if same_all and rb is not None and eq(ro, ours, rb, base):
            out_rows.append(theirs.raw(rt))  # only theirs changed it
            continue
        out_rows.append(cells(key, as_dict(rb, base) or {}, as_dict(ro, ours), as_dict(rt, theirs)))
    for key in torder:
        if key in io_:
            continue
        rt = it[key]
        rb = ib.get(key)
        if rb is not None:  # ours deleted it
            if eq(rt, theirs, rb, base) or prefer == "ours":
                continue
            if prefer is None:
                conflict(key, None, as_dict(rb, base), _ABSENT, as_dict(rt, theirs), "deleted by ours, edited by theirs")
                continue
        out_rows.append(theirs.raw(rt) if header == theirs.header else as_dict(rt, theirs))
    if details:
        return [], details
    pieces: list[bytes] = []
    if header is not None:
        pieces.append(ours.raw_header(ostart) if header == ours.header and ostart
                      else b"".join(write_table(fmt, header, [])))
    for r in out_rows:
        if isinstance(r, bytes):
            pieces.append(r)
        else:
            pieces.extend(write_table(fmt, None, [r if jsonl else [_cell(r.get(c)) for c in header]]))
    return pieces, []


def _detail(key, column, b, o, t, what="cell") -> dict:
    shown = key[0] if len(key) == 1 else key
    text = (f"key {shown!r}, column {column!r}: base {_show(b)}, ours {_show(o)}, theirs {_show(t)}"
            if what == "cell" else f"key {shown!r}: {what}")
    return {"key": list(key), "column": column, "base": None if b is _ABSENT else b,
            "ours": None if o is _ABSENT else o, "theirs": None if t is _ABSENT else t, "text": text}


# --- keyed, through the row diff's regions ---------------------------------------------------
def _line_at(side, off: int) -> bytes:
    """The line of a tablediff side starting at ``off``, with its line break (if any)."""
    i = bisect.bisect_right(side.manifest.ends, off)
    while i < len(side.ids):
        s = side.start(i)
        pos = side.chunks(i, i + 1)[0].find(b"\n", max(off - s, 0))
        if pos >= 0:
            return side.read(off, s + pos + 1)
        i += 1
    return side.read(off, side.size)


def _find_line(data: bytes, body: bytes, est: int, lo: int) -> int | None:
    """Where the whole line ``body`` starts in ``data`` (at or after ``lo``), searched
    in a window around ``est`` that grows until it covers everything."""
    w = 4096
    n, size = len(body), len(data)
    while True:
        a, z = max(lo, est - w), min(size, est + w + n)
        p = data.find(body, a, z)
        while p >= 0:
            if (p == lo or data[p - 1] == 10) and (p + n == size or data[p + n] == 10):
                return p
            p = data.find(body, p + 1, z)
        if a == lo and z == size:
            return None
        w *= 8


def _merge_regions(repo: Repository, conflict: Conflict, keys: tuple[str, ...], prefer: str | None):
    """The keyed merge at the cost of the change, or None where it cannot apply.

    The base is diffed against each side through the row diff's region path
    (ops/tablediff.py: only the chunk regions that differ are read and only
    their differing lines parsed); the two keyed change sets are combined
    cell by cell, and ours' bytes are patched: the lines of rows theirs
    changed or deleted are found in ours (the base's line, byte for byte,
    searched near where the previous one was), replaced or cut; rows only
    theirs added follow ours' rows in theirs' order.  Nothing else is parsed.
    None (the caller parses the three versions whole) when the region path
    does not apply to either diff (a side empty or absent, a quoted field
    spanning lines, a repeated line, a side that does not parse, a key
    problem: the whole parse then reports it with its line number), when
    the header differs between the sides (columns are merged by name there),
    or when a line cannot be found in ours.  Bound: a duplicate key whose
    every copy lies in chunks equal on all three sides is not seen (the row
    diff's bound); the whole parse would refuse it."""
    from commitfs.ops.tablediff import _NeedFullParse, _header_of, diff_table
    from commitfs.ops.tablediff import _Side as _Chunks

    path = conflict.path
    fmt = table_format(path)
    entries = (conflict.base, conflict.ours, conflict.theirs)
    if fmt not in LINE_FORMATS or not all(isinstance(e, TreeEntry) and e.kind.is_file and e.size for e in entries):
        return None
    base_e, ours_e, theirs_e = entries
    cache: dict = {}
    try:
        do = diff_table(repo, base_e, ours_e, path, keys, method="regions", cache=cache)
        dt = diff_table(repo, base_e, theirs_e, path, keys, method="regions", cache=cache)
    except (_NeedFullParse, TableError):
        return None
    header = do.old_header
    if not (do.new_header == header == dt.new_header == dt.old_header):
        return None
    stats = [0]
    bc = _Chunks(repo, base_e, path, "base", cache, stats)
    oc = _Chunks(repo, ours_e, path, "ours", cache, stats)
    tc = _Chunks(repo, theirs_e, path, "theirs", cache, stats)
    ostart = _header_of(oc, fmt)[1]
    data = b"".join(oc.chunks(0, len(oc.ids)))
    co = {r.key: r for r in do.rows}
    jsonl = fmt == "jsonl"

    def ours_end(y: int) -> int:
        e = data.find(b"\n", y)
        return len(data) if e < 0 else e + 1

    def theirs_line(r) -> bytes:
        b = _line_at(tc, r.new_offset)
        return b if b.endswith(b"\n") else b + b"\n"

    edits: list[tuple[int, int, bytes]] = []   # (start, end, replacement) on ours' bytes
    appends: list[tuple[int, bytes]] = []      # (offset in theirs, line)
    details: list[tuple[tuple, dict]] = []

    def cells(key, order, db, do_, dt_) -> dict:
        cols = list(do_) + [c for c in dt_ if c not in do_] + [c for c in db if c not in do_ and c not in dt_]
        merged = {}
        for c in cols:
            b, o, t = db.get(c, _ABSENT), do_.get(c, _ABSENT), dt_.get(c, _ABSENT)
            try:
                v = _merge_value(b, o, t)
            except LookupError:
                if prefer is None:
                    details.append((order, _detail(key, c, b, o, t)))
                    continue
                v = o if prefer == "ours" else t
            if v is not _ABSENT:
                merged[c] = v
        return merged

    # Theirs' changes to rows ours left alone: their lines in ours, found in base order.
    wanted = sorted((r.old_offset, r) for r in dt.rows if r.key not in co and r.status != "added")
    px = py = 0
    for x, r in wanted:
        line = _line_at(bc, x)
        body = line[:-1] if line.endswith(b"\n") else line
        y = _find_line(data, body, x + (py - px), ostart)
        if y is None:
            return None
        px, py = x, y
        edits.append((y, ours_end(y), theirs_line(r) if r.status == "changed" else b""))
    for r in dt.rows:
        ro = co.get(r.key)
        if ro is None:
            if r.status == "added":
                appends.append((r.new_offset, theirs_line(r)))
            continue
        if ro.status == "removed" and r.status == "removed":
            continue
        if ro.status == "removed":  # theirs edited it
            if prefer is None:
                details.append(((1, r.new_offset), _detail(r.key, None, r.old, ro.new or _ABSENT, r.new,
                                                           "deleted by ours, edited by theirs")))
            elif prefer == "theirs":
                appends.append((r.new_offset, theirs_line(r)))
            continue
        if r.status == "removed":  # ours edited it
            if prefer is None:
                details.append(((0, ro.new_offset), _detail(r.key, None, ro.old, ro.new, _ABSENT,
                                                            "deleted by theirs, edited by ours")))
            elif prefer == "theirs":
                edits.append((ro.new_offset, ours_end(ro.new_offset), b""))
            continue
        if ro.new == r.new:
            continue
        merged = cells(r.key, (0, ro.new_offset), ro.old or {}, ro.new, r.new)
        row = merged if jsonl else [_cell(merged.get(c)) for c in header]
        edits.append((ro.new_offset, ours_end(ro.new_offset), b"".join(write_table(fmt, None, [row]))))
    if details:
        details.sort(key=lambda d: d[0])
        conflict.details = [d for _, d in details]
        conflict.note = f"{len(details)} conflicting cells/rows"
        return conflict
    edits.sort()
    pieces: list[bytes] = []
    pos = 0
    for s, e, rep in edits:
        if s < pos:
            return None  # two edits of one line: cannot happen with unique keys; be safe
        pieces.append(data[pos:s])
        pieces.append(rep)
        pos = e
    pieces.append(data[pos:])
    out = b"".join(pieces)
    if out and not out.endswith(b"\n"):
        out += b"\n"
    if appends:
        appends.sort()
        out += b"".join(line for _, line in appends)
    executable = conflict.ours.kind is Kind.EXEC
    return NewFile(data=out, executable=executable, size=len(out))


def _cell(v) -> str:
    return "" if v is None or v is _ABSENT else str(v)


# --- unkeyed: a three-way merge of row sequences ---------------------------------------------
def _hunks(base: list, other: list) -> list[tuple[int, int, int, int]]:
    sm = difflib.SequenceMatcher(None, base, other, autojunk=False)
    return [(i1, i2, j1, j2) for tag, i1, i2, j1, j2 in sm.get_opcodes() if tag != "equal"]


def _token(r: Row):
    return tuple(sorted(r.values.items(), key=lambda kv: kv[0])) if isinstance(r.values, dict) else r.values


def _unkeyed(ours: _Side, theirs: _Side, base: _Side, prefer, ostart):
    tb = [_token(r) for r in base.rows]
    to = [_token(r) for r in ours.rows]
    tt = [_token(r) for r in theirs.rows]
    # Hunks: (base start, base end, side, side start, side end); sorted by base range.
    hunks = sorted([(i1, i2, 0, j1, j2) for i1, i2, j1, j2 in _hunks(tb, to)] +
                   [(i1, i2, 1, j1, j2) for i1, i2, j1, j2 in _hunks(tb, tt)], key=lambda h: (h[0], h[1], h[2]))
    # Base rows unchanged in ours keep ours' bytes.
    base_to_ours = {}
    for tag, i1, i2, j1, _j2 in difflib.SequenceMatcher(None, tb, to, autojunk=False).get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                base_to_ours[i1 + k] = j1 + k

    def base_bytes(a: int, b: int) -> list[bytes]:
        return [ours.raw(ours.rows[base_to_ours[k]]) if k in base_to_ours else base.raw(base.rows[k])
                for k in range(a, b)]

    sides = (ours, theirs)
    tokens = (to, tt)

    def version(group, side, lo, hi, as_bytes):
        """Base rows lo..hi with ``side``'s hunks of the group applied."""
        out, pos = [], lo
        for h in group:
            if h[2] != side:
                continue
            out += base_bytes(pos, h[0]) if as_bytes else tb[pos:h[0]]
            out += ([sides[side].raw(sides[side].rows[k]) for k in range(h[3], h[4])] if as_bytes
                    else tokens[side][h[3]:h[4]])
            pos = h[1]
        out += base_bytes(pos, hi) if as_bytes else tb[pos:hi]
        return out

    groups: list[list] = []
    for h in hunks:
        if groups:
            g = groups[-1]
            gs, ge = g[0][0], max(x[1] for x in g)
            if h[0] < ge or (h[0] == h[1] == gs == ge):
                g.append(h)
                continue
        groups.append([h])
    out: list[bytes] = [ours.raw_header(ostart)] if ours.header is not None and ostart else []
    details: list[dict] = []
    pos = 0
    for g in groups:
        lo, hi = g[0][0], max(x[1] for x in g)
        out += base_bytes(pos, lo)
        pos = hi
        in_sides = {h[2] for h in g}
        if len(in_sides) == 1:
            out += version(g, g[0][2], lo, hi, True)
            continue
        if version(g, 0, lo, hi, False) == version(g, 1, lo, hi, False):
            out += version(g, 0, lo, hi, True)
        elif all(h[0] == h[1] == lo for h in g):  # both inserted here (both appended): ours first
            out += version(g, 0, lo, hi, True) + version(g, 1, lo, hi, True)
        elif prefer in ("ours", "theirs"):
            out += version(g, 0 if prefer == "ours" else 1, lo, hi, True)
        else:
            first = {h[2]: h for h in reversed(g)}
            line_o = ours.rows[first[0][3]].line if first[0][3] < len(ours.rows) else None
            line_t = theirs.rows[first[1][3]].line if first[1][3] < len(theirs.rows) else None
            details.append({"base_rows": [lo + 1, hi], "ours_line": line_o, "theirs_line": line_t,
                            "text": f"rows {lo + 1}..{hi} of the base changed differently on both sides "
                                    f"(ours at line {line_o}, theirs at line {line_t})"})
    out += base_bytes(pos, len(tb))
    return out, details
