"""One page of a table, optionally filtered on a column's value (the UI's table view).

The table is parsed by ops.table (the one parser), streaming from the file's
chunks: a page at ``offset`` parses the rows before it and one row past it
(to know whether there is a next page) and stops, so the first page of a
large table reads its first chunks only, and no page holds more than
``limit`` rows in memory.  The total is known only when the scan reached the
end of the file.

A filter keeps the rows whose cell in ``column`` equals ``value`` as text
(JSONL/Parquet values that are not strings compare by their JSON spelling).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

from commitfs.errors import TableError
from commitfs.model.objects import TreeEntry
from commitfs.ops.table import open_table, table_format
from commitfs.repo.reader import FileObject, FileReader
from commitfs.repo.repository import Repository


def cell_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


@dataclass
class TablePage:
    path: str
    format: str
    columns: list[str]
    rows: list[list[str]]           # cells as text, aligned with ``columns``
    lines: list[int | None]         # each row's line (CSV, TSV, JSONL) or row number (Parquet)
    offset: int
    limit: int
    column: str | None = None
    value: str | None = None
    has_next: bool = False
    total: int | None = None        # matching rows, when the scan reached the end
    problems: list[str] = field(default_factory=list)

    @property
    def prev_offset(self) -> int | None:
        return max(0, self.offset - self.limit) if self.offset > 0 else None

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.rows) if self.has_next else None


def table_page(repo: Repository, entry: TreeEntry, path: str, offset: int = 0, limit: int = 100,
               column: str | None = None, value: str | None = None) -> TablePage:
    """Rows [offset, offset+limit) of the table (of those matching the filter).

    Raises TableParseError (file, line) from the parser, TableError for a
    filter on a column the table does not have (CSV, TSV, Parquet)."""
    reader = FileReader.open(repo, entry.id)
    if table_format(path) == "parquet":  # pyarrow seeks to the footer, then reads row groups
        source = io.BufferedReader(FileObject(reader, path), 1 << 20)
    else:
        source = reader.iter_chunks(batch=8)
    table = open_table(source, path)
    header = list(table.header) if table.header is not None else None
    if column is not None and header is not None and column not in header:
        raise TableError(f"{path}: no column {column!r} (columns: {', '.join(header)})")
    columns: list[str] = list(header) if header is not None else []
    page = TablePage(path, table.format, columns, [], [], max(0, offset), limit, column, value)
    dicts: list[dict] = []
    seen = 0
    for row in table:
        cells = row.as_dict(table.header)
        if column is not None and cell_text(cells.get(column)) != value:
            continue
        seen += 1
        if seen <= page.offset:
            continue
        if len(dicts) == limit:
            page.has_next = True
            break
        dicts.append(cells)
        page.lines.append(row.line)
        if header is None:
            columns.extend(k for k in cells if k not in columns)
    else:
        page.total = seen
    page.rows = [[cell_text(d.get(c)) for c in columns] for d in dicts]
    return page
