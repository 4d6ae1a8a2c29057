"""The table parser (ops/table.py): formats, quoting, BOM, CRLF, streaming, errors."""

from __future__ import annotations

import json

import pytest

from commitfs.errors import TableParseError
from commitfs.ops.table import iter_records, open_table, table_format, write_table

pytestmark = pytest.mark.timeout(30)


def rows(data, path="t.csv", side="", chunk=None):
    source = data if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    t = open_table(source, path, side)
    return t.header, [r.values for r in t]


def test_format_by_extension():
    assert table_format("a/b/labels.CSV") == "csv"
    assert table_format("x.tsv") == "tsv"
    assert table_format("x.jsonl") == "jsonl"
    assert table_format("x.parquet") == "parquet"
    assert table_format("x.json") is None
    assert table_format(".csv") is None


@pytest.mark.parametrize("chunk", [None, 1, 2, 7])
def test_csv_quoting_bom_crlf_across_any_chunking(chunk):
    data = ('\ufeffid,text,n\r\n1,"a, b",3\r\n2,"say ""hi""",4\r\n3,"two\r\nlines",5\r\n\r\n4,é,6').encode()
    header, got = rows(data, chunk=chunk)
    assert header == ("id", "text", "n")
    assert got == [("1", "a, b", "3"), ("2", 'say "hi"', "4"), ("3", "two\r\nlines", "5"), ("4", "é", "6")]


def test_tsv_dialect_and_offsets():
    data = b"a\tb\nx,y\t1\nz\t2\n"
    t = open_table(data, "t.tsv")
    assert t.header == ("a", "b") and t.data_start == 4
    got = list(t)
    assert [r.values for r in got] == [("x,y", "1"), ("z", "2")]
    assert [(r.line, r.start, r.end) for r in got] == [(2, 4, 10), (3, 10, 14)]
    assert data[got[1].start:got[1].end] == b"z\t2\n"


def test_empty_files_and_header_only():
    assert rows(b"") == ((), [])
    assert rows(b"a,b\n") == (("a", "b"), [])
    assert rows(b"", "t.jsonl") == (None, [])


def test_records_from_mid_file():
    data = b"h1,h2\n1,2\n3,4\n5,6\n"
    got = list(iter_records([data[10:]], "csv", "t.csv", "new", offset=10, line=None, width=2))
    assert [(r.values, r.start, r.end, r.line) for r in got] == [(("3", "4"), 10, 14, None), (("5", "6"), 14, 18, None)]


@pytest.mark.parametrize("data,line,what", [
    (b'a,b\n1,"x"y\n', 2, "bad quoting"),
    (b'a,b\n1,2\n3,"open\n', 3, "bad quoting"),
    (b"a,b\n1,2\n3,4,5\n", 3, "ragged row"),
    (b"a,b\n1,2\n3\n", 3, "ragged row"),
    (b"a,b\n1,\xff\n", 2, "invalid UTF-8"),
])
def test_parse_errors_name_file_side_and_line(data, line, what):
    with pytest.raises(TableParseError) as info:
        rows(data, "data/t.csv", "old")
    e = info.value
    assert (e.path, e.side, e.line) == ("data/t.csv", "old", line)
    assert str(e).startswith(f"data/t.csv (old side), line {line}: {what}")


def test_jsonl():
    data = b'{"id": 1, "y": "a"}\n\n{"id": 2, "y": null}\r\n'
    header, got = rows(data, "t.jsonl", chunk=3)
    assert header is None and got == [{"id": 1, "y": "a"}, {"id": 2, "y": None}]
    with pytest.raises(TableParseError, match=r"t.jsonl \(new side\), line 2: not JSON"):
        rows(b'{"a":1}\n{"a":\n', "t.jsonl", "new")
    with pytest.raises(TableParseError, match="line 1: a JSONL row must be a JSON object"):
        rows(b"[1]\n", "t.jsonl")


def test_write_table_round_trips():
    header, body = ("id", "text"), [("1", "a,b"), ("2", 'q"q'), ("3", "x\ny")]
    for fmt, path in (("csv", "t.csv"), ("tsv", "t.tsv")):
        data = b"".join(write_table(fmt, header, body))
        assert rows(data, path) == (header, body)
    data = b"".join(write_table("jsonl", None, [{"a": 1}, {"b": "é"}]))
    assert [json.loads(x) for x in data.splitlines()] == [{"a": 1}, {"b": "é"}]


def test_parquet():
    pa = pytest.importorskip("pyarrow")  # the optional extra `tabular`
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [1, 2], "label": ["cat", "dog"]}), buf)
    header, got = rows(buf.getvalue(), "t.parquet")
    assert header == ("id", "label") and got == [{"id": 1, "label": "cat"}, {"id": 2, "label": "dog"}]
    with pytest.raises(TableParseError, match=r"t.parquet \(old side\): not a Parquet file"):
        rows(b"nope", "t.parquet", "old")
