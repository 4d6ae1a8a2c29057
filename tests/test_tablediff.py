"""Row diffs of tables (ops/tablediff.py): keyed and positional, cells, moves,
headers, quoting, CRLF, BOM, empty files, JSONL, Parquet; cost follows the change."""

from __future__ import annotations

import io
import random

import pytest
from core_fixtures import faulty_repository

from commitfs.errors import TableKeyError, TableParseError
from commitfs.ops.tablediff import diff_table

pytestmark = pytest.mark.timeout(60)



def summary(d):
    return {k: v for k, v in d.counts.items() if v}


def big_csv(n: int, seed: int = 1) -> list[list[str]]:
    rng = random.Random(seed)
    return [[f"img/{i:07d}.jpg", rng.choice(["cat", "dog", "bird"]), f"{rng.random():.6f}"] for i in range(n)]


def encode(rows, header=("path", "label", "score"), nl="\n") -> bytes:
    return (nl.join(",".join(r) for r in [header, *rows]) + nl).encode()


def test_keyed_changed_added_removed_cells(local_repo, versions):
    old = versions("t.csv", b"id,label,score\n1,cat,0.5\n2,dog,0.7\n3,bird,0.1\n")
    new = versions("t.csv", b"id,label,score\n3,bird,0.1\n1,cat,0.9\n4,fish,0.3\n")
    d = diff_table(local_repo, old, new, "t.csv", keys=["id"])
    assert summary(d) == {"added": 1, "removed": 1, "changed": 1}
    by = {r.status: r for r in d.rows}
    assert by["changed"].key == ("1",) and [(c.column, c.old, c.new) for c in by["changed"].cells] == [
        ("score", "0.5", "0.9")]
    assert by["added"].new == {"id": "4", "label": "fish", "score": "0.3"}
    assert by["removed"].old["id"] == "2"
    assert d.to_json()["counts"]["changed"] == 1


def test_positional_moved_and_changed(local_repo, versions):
    old = versions("t.csv", b"a,b\n1,x\n2,y\n3,z\n4,w\n")
    new = versions("t.csv", b"a,b\n3,z\n1,x\n2,Y\n4,w\n5,v\n")
    d = diff_table(local_repo, old, new, "t.csv")
    assert summary(d) == {"moved": 1, "changed": 1, "added": 1}
    changed = next(r for r in d.rows if r.status == "changed")
    assert [(c.column, c.old, c.new) for c in changed.cells] == [("b", "y", "Y")]
    moved = next(r for r in d.rows if r.status == "moved")
    assert moved.old == moved.new == {"a": "3", "b": "z"}


def test_header_changes_and_renames(local_repo, versions):
    old = versions("t.csv", b"id,lbl,gone\n1,cat,x\n2,dog,y\n")
    new = versions("t.csv", b"id,label,extra\n1,cat,q\n2,cow,q\n")
    d = diff_table(local_repo, old, new, "t.csv", keys=["id"])
    assert d.columns_renamed == [("lbl", "label"), ("gone", "extra")]
    old2 = versions("t.csv", b"id,a\n1,x\n")
    new2 = versions("t.csv", b"id,b,a\n1,y,x\n")
    d2 = diff_table(local_repo, old2, new2, "t.csv", keys=["id"])
    assert d2.columns_added == ["b"] and d2.columns_removed == [] and summary(d2) == {}
    # renamed by position: cells compared through the rename
    changed = [r for r in d.rows if r.status == "changed"]
    assert len(changed) == 2 and [(c.column, c.old, c.new) for c in changed[1].cells] == [
        ("label", "dog", "cow"), ("extra", "y", "q")]


def test_quoting_crlf_bom_and_empty(local_repo, versions):
    old = versions("t.csv", '\ufeffid,text\r\n1,"a, ""b"""\r\n2,"multi\r\nline"\r\n'.encode())
    new = versions("t.csv", '\ufeffid,text\r\n1,"a, ""c"""\r\n2,"multi\r\nline"\r\n'.encode())
    d = diff_table(local_repo, old, new, "t.csv", keys=["id"])
    assert [(c.column, c.old, c.new) for r in d.rows for c in r.cells] == [("text", 'a, "b"', 'a, "c"')]
    assert d.old_header == ("id", "text")
    empty = versions("t.csv", b"")
    d = diff_table(local_repo, empty, new, "t.csv")
    assert summary(d) == {"added": 2} and d.old_header is None
    d = diff_table(local_repo, new, None, "t.csv", keys=["id"])
    assert summary(d) == {"removed": 2}


def test_tsv_and_jsonl(local_repo, versions):
    d = diff_table(local_repo, versions("t.tsv", b"k\tv\na\t1\n"), versions("t.tsv", b"k\tv\na\t2\n"), "t.tsv",
                   keys=["k"])
    assert [(c.column, c.old, c.new) for r in d.rows for c in r.cells] == [("v", "1", "2")]
    old = versions("t.jsonl", b'{"id": 1, "y": "a"}\n{"id": 2, "y": "b"}\n')
    new = versions("t.jsonl", b'{"id": 2, "y": "b"}\n{"id": 1, "y": "c", "z": true}\n')
    d = diff_table(local_repo, old, new, "t.jsonl", keys=["id"])
    assert [(r.key, [(c.column, c.old, c.new) for c in r.cells]) for r in d.rows] == [
        ((1,), [("y", "a", "c"), ("z", None, True)])]
    d = diff_table(local_repo, old, new, "t.jsonl")  # by position: row 1 went, a new row came
    assert summary(d) == {"removed": 1, "added": 1}


def test_parquet(local_repo, versions):
    pa = pytest.importorskip("pyarrow")  # the optional extra `tabular`
    import pyarrow.parquet as pq

    def pq_bytes(ids, labels):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": ids, "label": labels}), buf)
        return buf.getvalue()

    old = versions("t.parquet", pq_bytes([1, 2, 3], ["a", "b", "c"]))
    new = versions("t.parquet", pq_bytes([1, 3, 4], ["a", "C", "d"]))
    d = diff_table(local_repo, old, new, "t.parquet", keys=["id"])
    assert summary(d) == {"added": 1, "removed": 1, "changed": 1}
    assert [(c.column, c.old, c.new) for r in d.rows for c in r.cells] == [("label", "c", "C")]


def test_bad_input_errors(local_repo, versions):
    good = versions("t.csv", b"id,v\n1,a\n2,b\n")
    ragged = versions("t.csv", b"id,v\n1,a\n2,b,c\n")
    with pytest.raises(TableParseError, match=r"^t.csv \(new side\), line 3: ragged row"):
        diff_table(local_repo, good, ragged, "t.csv")
    with pytest.raises(TableKeyError, match="key column 'nope' is not in the old header"):
        diff_table(local_repo, good, good, "t.csv", keys=["nope"])
    dup = versions("t.csv", b"id,v\n1,a\n1,b\n")
    with pytest.raises(TableKeyError, match=r"t.csv \(new side\): key '1' is not unique") as info:
        diff_table(local_repo, good, dup, "t.csv", keys=["id"])
    assert info.value.key == ("1",)


def test_cost_follows_the_change(local_url, versions, local_repo):
    """A ~3 MiB table with 3 rows changed in one place: only the changed region's
    chunks (and a neighbour each side) are read, for keyed and unkeyed diffs."""
    rows = big_csv(80_000)
    old = versions("labels.csv", encode(rows))
    for i in (40_000, 40_001, 40_005):
        rows[i][1] = "zebra"
    del rows[40_010]
    rows.insert(40_020, ["img/new.jpg", "cat", "0.5"])
    new_bytes = encode(rows)
    new = versions("labels.csv", new_bytes)
    repo = faulty_repository(local_url)
    for keys in ([], ["path"]):
        before = repo.store.bytes_read
        d = diff_table(repo, old, new, "labels.csv", keys=keys)
        assert d.method == "regions"
        assert summary(d) == {"changed": 3, "removed": 1, "added": 1}
        assert {r.new["path"] for r in d.rows if r.status == "changed"} == {
            f"img/{i:07d}.jpg" for i in (40_000, 40_001, 40_005)}
        for r in d.rows:  # offsets point at the rows
            if r.new is not None:
                assert new_bytes[r.new_offset:].startswith(r.new["path"].encode() + b",")
        read = repo.store.bytes_read - before
        assert 0 < read < old.size / 4, (read, old.size)
        assert d.bytes_read < old.size / 4
    # the same diff on the full path agrees
    full = diff_table(repo, old, new, "labels.csv", keys=["path"], method="full")
    assert full.method == "full" and summary(full) == {"changed": 3, "removed": 1, "added": 1}
    assert full.bytes_read >= old.size + new.size


def test_multiline_records_fall_back_to_the_full_parse(local_repo, versions):
    rows = [[str(i), f'"line one\nline two {i}"'] for i in range(30_000)]
    data = encode(rows, header=("id", "text"))
    old = versions("t.csv", data)
    rows[15_000][1] = '"line one\nchanged"'
    new = versions("t.csv", encode(rows, header=("id", "text")))
    d = diff_table(local_repo, old, new, "t.csv", keys=["id"])
    assert d.method == "full"
    assert [(r.key, [(c.old, c.new) for c in r.cells]) for r in d.rows] == [
        (("15000",), [("line one\nline two 15000", "line one\nchanged")])]
    assert d.rows[0].new_line is not None


def test_max_rows_counts_all_keeps_some(local_repo, versions):
    old = versions("t.csv", b"id\n" + b"".join(b"%d\n" % i for i in range(50)))
    new = versions("t.csv", b"id\n")
    d = diff_table(local_repo, old, new, "t.csv", max_rows=10)
    assert d.counts["removed"] == 50 and len(d.rows) == 10 and d.rows_omitted == 40


def test_compound_keys(local_repo, versions):
    old = versions("t.csv", b"user,item,n\nu1,a,1\nu1,b,2\nu2,a,3\n")
    new = versions("t.csv", b"user,item,n\nu1,a,1\nu1,b,5\nu2,b,4\n")
    d = diff_table(local_repo, old, new, "t.csv", keys=["user", "item"])
    assert sorted((r.status, r.key) for r in d.rows) == [
        ("added", ("u2", "b")), ("changed", ("u1", "b")), ("removed", ("u2", "a"))]
    dup = versions("t.csv", b"user,item,n\nu1,a,1\nu1,b,5\nu1,a,4\n")
    with pytest.raises(TableKeyError, match=r"\(new side\): key \('u1', 'a'\) is not unique"):
        diff_table(local_repo, old, dup, "t.csv", keys=["user", "item"])


@pytest.mark.parametrize("seed", range(30))
def test_fast_alignment_agrees_with_difflib(seed):
    """Unique lines, no moves: the set-based alignment gives difflib's answer."""
    from commitfs.ops import tablediff

    rng = random.Random(seed)
    a = [f"r{i}" for i in range(rng.randrange(0, 40))]
    b = list(a)
    for n in range(rng.randrange(1, 6)):
        i = rng.randrange(len(b) + 1)
        op = rng.choice("cid") if b else "i"
        if op == "i":
            b.insert(i, f"new{n}")
        elif op == "d":
            del b[min(i, len(b) - 1)]
        else:
            b[min(i, len(b) - 1)] = f"chg{n}"
    fast = tablediff._align_unique(a, b)
    assert fast is not None
    assert sorted(fast, key=str) == sorted(tablediff._align_difflib(a, b), key=str)
    moved = ["x", "a", "b", "c"], ["a", "b", "c", "x"]
    assert tablediff._align_unique(*moved) is None  # a move: difflib decides


def test_on_row_streams_instead_of_keeping(local_repo, versions):
    e = versions("t.csv", b"id,v\n" + b"".join(b"%d,x\n" % i for i in range(5000)))
    got = []
    d = diff_table(local_repo, None, e, "t.csv", keys=["id"], on_row=got.append)
    assert d.rows == [] and d.counts["added"] == 5000 and len(got) == 5000
    assert got[0].key == ("0",) and got[-1].new == {"id": "4999", "v": "x"}
    e2 = versions("t.csv", b"id,v\n" + b"".join(b"%d,%s\n" % (i, b"y" if i == 7 else b"x") for i in range(5000)))
    got.clear()
    d = diff_table(local_repo, e, e2, "t.csv", on_row=got.append)
    assert d.rows == [] and [r.new["id"] for r in got] == ["7"] and d.counts["changed"] == 1


@pytest.mark.parametrize("seed", range(8))
def test_regions_agree_with_the_full_parse(local_repo, versions, seed):
    """Random edits (changed cells, inserted, deleted and moved blocks, CRLF
    or LF) of a table of ~10 chunks: the region path's keyed diff equals the
    full parse's, and its unkeyed diff accounts for every row."""
    rng = random.Random(seed)
    nl = rng.choice(["\n", "\r\n"])
    rows = big_csv(20_000, seed)
    old = versions("t.csv", encode(rows, nl=nl))
    for _ in range(rng.randrange(1, 8)):
        op = rng.choice(["change", "insert", "delete", "move"])
        i = rng.randrange(len(rows) - 50)
        n = rng.randrange(1, 40)
        if op == "change":
            for r in rows[i:i + n]:
                r[2] = f"{rng.random():.6f}"
        elif op == "insert":
            rows[i:i] = [[f"img/new{seed}-{i}-{k}.jpg", "cat", "0.5"] for k in range(n)]
        elif op == "delete":
            del rows[i:i + n]
        else:
            block = rows[i:i + n]
            del rows[i:i + n]
            j = rng.randrange(len(rows))
            rows[j:j] = block
    new = versions("t.csv", encode(rows, nl=nl))
    fast = diff_table(local_repo, old, new, "t.csv", keys=["path"])
    full = diff_table(local_repo, old, new, "t.csv", keys=["path"], method="full")
    assert fast.method == "regions" and full.method == "full"

    def norm(d):
        return sorted((r.status, r.key, tuple(sorted((r.old or {}).items())), tuple(sorted((r.new or {}).items())))
                      for r in d.rows)

    assert norm(fast) == norm(full)
    assert fast.counts == full.counts
    unkeyed = diff_table(local_repo, old, new, "t.csv")
    c = unkeyed.counts
    n_old, n_new = 20_000, len(rows)
    assert n_old - c["removed"] + c["added"] == n_new


def test_a_block_moved_far_is_moved(local_repo, versions):
    rows = big_csv(40_000, 5)
    old = versions("t.csv", encode(rows))
    block = rows[1000:1010]
    del rows[1000:1010]
    rows[35_000:35_000] = block
    new = versions("t.csv", encode(rows))
    d = diff_table(local_repo, old, new, "t.csv")
    assert d.method == "regions" and summary(d) == {"moved": 10}
    assert {r.old["path"] for r in d.rows} == {b[0] for b in block}


def _as_set(d):
    return sorted((r.status, r.key, r.old_offset, r.new_offset, tuple((c.column, c.old, c.new) for c in r.cells))
                  for r in d.rows)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nedits", [40, 3000])
def test_scattered_keyed_edits_regions_agree_with_the_full_parse(local_repo, versions, nedits):
    """Edits scattered over a multi-chunk table (few: regions of one edit each,
    trimmed to the lines between their common first and last lines; many:
    every chunk changed): the region path gives the full parse's rows."""
    rng = random.Random(nedits)
    rows = big_csv(60_000, seed=3)
    old = versions("labels.csv", encode(rows))
    picked = rng.sample(range(60_000), nedits + 20)
    for i in picked[:nedits]:
        rows[i][rng.choice((1, 2))] = rng.choice(["zebra", "0.5", "ox"])
    gone = set(picked[nedits:nedits + 10])
    rows = [r for i, r in enumerate(rows) if i not in gone]
    for n in range(10):
        rows.insert(rng.randrange(len(rows)), [f"img/new{n}.jpg", "ant", "0.1"])
    new = versions("labels.csv", encode(rows))
    d = diff_table(local_repo, old, new, "labels.csv", keys=["path"])
    full = diff_table(local_repo, old, new, "labels.csv", keys=["path"], method="full")
    assert d.method == "regions" and full.method == "full"
    assert summary(d) == summary(full) and summary(d)["added"] == 10 and summary(d)["removed"] == 10
    assert _as_set(d) == _as_set(full)
    lines = {(r.key, r.status): (r.old_line, r.new_line) for r in full.rows}
    known = [(r.key, r.status, r.old_line, r.new_line) for r in d.rows if (r.old_line or r.new_line) is not None]
    assert known or nedits < 100  # a region right after the header counts its line numbers
    for key, status, old_line, new_line in known:
        assert lines[key, status] == (old_line, new_line), key
    # A key again on a line both versions have, next to a changed row, is still found.
    dup = list(rows)
    dup[30_001] = [dup[30_000][0], "dup", "0.2"]
    with pytest.raises(TableKeyError, match="is not unique"):
        diff_table(local_repo, new, versions("labels.csv", encode(dup)), "labels.csv", keys=["path"])
