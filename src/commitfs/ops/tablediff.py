"""Row diffs of tables: which rows were added, removed, changed (and which cells), moved.

``diff_table(repo, old_entry, new_entry, path, keys=())`` compares two
versions of a .csv, .tsv, .jsonl or Parquet file (tree entries; None for a
side where the file does not exist).  Without ``keys`` rows are matched by
position; with ``keys`` (column names, several for a compound key) by the
key's values, whatever the order.

How the cost follows the change (CSV, TSV, JSONL)
---------------------------------------------------
A file's manifest lists its chunk ids.  The two lists are aligned
(difflib's SequenceMatcher on ids, a few thousand entries even for a 10M-row
table); runs of chunks equal on both sides hold the same bytes and so the
same rows, and are neither read nor parsed.  Each run that differs becomes a
*region* on each side, widened to whole lines: where the bytes before the
first line break of the run's first chunks are equal on both sides (and
likewise after the last line break of its last chunks), the line crossing
the boundary is the same on both and the region starts (ends) at that line
break, without reading the neighbour; otherwise back to the last line break
of the chunks before it and on to the first line break after it (reading at
most the neighbouring chunks, themselves equal on both sides); regions that
meet are merged.  Inside a pair of regions the lines are compared as bytes
first (split and hashed in C); only lines that differ are parsed.  Keyed,
the whole lines a region pair begins and ends with in common (found by a
binary search over slices, memcmp in C) are not even split, and a long
middle is cut at a line found once on the other side and each half trimmed
again (_spans): a region with one edit splits a line or two, a region with
many edits a few short spans.

* Unkeyed: lines are aligned per region pair: by sets when every line is
  unique and the common lines keep their order (the usual case, in C), by
  SequenceMatcher otherwise.  A line that left one place and appears
  identical in another (in the same region or another one) is *moved*; in a
  replaced block the remaining lines pair up by position as *changed* (with
  their cells), the rest are *added* or *removed*.
* Keyed: each region's lines not on the other side are found as set
  differences of byte strings, pooled over all regions (a line in both pools
  moved between regions and is unchanged), parsed, and matched by key.  A
  row outside every region lies in chunks equal on both sides, so it is the
  same row on both sides: with unique keys no row is missed.

Bounds: reads and memory are proportional to the changed chunks plus one
neighbour on each side (about 80 KiB each), not to the table; a 10M-row
table with 100 rows changed in one place reads a few hundred KiB and parses
some 200 rows as records; 100 rows scattered at random change up to 200
chunks, which are read and split, but still only ~200 rows are parsed.
Duplicate keys are found among the lines of the regions: a differing row's
key again on a line of the region where its old or new line lies (by a byte
search for the key value in that region, parsing the lines found; for many
keys in a large region, one key column of unquoted CSV/TSV, by counting each
line's key field in one regular-expression pass), and among every row on the
full path below; a duplicate with no copy in that region is not reported.  Row positions are byte offsets
(``old_offset``/``new_offset``); line numbers are known on the full path and
in a region that starts right after the header (elsewhere counting them
would read every chunk before).

The region path assumes one record per line.  It falls back to the full path
when a region holds a quoted field spanning lines (odd quote count on a
line), repeats a line, or does not parse from its line start (the full path
then reports the real error with its line number).

The full path (Parquet, multi-line records, a side that is absent) streams
both tables through ops/table.py (Parquet through a seekable file over the
chunks, read by row group): keyed, the old side's rows are held in a dict by
key while the new side streams past it (memory: the old table); unkeyed,
both sides' rows are held and aligned; a table on one side only streams its
rows as added (removed) without holding them.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

from commitfs.errors import TableError, TableKeyError, TableParseError
from commitfs.model.objects import EMPTY_MANIFEST, TreeEntry
from commitfs.ops.table import LINE_FORMATS, Row, iter_records, open_table, table_format
from commitfs.repo.reader import FileObject, FileReader
from commitfs.repo.repository import Repository


@dataclass(frozen=True)
class CellChange:
    column: str
    old: Any
    new: Any

    def to_json(self) -> dict:
        return {"column": self.column, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class RowChange:
    status: str                  # "added", "removed", "changed", "moved"
    key: tuple | None            # the key's values (keyed diffs)
    old: dict | None             # the row's cells on each side (None where absent)
    new: dict | None
    cells: tuple[CellChange, ...] = ()   # changed rows: the cells that differ
    old_offset: int | None = None        # byte offset of the row in each version
    new_offset: int | None = None
    old_line: int | None = None          # line numbers, where known (full path)
    new_line: int | None = None

    def to_json(self) -> dict:
        return {"status": self.status, "key": list(self.key) if self.key is not None else None,
                "old": self.old, "new": self.new, "cells": [c.to_json() for c in self.cells],
                "old_offset": self.old_offset, "new_offset": self.new_offset,
                "old_line": self.old_line, "new_line": self.new_line}


@dataclass
class TableDiff:
    path: str
    format: str
    keys: tuple[str, ...]
    old_header: tuple[str, ...] | None
    new_header: tuple[str, ...] | None
    columns_added: list[str] = field(default_factory=list)
    columns_removed: list[str] = field(default_factory=list)
    columns_renamed: list[tuple[str, str]] = field(default_factory=list)  # (old, new) at one position
    rows: list[RowChange] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"added": 0, "removed": 0, "changed": 0, "moved": 0})
    #: Rows counted but not kept (``max_rows``).
    rows_omitted: int = 0
    #: "regions" (only changed chunks parsed) or "full".
    method: str = "full"
    #: Chunk bytes this diff loaded (both sides; equal chunks once).
    bytes_read: int = 0
    #: on_row of diff_table: rows go there instead of ``rows``.
    _sink: Callable[[RowChange], None] | None = field(default=None, repr=False, compare=False)

    @property
    def header_changed(self) -> bool:
        return bool(self.columns_added or self.columns_removed or self.columns_renamed)

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format, "keys": list(self.keys),
                "old_header": list(self.old_header) if self.old_header is not None else None,
                "new_header": list(self.new_header) if self.new_header is not None else None,
                "columns_added": self.columns_added, "columns_removed": self.columns_removed,
                "columns_renamed": [list(p) for p in self.columns_renamed],
                "counts": dict(self.counts), "rows": [r.to_json() for r in self.rows],
                "rows_omitted": self.rows_omitted, "method": self.method, "bytes_read": self.bytes_read}

    def _add(self, change: RowChange, max_rows: int | None) -> None:
        self.counts[change.status] += 1
        if self._sink is not None:
            self._sink(change)
        elif max_rows is None or len(self.rows) < max_rows:
            self.rows.append(change)
        else:
            self.rows_omitted += 1


class _NeedFullParse(Exception):
    pass


# --- one side's bytes -------------------------------------------------------------
class _Side:
    """One version's chunks, loaded on demand (equal chunks shared through ``cache``)."""

    _CACHE_MAX = 512  # chunks (~40 MiB): region reads revisit at most a neighbour

    def __init__(self, repo: Repository, entry: TreeEntry | None, path: str, side: str, cache: dict, stats: list):
        self.repo, self.path, self.side = repo, path, side
        m = repo.load_manifest(entry.id) if entry is not None else EMPTY_MANIFEST
        self.manifest = m
        self.ids = list(m.chunk_ids)
        self.size = m.size
        self._cache, self._stats = cache, stats

    def start(self, i: int) -> int:
        return self.manifest.chunk_start(i)

    def chunks(self, i1: int, i2: int) -> list[bytes]:
        missing = [oid for oid in dict.fromkeys(self.ids[i1:i2]) if oid not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self._CACHE_MAX:
                self._cache.clear()
            for oid, data in zip(missing, self.repo.load_chunks(missing)):
                self._cache[oid] = bytes(data)
                self._stats[0] += len(data)
        return [self._cache[oid] for oid in self.ids[i1:i2]]

    def read(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        i1, i2 = self.manifest.chunk_range(start, end - start)
        data = b"".join(self.chunks(i1, i2))
        base = self.start(i1)
        return data[start - base:end - base]

    def source(self, fmt: str):
        """What open_table reads: the chunks in order, or for Parquet (read
        from its footer, by row group) a seekable file over them."""
        if fmt != "parquet":
            return self.stream()
        stats = self._stats

        class Counting(FileReader):  # counts the bytes it loads into bytes_read
            def read(self, offset: int, size: int) -> bytes:
                data = super().read(offset, size)
                stats[0] += len(data)
                return data

        return io.BufferedReader(FileObject(Counting(self.repo, self.manifest)), 1024 * 1024)

    def stream(self) -> Iterator[bytes]:
        """Every chunk in order, 64 at a time, not kept."""
        for i in range(0, len(self.ids), 64):
            batch = self.repo.load_chunks(self.ids[i:i + 64])
            for data in batch:
                self._stats[0] += len(data)
                yield data

    def line_start_before(self, i: int) -> int:
        """Offset just after the last line break in chunks [0, i), or 0."""
        while i > 0:
            data = self.chunks(i - 1, i)[0]
            pos = data.rfind(b"\n")
            if pos >= 0:
                return self.start(i - 1) + pos + 1
            i -= 1
        return 0

    def line_end_after(self, i: int) -> int:
        """Offset just after the first line break in chunks [i, ...), or the size.
        (Not looking into chunk i-1, which differs between the sides: both
        sides then extend by the same bytes of the same equal chunks.)"""
        while i < len(self.ids):
            data = self.chunks(i, i + 1)[0]
            pos = data.find(b"\n")
            if pos >= 0:
                return self.start(i) + pos + 1
            i += 1
        return self.size


# --- headers and cells ------------------------------------------------------------
def _header_of(side: _Side, fmt: str) -> tuple[tuple[str, ...] | None, int]:
    if not side.ids:
        return None, 0

    def lazy():
        for i in range(len(side.ids)):
            yield side.chunks(i, i + 1)[0]

    t = open_table(lazy(), side.path, side.side, fmt)
    return t.header, t.data_start


def _columns(diff: TableDiff) -> dict[str, str]:
    """Old column name -> new column name, for the columns on both sides."""
    ho, hn = diff.old_header, diff.new_header
    if ho is None or hn is None:
        return {}
    removed = [c for c in ho if c not in hn]
    added = [c for c in hn if c not in ho]
    renamed = [(ho[i], hn[i]) for i in range(min(len(ho), len(hn))) if ho[i] in removed and hn[i] in added]
    diff.columns_renamed = renamed
    gone = {o for o, _ in renamed}
    came = {n for _, n in renamed}
    diff.columns_removed = [c for c in removed if c not in gone]
    diff.columns_added = [c for c in added if c not in came]
    mapping = {c: c for c in ho if c in hn}
    mapping.update(renamed)
    return mapping


def _cells(old: dict, new: dict, mapping: dict[str, str] | None) -> tuple[CellChange, ...]:
    if mapping is None:  # JSONL: the union of the objects' members
        names = list(dict.fromkeys([*old, *new]))
        return tuple(CellChange(c, old.get(c), new.get(c)) for c in names if old.get(c) != new.get(c))
    return tuple(CellChange(n, old.get(o), new.get(n)) for o, n in mapping.items() if old.get(o) != new.get(n))


def _token(row: Row) -> Any:
    v = row.values
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict) else v


# --- alignment --------------------------------------------------------------------
def _align(a: Sequence, b: Sequence) -> Iterator[tuple[str, int | None, int | None]]:
    """Positional row operations between two token lists: ("moved", i, j),
    ("changed", i, j), ("removed", i, None), ("added", None, j), in order."""
    fast = _align_unique(a, b)
    if fast is not None:
        yield from fast
        return
    yield from _align_difflib(a, b)


def _align_difflib(a: Sequence, b: Sequence) -> Iterator[tuple[str, int | None, int | None]]:
    ops = [op for op in SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
    new_only: dict[Any, deque] = defaultdict(deque)
    for _, _, _, j1, j2 in ops:
        for j in range(j1, j2):
            new_only[b[j]].append(j)
    moved: dict[int, int] = {}
    for _, i1, i2, _, _ in ops:
        for i in range(i1, i2):
            q = new_only.get(a[i])
            if q:
                moved[i] = q.popleft()
    moved_new = set(moved.values())
    for _, i1, i2, j1, j2 in ops:
        olds = [i for i in range(i1, i2) if i not in moved]
        news = [j for j in range(j1, j2) if j not in moved_new]
        for i in range(i1, i2):
            if i in moved:
                yield "moved", i, moved[i]
        for i, j in zip(olds, news):
            yield "changed", i, j
        for i in olds[len(news):]:
            yield "removed", i, None
        for j in news[len(olds):]:
            yield "added", None, j


def _align_unique(a: Sequence, b: Sequence) -> list | None:
    """The same operations without difflib, when it is easy: every token
    unique on its side and the tokens both sides have in the same order (no
    moves).  Then the tokens one side only has fall in the gaps between common
    ones, and pair up by position within each gap.  Sets and comprehensions
    run in C: a 1M-line region with 100 changes takes a fraction of a second,
    where SequenceMatcher takes many."""
    sa, sb = set(a), set(b)
    if len(sa) != len(a) or len(sb) != len(b):
        return None
    common = sa & sb
    if [t for t in a if t in common] != [t for t in b if t in common]:
        return None
    ia = [i for i, t in enumerate(a) if t not in common]
    ib = [j for j, t in enumerate(b) if t not in common]
    gaps: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for k, i in enumerate(ia):
        gaps[i - k][0].append(i)   # i - k: the common tokens before it
    for k, j in enumerate(ib):
        gaps[j - k][1].append(j)
    ops = []
    for g in sorted(gaps):
        olds, news = gaps[g]
        ops.extend(("changed", i, j) for i, j in zip(olds, news))
        ops.extend(("removed", i, None) for i in olds[len(news):])
        ops.extend(("added", None, j) for j in news[len(olds):])
    return ops


def _key_getter(cols: Sequence[str], header, side: _Side):
    """row -> its key, fast for tuple rows (CSV, TSV)."""
    if header is not None and all(c in header for c in cols):
        idx = [header.index(c) for c in cols]
        if len(idx) == 1:
            i = idx[0]
            return lambda row: (row.values[i],) if isinstance(row.values, tuple) else _key_of(row, cols, header, side)
        return lambda row: (tuple(row.values[i] for i in idx) if isinstance(row.values, tuple)
                            else _key_of(row, cols, header, side))
    return lambda row: _key_of(row, cols, header, side)


def _key_of(row: Row, cols: Sequence[str], header, side: _Side) -> tuple:
    v = row.values
    if isinstance(v, tuple) and header is not None and all(c in header for c in cols):
        return tuple(v[header.index(c)] for c in cols)  # no dict per row: the full path makes millions
    d = row.as_dict(header)
    try:
        return tuple(d[c] for c in cols)
    except KeyError as exc:
        where = f"line {row.line}" if row.line is not None else f"byte {row.start}"
        raise TableKeyError(f"{side.path} ({side.side} side), {where}: the row has no key column {exc.args[0]!r}") from None


def _duplicate(side: _Side, key: tuple, row: Row | None) -> TableKeyError:
    shown = key[0] if len(key) == 1 else key
    if row is None:
        where = "on a line both versions have"
    else:
        where = "again at " + (f"line {row.line}" if row.line is not None else f"byte {row.start}")
    return TableKeyError(f"{side.path} ({side.side} side): key {shown!r} is not unique ({where})", key)


# --- the diff ---------------------------------------------------------------------
def diff_table(repo: Repository, old_entry: TreeEntry | None, new_entry: TreeEntry | None, path: str,
               keys: Sequence[str] = (), *, max_rows: int | None = None, method: str | None = None,
               on_row: Callable[[RowChange], None] | None = None, cache: dict | None = None) -> TableDiff:
    """The row diff of a table's two versions (see the module's docstring).

    ``max_rows``: keep at most this many RowChange records (all are counted).
    ``on_row``: called with each RowChange, in order, instead of keeping them
    (``rows`` stays empty): output that never holds every row.  On the region
    path rows are handed over at the end (it may still fall back to the full
    path, which streams as it goes); a table that is only on one side streams
    its rows without holding them.
    ``method="full"``: parse every row even where the region path would do
    (for comparisons and benchmarks); ``method="regions"``: the region path
    or an exception (_NeedFullParse, or the TableParseError it met), never
    the full path.
    ``cache``: a dict of chunk id -> bytes shared between calls (the row
    merge diffs the base against both sides and then patches ours).
    Raises TableParseError (file, side, line) and TableKeyError (a missing
    key column, a duplicate key)."""
    fmt = table_format(path)
    if fmt is None:
        raise TableError(f"{path}: not a table (.csv, .tsv, .jsonl, .parquet)")
    keys = tuple(keys)
    cache = {} if cache is None else cache
    stats = [0]
    old = _Side(repo, old_entry, path, "old", cache, stats)
    new = _Side(repo, new_entry, path, "new", cache, stats)
    diff = TableDiff(path, fmt, keys, None, None)
    try:
        if fmt in LINE_FORMATS and old.ids and new.ids and method != "full":
            try:
                _diff_regions(diff, old, new, keys, None if on_row is not None else max_rows)
                diff.method = "regions"
                if on_row is not None:
                    for r in diff.rows:
                        on_row(r)
                    diff.rows = []
                return diff
            except (_NeedFullParse, TableParseError):
                if method == "regions":
                    raise  # the caller has its own fallback (the row merge)
                diff.rows.clear()
                diff.rows_omitted = 0
                diff.counts = dict.fromkeys(diff.counts, 0)
        if method == "regions":
            raise _NeedFullParse
        diff._sink = on_row
        _diff_full(diff, old, new, keys, max_rows)
        diff._sink = None
        diff.method = "full"
        return diff
    finally:
        diff.bytes_read = stats[0]


def _check_keys(diff: TableDiff, keys: tuple[str, ...], mapping: dict[str, str] | None) -> tuple[list, list]:
    """The key columns' names on the old and new side."""
    if mapping is None:  # JSONL: checked per row
        return list(keys), list(keys)
    back = {n: o for o, n in mapping.items()}
    old_cols, new_cols = [], []
    for k in keys:
        for header, side in ((diff.old_header, "old"), (diff.new_header, "new")):
            if header is not None and k not in header and not (side == "old" and k in back):
                raise TableKeyError(f"{diff.path}: key column {k!r} is not in the {side} header "
                                    f"({', '.join(header) or 'empty'})")
        old_cols.append(back.get(k, k))
        new_cols.append(k)
    return old_cols, new_cols


def _diff_regions(diff: TableDiff, old: _Side, new: _Side, keys: tuple[str, ...], max_rows: int | None) -> None:
    diff.old_header, old_start = _header_of(old, diff.format)
    diff.new_header, new_start = _header_of(new, diff.format)
    mapping = _columns(diff) if diff.format != "jsonl" else None
    old_cols, new_cols = _check_keys(diff, keys, mapping) if keys else ([], [])
    width_old = len(diff.old_header) if diff.old_header is not None else None
    width_new = len(diff.new_header) if diff.new_header is not None else None
    quoted = diff.format != "jsonl"

    # Changed chunk runs, widened to whole lines, merged where they meet.
    regions: list[list[int]] = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, old.ids, new.ids, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        r = [*_bounds(old, new, i1, j1, i2, j2)]
        r = [max(r[0], old_start), max(r[1], old_start), max(r[2], new_start), max(r[3], new_start)]
        if regions and (r[0] <= regions[-1][1] or r[2] <= regions[-1][3]):
            regions[-1][1] = max(regions[-1][1], r[1])
            regions[-1][3] = max(regions[-1][3], r[3])
        else:
            regions.append(r)

    # Line numbers are known in a region that starts right after the header.
    first_line = {id(old): old.read(0, old_start).count(b"\n") + 1, id(new): new.read(0, new_start).count(b"\n") + 1}
    data_start = {id(old): old_start, id(new): new_start}

    def lines_of(side: _Side, start: int, end: int) -> list[tuple[bytes, int, int | None]]:
        data = side.read(start, end)
        lineno = first_line[id(side)] if start == data_start[id(side)] else None
        if quoted and b'"' in data:
            for ln in data.split(b"\n"):
                if ln.count(b'"') % 2:
                    raise _NeedFullParse  # a quoted field spans lines
        out, pos = [], start
        for ln in data.split(b"\n"):
            out.append((ln, pos, lineno))
            pos += len(ln) + 1
            if lineno is not None:
                lineno += 1
        if out and out[-1][0] == b"":
            out.pop()
        return out

    def parse(side: _Side, line: bytes, offset: int, lineno: int | None, width) -> Row | None:
        got = list(iter_records([line + b"\n"], diff.format, side.path, side.side, offset=offset, line=lineno,
                                width=width))
        return got[0] if got else None

    if not keys:
        # Operations of every region first (bounded by the change), so that a
        # row removed in one region and added unchanged in another is a move.
        ops: list[tuple[str, tuple | None, tuple | None]] = []
        for r in regions:
            a = lines_of(old, r[0], r[1])
            b = lines_of(new, r[2], r[3])
            for status, i, j in _align([x[0] for x in a], [x[0] for x in b]):
                ops.append((status, a[i] if i is not None else None, b[j] if j is not None else None))
        added: dict[bytes, deque] = defaultdict(deque)
        for k, (status, la, lb) in enumerate(ops):
            if status == "added":
                added[lb[0]].append(k)
        for k, (status, la, lb) in enumerate(ops):
            if status == "removed" and added.get(la[0]):
                k2 = added[la[0]].popleft()
                ops[k] = ("moved", la, ops[k2][2])
                ops[k2] = ("gone", None, None)
        for status, la, lb in ops:
            if status == "gone":
                continue
            ro = parse(old, *la, width_old) if la is not None else None
            rn = parse(new, *lb, width_new) if lb is not None else None
            if (la is not None and ro is None) or (lb is not None and rn is None):
                if ro is None and rn is None:
                    continue  # blank lines
                status = "added" if ro is None else "removed"
            _emit(diff, status, None, ro, rn, diff.old_header, diff.new_header, mapping, max_rows)
        return

    # Keyed: the lines of each region not on the other side (as bytes: split
    # and hashed in C), pooled over all regions (a row that moved between
    # regions is unchanged), then parsed and matched by key.
    datas_old: list[tuple[bytes, int]] = []  # each region's old bytes and start
    only: dict[int, dict[bytes, tuple[int, int | None, int]]] = {id(old): {}, id(new): {}}
    for ri, r in enumerate(regions):
        pair = []
        for side, start, end in ((old, r[0], r[1]), (new, r[2], r[3])):
            data = side.read(start, end)
            if quoted and b'"' in data and any(ln.count(b'"') % 2 for ln in data.split(b"\n") if b'"' in ln):
                raise _NeedFullParse  # a quoted field spans lines
            pair.append([side, data, start])
        datas_old.append((pair[0][1], pair[0][2]))
        # The whole lines both sides begin and end with are the same rows: only
        # the middle is split into lines and compared as sets.
        a_data, b_data = pair[0][1], pair[1][1]
        a_start, b_start = pair[0][2], pair[1][2]
        counted = {id(old): [0, 0], id(new): [0, 0]}  # line breaks before an offset, counted once (spans sorted)
        for a0, a1, b0, b1 in _spans(a_data, b_data):
            halves = []
            for side, data, start, lo, hi in ((old, a_data, a_start, a0, a1), (new, b_data, b_start, b0, b1)):
                lines = data[lo:hi].split(b"\n")
                uniq = set(lines)
                uniq.discard(b"")
                if len(uniq) != len(lines) - lines.count(b""):
                    raise _NeedFullParse  # the same line twice: let the full path judge (duplicate keys)
                halves.append((side, data, start, lo, lines, uniq))
            for (side, data, start, lo, lines, mine), other in ((halves[0], halves[1]), (halves[1], halves[0])):
                differ = mine - other[5]
                if not differ:
                    continue
                lineno0 = first_line[id(side)] if start == data_start[id(side)] else None
                if lineno0 is not None and lo:
                    c = counted[id(side)]
                    c[1] += data.count(b"\n", c[0], lo)
                    c[0] = lo
                    lineno0 += c[1]
                pool = only[id(side)]
                at = [i for i, ln in enumerate(lines) if ln in differ]
                ends = list(itertools.accumulate(map(len, lines)))  # + i line breaks before line i
                for i in at:
                    pool[lines[i]] = (start + lo + (ends[i - 1] + i if i else 0),
                                      None if lineno0 is None else lineno0 + i, ri)
    pool_old, pool_new = only[id(old)], only[id(new)]
    for ln in pool_old.keys() & pool_new.keys():  # moved from one region to another
        del pool_old[ln], pool_new[ln]
    # The regions holding each differing row's old or new line (its duplicates are searched there).
    wanted: dict[int, set] = defaultdict(set)
    by_key_old: dict[tuple, Row] = {}
    for ln, (off, no, ri) in sorted(pool_old.items(), key=lambda kv: kv[1][0]):
        row = parse(old, ln, off, no, width_old)
        if row is None:
            continue
        k = _key_of(row, old_cols, diff.old_header, old)
        if k in by_key_old:
            raise _duplicate(old, k, row)
        by_key_old[k] = row
        wanted[ri].add(k[0])
    seen_new: dict[tuple, Row] = {}
    for ln, (off, no, ri) in sorted(pool_new.items(), key=lambda kv: kv[1][0]):
        row = parse(new, ln, off, no, width_new)
        if row is None:
            continue
        k = _key_of(row, new_cols, diff.new_header, new)
        if k in seen_new:
            raise _duplicate(new, k, row)
        seen_new[k] = row
        wanted[ri].add(k[0])
    # A key of a differing row again on another line of its region is a
    # duplicate too.  Such a line is on both sides (only the differing lines
    # are not), so the region's old bytes are searched for the key's first
    # value (a C search), and only the lines found are parsed.
    budget = 100_000
    for ri, values in wanted.items():
        data, start = datas_old[ri]
        if len(values) * len(data) > 32 * 1024 * 1024:  # many keys in a large region: one pass
            if len(old_cols) != 1 or diff.format not in _DELIMS or b'"' in data:
                raise _NeedFullParse  # the full path checks every row
            # One key column, no quotes: count each line's key field in one
            # regular-expression pass.
            fields = Counter(_key_field_pattern(diff.format, diff.old_header.index(old_cols[0])).findall(data))
            for v in values:
                n = fields.get(str(v).encode(), 0) - ((v,) in by_key_old and by_key_old[(v,)].start >= start
                                                      and by_key_old[(v,)].start < start + len(data))
                if n > 0:
                    raise _duplicate(old if (v,) in by_key_old else new, (v,), None)
            continue
        for v in values:
            needle = _needle(v, diff.format)
            at = data.find(needle)
            while at >= 0:
                budget -= 1
                if budget < 0:
                    raise _NeedFullParse  # keys too common as bytes: the full path checks every row
                ls = data.rfind(b"\n", 0, at) + 1
                le = data.find(b"\n", at)
                le = len(data) if le < 0 else le
                ln = data[ls:le]
                if pool_old.get(ln, (None,))[0] != start + ls:  # not the differing line itself
                    row = parse(old, ln, start + ls, None, width_old)
                    if row is not None:
                        k = _key_of(row, old_cols, diff.old_header, old)
                        if k in by_key_old:
                            raise _duplicate(old, k, row)
                        if k in seen_new:
                            raise _duplicate(new, k, None)
                at = data.find(needle, le)
    for k, rn in seen_new.items():
        ro = by_key_old.pop(k, None)
        _emit(diff, "changed" if ro is not None else "added", k, ro, rn, diff.old_header, diff.new_header,
              mapping, max_rows)
    for k, ro in sorted(by_key_old.items(), key=lambda kv: kv[1].start):
        _emit(diff, "removed", k, ro, None, diff.old_header, diff.new_header, mapping, max_rows)


_DELIMS = {"csv": b",", "tsv": b"\t"}


def _spans(a: bytes, b: bytes, small: int = 16384) -> list[tuple[int, int, int, int]]:
    """(a0, a1, b0, b1): the spans of whole lines of a region pair that may
    differ; everything outside them is the same lines in the same order.  The
    common first and last lines are trimmed (_middle); a long middle is cut at
    a line of ``a`` near its centre found again in ``b`` (bytes searched in
    C), and each half trimmed again, so that scattered edits leave a few
    short spans instead of one long one."""
    out = []
    todo = [(0, len(a), 0, len(b))]
    while todo:
        a0, a1, b0, b1 = todo.pop()
        p, qa, qb = _middle(a[a0:a1], b[b0:b1])
        a0, a1, b0, b1 = a0 + p, a0 + qa, b0 + p, b0 + qb
        if a1 - a0 < small or b1 - b0 < small:
            if a1 > a0 or b1 > b0:
                out.append((a0, a1, b0, b1))
            continue
        cut = None
        at = a.rfind(b"\n", a0, (a0 + a1) // 2) + 1 or a0
        for _ in range(8):  # the line at the centre, or one of the next ones if it changed
            end = a.find(b"\n", at, a1)
            if end < 0:
                break
            line = a[at:end + 1]
            if at > a0:
                if b[b0:b0 + len(line)] == line:
                    pos = b0
                else:
                    pos = b.find(b"\n" + line, b0, b1)
                    pos = pos + 1 if pos >= 0 else -1
                if pos > b0 and b.find(b"\n" + line, pos, b1) < 0:  # once in b's span
                    cut = (at, pos)
                    break
            at = end + 1
        if cut is None:
            out.append((a0, a1, b0, b1))
            continue
        todo.append((cut[0], a1, cut[1], b1))
        todo.append((a0, cut[0], b0, cut[1]))
    out.sort()
    return out


def _middle(a: bytes, b: bytes) -> tuple[int, int, int]:
    """(p, qa, qb): a[:p] == b[:p] and a[qa:] == b[qb:] are the longest runs of
    whole lines the two begin and end with (not overlapping); found by binary
    search over slices (memcmp in C), so a region with one edit costs a few
    comparisons, not a walk over its lines."""
    n = min(len(a), len(b))
    lo, hi = 0, n
    if a[:n] != b[:n]:
        while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
            m = (lo + hi) // 2
            if a[lo:m] == b[lo:m]:
                lo = m
            else:
                hi = m
    else:
        lo = n
    p = a.rfind(b"\n", 0, lo) + 1
    la, lb = len(a), len(b)
    room = min(la, lb) - p
    lo, hi = 0, room  # common suffix length, within what follows p on both sides
    if a[la - room:] != b[lb - room:]:
        while hi - lo > 1:
            m = (lo + hi) // 2
            if a[la - m:la - lo] == b[lb - m:lb - lo]:
                lo = m
            else:
                hi = m
    else:
        lo = room
    qa = la - lo
    if qa > p and a[qa - 1] != 10:  # forward to a line start (the same bytes on both sides)
        nl = a.find(b"\n", qa)
        qa = la if nl < 0 else nl + 1
    return p, qa, lb - (la - qa)


def _bounds(old: _Side, new: _Side, i1: int, j1: int, i2: int, j2: int) -> tuple[int, int, int, int]:
    """A changed chunk run (old i1..i2, new j1..j2) widened to whole lines.

    The line crossing into the run's first chunk from the equal chunk before
    it is the same on both sides when the bytes up to the first line break
    of the two first chunks are: the region then starts after that line
    break, and the neighbouring chunk is not read.  The same at the end with
    the bytes after the last line break.  Otherwise (or for a run only one
    side has) the region reaches back into the neighbours, which are equal
    on both sides."""
    a0 = b0 = None
    if i1 < i2 and j1 < j2 and i1 and j1:
        a0, b0 = old.chunks(i1, i1 + 1)[0], new.chunks(j1, j1 + 1)[0]
        pa, pb = a0.find(b"\n"), b0.find(b"\n")
        if pa >= 0 and pa == pb and a0[:pa] == b0[:pb]:
            start_a, start_b = old.start(i1) + pa + 1, new.start(j1) + pb + 1
        else:
            a0 = None
    if a0 is None:
        start_a, start_b = old.line_start_before(i1), new.line_start_before(j1)
    if i1 < i2 and j1 < j2 and i2 < len(old.ids) and j2 < len(new.ids):
        a1, b1 = old.chunks(i2 - 1, i2)[0], new.chunks(j2 - 1, j2)[0]
        pa, pb = a1.rfind(b"\n"), b1.rfind(b"\n")
        if pa >= 0 and pb >= 0 and a1[pa:] == b1[pb:]:
            end_a, end_b = old.start(i2 - 1) + pa + 1, new.start(j2 - 1) + pb + 1
            if end_a >= start_a and end_b >= start_b:
                return start_a, end_a, start_b, end_b
    return start_a, old.line_end_after(i2), start_b, new.line_end_after(j2)


@functools.lru_cache(maxsize=64)
def _key_field_pattern(fmt: str, col: int) -> re.Pattern:
    """The ``col``-th field of every line of unquoted CSV/TSV bytes."""
    d = re.escape(_DELIMS[fmt])
    return re.compile(rb"(?m)^(?:[^%s\r\n]*%s){%d}([^%s\r\n]*)" % (d, d, col, d))


def _needle(v, fmt: str) -> bytes:
    """Bytes a key value appears as in a line (quoted CSV doubles its quotes)."""
    if fmt == "jsonl":
        return (json.dumps(v, ensure_ascii=False)[1:-1] if isinstance(v, str) else json.dumps(v)).encode()
    return str(v).replace('"', '""').encode()


def _emit(diff: TableDiff, status: str, key, ro: Row | None, rn: Row | None, ho, hn, mapping, max_rows) -> None:
    old = ro.as_dict(ho) if ro is not None else None
    new = rn.as_dict(hn) if rn is not None else None
    cells: tuple[CellChange, ...] = ()
    if status == "changed":
        cells = _cells(old, new, mapping)
        if not cells:
            return  # equal on the columns both sides have (a column was added or removed)
    diff._add(RowChange(status, key, old, new, cells,
                        ro.start if ro is not None else None, rn.start if rn is not None else None,
                        ro.line if ro is not None and ro.line is not None else None,
                        rn.line if rn is not None and rn.line is not None else None), max_rows)


def _diff_full(diff: TableDiff, old: _Side, new: _Side, keys: tuple[str, ...], max_rows: int | None) -> None:
    t_old = open_table(old.source(diff.format), old.path, "old", diff.format) if old.ids else None
    t_new = open_table(new.source(diff.format), new.path, "new", diff.format) if new.ids else None
    diff.old_header = t_old.header if t_old is not None else None
    diff.new_header = t_new.header if t_new is not None else None
    jsonl = diff.format == "jsonl"
    mapping = None if jsonl else _columns(diff)
    if mapping is not None and (t_old is None or t_new is None):
        h = diff.old_header or diff.new_header or ()
        mapping = {c: c for c in h}
    rows_old: Iterator[Row] = iter(t_old) if t_old is not None else iter(())
    rows_new: Iterator[Row] = iter(t_new) if t_new is not None else iter(())
    ho, hn = diff.old_header, diff.new_header
    if t_old is None or t_new is None:  # one side: every row added (removed), streamed
        side, table, status = (new, t_new, "added") if t_old is None else (old, t_old, "removed")
        if table is None:
            return
        key = None
        if keys:
            cols = _check_keys(diff, keys, mapping)[1 if t_old is None else 0]
            key = _key_getter(cols, table.header, side)
        seen: set = set()
        for row in table:
            k = None
            if key is not None:
                k = key(row)
                if k in seen:
                    raise _duplicate(side, k, row)
                seen.add(k)
            _emit(diff, status, k, row if status == "removed" else None, row if status == "added" else None,
                  ho, hn, mapping, max_rows)
        return
    if keys:
        old_cols, new_cols = _check_keys(diff, keys, mapping)
        key_old, key_new = _key_getter(old_cols, ho, old), _key_getter(new_cols, hn, new)
        by_key: dict[tuple, Row] = {}
        for row in rows_old:
            k = key_old(row)
            if k in by_key:
                raise _duplicate(old, k, row)
            by_key[k] = row
        seen: set[tuple] = set()
        same_header = ho == hn
        for row in rows_new:
            k = key_new(row)
            if k in seen:
                raise _duplicate(new, k, row)
            seen.add(k)
            ro = by_key.pop(k, None)
            if ro is not None and same_header and ro.values == row.values:
                continue
            _emit(diff, "changed" if ro is not None else "added", k, ro, row, ho, hn, mapping, max_rows)
        for k, ro in by_key.items():
            _emit(diff, "removed", k, ro, None, ho, hn, mapping, max_rows)
        return
    a = list(rows_old)
    b = list(rows_new)
    for status, i, j in _align([_token(r) for r in a], [_token(r) for r in b]):
        _emit(diff, status, None, a[i] if i is not None else None, b[j] if j is not None else None,
              ho, hn, mapping, max_rows)
