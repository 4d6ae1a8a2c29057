"""Tabular files: the one parser of .csv, .tsv, .jsonl and Parquet in commitfs.

Everything that looks inside a table (row diffs, row-level merges, the web
UI's table pages) reads it through here, so that one set of rules decides
what a row is:

* The format comes from the file name's extension (``table_format``):
  ``.csv`` (the csv module's ``excel`` dialect), ``.tsv``/``.tab``
  (``excel-tab``), ``.jsonl``/``.ndjson`` (one JSON object per line), and
  ``.parquet`` through the optional extra ``tabular`` (pyarrow).
* CSV and TSV: the first record is the header; a UTF-8 byte order mark before
  it is dropped; CRLF and LF line ends are both accepted; quoted fields may
  hold delimiters, doubled quotes and line breaks.  Parsing is strict: a
  stray quote, an unterminated quoted field, invalid UTF-8 or a row whose
  field count differs from the header's raise TableParseError naming the
  file, the side ("old"/"new" in a comparison) and the line.  Blank lines are
  skipped.
* JSONL: every non-blank line is a JSON object; ``header`` is None and a
  row's values are that object (a dict).
* Parquet: rows are dicts in the schema's column order; ``header`` is the
  schema's names; ``line`` is the 1-based row number.

Streaming: ``open_table`` takes bytes, a binary file, or any iterable of byte
chunks (a file's chunks as the repository yields them) and iterates rows
without materialising the table.  ``iter_records`` parses a byte range that
starts at a record boundary somewhere in a file (the row diff parses only the
regions whose chunks changed); its rows carry byte offsets (``start``,
``end``) within the file.  ``write_table`` is the inverse, for merges.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from commitfs.errors import TableError, TableParseError

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet"}
_DIALECTS = {"csv": "excel", "tsv": "excel-tab"}
#: Formats that are one record per line unless a quoted field holds a line break.
LINE_FORMATS = frozenset({"csv", "tsv", "jsonl"})
_BOM = b"\xef\xbb\xbf"
# A quoted CSV field may be long (a caption, a JSON blob); the csv module's
# default limit (128 KiB) would reject it.
csv.field_size_limit(64 * 1024 * 1024)


def table_format(path: str) -> str | None:
    """"csv", "tsv", "jsonl" or "parquet" by the name's extension, or None."""
    name = path.rsplit("/", 1)[-1].lower()
    dot = name.rfind(".")
    return _FORMATS.get(name[dot:]) if dot > 0 else None


@dataclass(slots=True)
class Row:
    """One record.  ``values``: a tuple of strings aligned with the header
    (CSV, TSV) or a dict (JSONL, Parquet).  ``line``: 1-based line where the
    record starts (None where the parse began mid-file at an unknown line);
    ``start``/``end``: its byte range in the file (None for Parquet)."""

    line: int | None
    start: int | None
    end: int | None
    values: Any

    def as_dict(self, header: tuple[str, ...] | None) -> dict:
        if isinstance(self.values, dict):
            return self.values
        return dict(zip(header or (), self.values))


# --- byte streams to lines ---------------------------------------------------------
def _chunks_of(source) -> Iterable[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return (bytes(source),)
    if hasattr(source, "read"):
        return iter(lambda: source.read(1024 * 1024), b"")
    return source


class _Lines:
    """Physical lines (ends kept) of a chunk stream, with the byte offset and
    line number of the next one; decoded as strict UTF-8."""

    def __init__(self, chunks: Iterable[bytes], path: str, side: str, offset: int, line: int | None):
        self._chunks = iter(chunks)
        self.path, self.side = path, side
        self.offset = offset       # byte offset of the next line
        self.line = line           # its line number (None: unknown)
        self._pending: list[bytes] = []
        self._tail = b""
        self._strip_bom = offset == 0

    def __iter__(self):
        return self

    def _fill(self) -> bool:
        for chunk in self._chunks:
            data = self._tail + bytes(chunk) if self._tail else bytes(chunk)
            if self._strip_bom:
                if len(data) < 3 and _BOM.startswith(data):
                    self._tail = data
                    continue
                self._strip_bom = False
                if data.startswith(_BOM):
                    self.offset += 3
                    data = data[3:]
            parts = data.split(b"\n")
            self._tail = parts.pop()
            if parts:
                parts.reverse()
                self._pending = parts
                return True
        if self._tail:
            self._pending = [None]  # type: ignore[list-item]  # the last line, no line end
            return True
        return False

    def next_bytes(self) -> bytes:
        if not self._pending and not self._fill():
            raise StopIteration
        raw = self._pending.pop()
        if raw is None:
            raw, self._tail = self._tail, b""
            self.offset += len(raw)
        else:
            raw += b"\n"
            self.offset += len(raw)
        if self.line is not None:
            self.line += 1
        return raw

    def __next__(self) -> str:
        start_line, start = self.line, self.offset
        raw = self.next_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TableParseError(self.path, self.side, f"invalid UTF-8 at byte {start + exc.start}",
                                  start_line, None if start_line is not None else start) from None


def _csv_rows(lines: _Lines, fmt: str, width: int | None) -> Iterator[Row]:
    reader = csv.reader(lines, dialect=_DIALECTS[fmt], strict=True)
    while True:
        line, start = lines.line, lines.offset
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise TableParseError(lines.path, lines.side, f"bad quoting: {exc}", line,
                                  None if line is not None else start) from None
        if not fields:
            continue  # a blank line
        if width is not None and len(fields) != width:
            raise TableParseError(lines.path, lines.side,
                                  f"ragged row: {len(fields)} fields, the header has {width}", line,
                                  None if line is not None else start)
        yield Row(line, start, lines.offset, tuple(fields))


def _jsonl_rows(lines: _Lines) -> Iterator[Row]:
    while True:
        line, start = lines.line, lines.offset
        try:
            text = next(lines)
        except StopIteration:
            return
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise TableParseError(lines.path, lines.side, f"not JSON: {exc}", line,
                                  None if line is not None else start) from None
        if not isinstance(value, dict):
            raise TableParseError(lines.path, lines.side, "a JSONL row must be a JSON object", line,
                                  None if line is not None else start)
        yield Row(line, start, lines.offset, value)


def iter_records(chunks, fmt: str, path: str, side: str = "", *, offset: int = 0, line: int | None = 1,
                 width: int | None = None) -> Iterator[Row]:
    """Records of a byte range of a CSV, TSV or JSONL file beginning at a record
    boundary ``offset`` (line number ``line``, None if unknown); no header is
    read: ``width`` is the field count every CSV/TSV record must have."""
    lines = _Lines(_chunks_of(chunks), path, side, offset, line)
    if fmt == "jsonl":
        return _jsonl_rows(lines)
    if fmt in _DIALECTS:
        return _csv_rows(lines, fmt, width)
    raise TableError(f"{path}: {fmt} tables cannot be read from a byte range")


# --- whole tables ------------------------------------------------------------------
class Table:
    """A table being read: ``header`` (None for JSONL) and its rows, once."""

    def __init__(self, path: str, side: str, fmt: str, header: tuple[str, ...] | None, rows: Iterator[Row],
                 data_start: int = 0):
        self.path, self.side, self.format, self.header = path, side, fmt, header
        #: Byte offset where the first data record starts (after the header).
        self.data_start = data_start
        self._rows = rows

    def __iter__(self) -> Iterator[Row]:
        return self._rows


def open_table(source, path: str, side: str = "", fmt: str | None = None) -> Table:
    """Start reading a table from bytes, a binary file or an iterable of byte
    chunks.  The header (CSV, TSV, Parquet) is read now; rows as iterated."""
    fmt = fmt or table_format(path)
    if fmt is None:
        raise TableError(f"{path}: not a table (.csv, .tsv, .jsonl, .parquet)")
    if fmt == "parquet":
        return _open_parquet(source, path, side)
    lines = _Lines(_chunks_of(source), path, side, 0, 1)
    if fmt == "jsonl":
        return Table(path, side, fmt, None, _jsonl_rows(lines))
    first = _csv_rows(lines, fmt, None)
    head = next(first, None)
    header = head.values if head is not None else ()
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise TableParseError(path, side, f"the header names column {dup!r} twice", head.line)
    return Table(path, side, fmt, header, _csv_rows(lines, fmt, len(header)) if head is not None else iter(()),
                 head.end if head is not None else 0)


def _open_parquet(source, path: str, side: str) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{path}: reading Parquet needs pyarrow (pip install 'commitfs[tabular]')") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif not hasattr(source, "read"):
        source = io.BytesIO(b"".join(bytes(c) for c in source))
    try:
        pf = pq.ParquetFile(source)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid, OSError...
        raise TableParseError(path, side, f"not a Parquet file: {exc}") from None
    header = tuple(pf.schema_arrow.names)

    def rows() -> Iterator[Row]:
        n = 0
        try:
            for batch in pf.iter_batches(batch_size=8192):
                for value in batch.to_pylist():
                    n += 1
                    yield Row(n, None, None, value)
        except Exception as exc:
            raise TableParseError(path, side, f"unreadable Parquet row group: {exc}", n + 1) from None

    return Table(path, side, "parquet", header, rows())


# --- writing ----------------------------------------------------------------------
def write_table(fmt: str, header: tuple[str, ...] | None, rows: Iterable, *, crlf: bool = False) -> Iterator[bytes]:
    """Encoded pieces of a CSV, TSV or JSONL table: the header (if any), then
    each row (a tuple aligned with the header, a dict, or a Row)."""
    if fmt == "jsonl":
        for r in rows:
            v = r.values if isinstance(r, Row) else r
            yield (json.dumps(v, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        return
    if fmt not in _DIALECTS:
        raise TableError(f"cannot write {fmt} tables")
    buf = io.StringIO()
    w = csv.writer(buf, dialect=_DIALECTS[fmt], lineterminator="\r\n" if crlf else "\n")

    def emit(values) -> bytes:
        w.writerow(values)
        s = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return s.encode()

    if header is not None:
        yield emit(header)
    for r in rows:
        v = r.values if isinstance(r, Row) else r
        if isinstance(v, dict):
            v = [v.get(h, "") for h in header or ()]
        yield emit(v)
