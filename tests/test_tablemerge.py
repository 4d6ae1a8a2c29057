"""Row-level merges of tables (ops/tablemerge.py through commitfs merge): keyed and unkeyed."""

from __future__ import annotations

import json

import pytest

from core_fixtures import cli_fails, run_cli
from commitfs.errors import TableKeyError
from commitfs.ops.merge import MergeOptions, merge_into
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository

HEADER = "image_id,label,split\n"
BASE = HEADER + "1,cat,train\n2,dog,train\n3,cat,test\n4,bird,\"val\"\n"


@pytest.fixture
def tables(local_url, tmp_path):
    repo = Repository.init(local_url)
    src = tmp_path / "src"
    src.mkdir()

    def commit(files: dict, branch: str = "main"):
        for p in list(src.rglob("*")):
            if p.is_file():
                p.unlink()
        for path, text in files.items():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            (src / path).write_bytes(text.encode() if isinstance(text, str) else text)
        return commit_directory(repo, src, branch=branch, message=branch).commit_id

    def setup(base: dict, ours: dict, theirs: dict):
        b = commit(base)
        repo.refs.set_branch_if_equals("dev", b, None)
        commit(ours)
        commit(theirs, "dev")

    def read(path: str) -> str:
        tid = repo.load_commit(repo.refs.lookup_branch("main")).tree
        e = None
        for name in path.split("/"):
            e = repo.load_tree(tid).get(name)
            tid = e.id
        return bytes(repo.load_file(e.id)).decode()

    yield repo, setup, read
    repo.close()


def _keyed(**kw):
    return MergeOptions(keys=[("*.csv", ("image_id",)), ("*.jsonl", ("id",))], **kw)


def test_keyed_both_sides_append_and_edit_different_cells(tables):
    repo, setup, read = tables
    ours = BASE.replace("2,dog,train", "2,puppy,train") + "5,cat,train\n"
    theirs = BASE.replace("2,dog,train", "2,dog,test") + "6,fish,val\n"
    setup({"labels.csv": BASE}, {"labels.csv": ours}, {"labels.csv": theirs})
    result = merge_into(repo, "dev", "main", options=_keyed())
    assert result.status == "merged", [c.to_json() for c in result.conflicts]
    assert read("labels.csv") == (HEADER + "1,cat,train\n2,puppy,test\n3,cat,test\n4,bird,\"val\"\n"
                                  "5,cat,train\n6,fish,val\n")  # untouched rows keep their bytes ("val")
    assert [(r.path, r.how) for r in result.resolved] == [("labels.csv", "rows")]


def test_keyed_same_cell_two_ways_names_key_column_and_values(tables, local_url):
    repo, setup, read = tables
    setup({"labels.csv": BASE}, {"labels.csv": BASE.replace("3,cat", "3,lynx")},
          {"labels.csv": BASE.replace("3,cat", "3,tiger")})
    head = repo.refs.lookup_branch("main")
    result = merge_into(repo, "dev", "main", options=_keyed())
    assert result.status == "conflicts"
    (c,) = result.conflicts
    assert c.path == "labels.csv" and c.kind == "modify/modify"
    assert c.details[0]["key"] == ["3"] and c.details[0]["column"] == "label"
    assert (c.details[0]["base"], c.details[0]["ours"], c.details[0]["theirs"]) == ("cat", "lynx", "tiger")
    assert repo.refs.lookup_branch("main") == head
    proc = run_cli("-r", local_url, "merge", "dev", "--key", "*.csv=image_id")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert "CONFLICT (modify/modify) labels.csv" in out
    assert "key '3', column 'label': base 'cat', ours 'lynx', theirs 'tiger'" in out
    proc = run_cli("-r", local_url, "merge", "dev", "--key", "*.csv=image_id", "--json")
    assert json.loads(proc.stdout)["conflicts"][0]["details"][0]["column"] == "label"
    # --strategy theirs settles the cell, the rest of the rows still merge.
    result = merge_into(repo, "dev", "main", options=_keyed(strategy="theirs"))
    assert read("labels.csv") == BASE.replace("3,cat", "3,tiger")


def test_keyed_deleted_row_against_edited_row(tables):
    repo, setup, _read = tables
    setup({"labels.csv": BASE}, {"labels.csv": BASE.replace("1,cat,train\n", "")},
          {"labels.csv": BASE.replace("1,cat,train", "1,cat,val") + "7,ant,val\n"})
    result = merge_into(repo, "dev", "main", options=_keyed())
    (c,) = result.conflicts
    assert c.details[0]["key"] == ["1"] and "deleted by ours, edited by theirs" in c.details[0]["text"]


def test_keyed_header_change_merges_by_columns(tables):
    repo, setup, read = tables
    ours = "image_id,label,split,score\n1,cat,train,0.9\n2,dog,train,0.8\n3,cat,test,0.7\n4,bird,val,0.5\n"
    theirs = BASE.replace("4,bird", "4,owl")
    setup({"labels.csv": BASE}, {"labels.csv": ours}, {"labels.csv": theirs})
    result = merge_into(repo, "dev", "main", options=_keyed())
    assert result.status == "merged", [c.to_json() for c in result.conflicts]
    assert read("labels.csv") == ours.replace("4,bird", "4,owl")


def test_the_key_can_come_from_the_attributes_file(tables):
    repo, setup, read = tables
    attrs = "# merge labels by image\n*.csv merge=rows key=image_id\n"
    setup({"labels.csv": BASE, ".commitfs/attributes": attrs},
          {"labels.csv": BASE.replace("2,dog,train", "2,puppy,train"), ".commitfs/attributes": attrs},
          {"labels.csv": BASE.replace("2,dog,train", "2,dog,test"), ".commitfs/attributes": attrs})
    result = merge_into(repo, "dev", "main")
    assert result.status == "merged"
    assert "2,puppy,test\n" in read("labels.csv")


def test_a_missing_or_duplicate_key_is_an_error_that_moves_nothing(tables, local_url):
    repo, setup, _read = tables
    setup({"labels.csv": BASE}, {"labels.csv": BASE + "2,dog,val\n"}, {"labels.csv": BASE.replace("1,cat", "1,cow")})
    head = repo.refs.lookup_branch("main")
    with pytest.raises(TableKeyError) as info:
        merge_into(repo, "dev", "main", options=_keyed())
    assert "labels.csv (ours side)" in str(info.value) and "key '2' is not unique" in str(info.value)
    line = cli_fails("-r", local_url, "merge", "dev", "--key", "*.csv=nope")
    assert "labels.csv" in line and "no key column 'nope'" in line
    assert repo.refs.lookup_branch("main") == head


def test_a_table_that_does_not_parse_is_a_whole_file_conflict(tables):
    repo, setup, _read = tables
    setup({"labels.csv": BASE}, {"labels.csv": BASE + "5,\"unterminated\n"}, {"labels.csv": BASE + "6,x,y\n"})
    result = merge_into(repo, "dev", "main")
    (c,) = result.conflicts
    assert c.kind == "modify/modify" and "labels.csv (ours side)" in c.note


def test_unkeyed_appends_and_edits_of_different_rows(tables):
    repo, setup, read = tables
    ours = BASE.replace("1,cat,train", "1,cat,val") + "5,cat,train\n5b,cat,train\n"
    theirs = BASE.replace("3,cat,test", "3,lion,test") + "6,fish,val\n"
    setup({"labels.csv": BASE}, {"labels.csv": ours}, {"labels.csv": theirs})
    result = merge_into(repo, "dev", "main")
    assert result.status == "merged", [c.to_json() for c in result.conflicts]
    assert read("labels.csv") == (HEADER + "1,cat,val\n2,dog,train\n3,lion,test\n4,bird,\"val\"\n"
                                  "5,cat,train\n5b,cat,train\n6,fish,val\n")


def test_unkeyed_same_row_two_ways_and_a_header_change_conflict(tables):
    repo, setup, _read = tables
    setup({"a.csv": BASE, "b.tsv": "x\ty\n1\t2\n"},
          {"a.csv": BASE.replace("2,dog", "2,wolf"), "b.tsv": "x\ty\tz\n1\t2\t3\n"},
          {"a.csv": BASE.replace("2,dog", "2,fox"), "b.tsv": "x\ty\n1\t5\n"})
    result = merge_into(repo, "dev", "main")
    got = {c.path: c for c in result.conflicts}
    assert sorted(got) == ["a.csv", "b.tsv"]
    assert "rows 2..2 of the base" in got["a.csv"].details[0]["text"]
    assert "the header changed" in got["b.tsv"].note


def test_jsonl_keyed_and_unkeyed(tables):
    repo, setup, read = tables
    base = '{"id":1,"label":"cat"}\n{"id":2,"label":"dog"}\n'
    ours = '{"id":1,"label":"cat","score":1}\n{"id":2,"label":"dog"}\n{"id":3,"label":"owl"}\n'
    theirs = '{"id":1,"label":"lynx"}\n{"id":2,"label":"dog"}\n{"id":4,"label":"ant"}\n'
    setup({"m.jsonl": base, "u.jsonl": base}, {"m.jsonl": ours, "u.jsonl": base + '{"id":5}\n'},
          {"m.jsonl": theirs, "u.jsonl": base + '{"id":6}\n'})
    result = merge_into(repo, "dev", "main", options=MergeOptions(keys=[("m.jsonl", ("id",))]))
    assert result.status == "merged", [c.to_json() for c in result.conflicts]
    rows = [json.loads(line) for line in read("m.jsonl").splitlines()]
    assert rows == [{"id": 1, "label": "lynx", "score": 1}, {"id": 2, "label": "dog"}, {"id": 3, "label": "owl"},
                    {"id": 4, "label": "ant"}]
    assert read("u.jsonl") == base + '{"id":5}\n{"id":6}\n'


def _region_case(tables, rng, *, clash: bool):
    """A 30,000-row table (several chunks) edited on both sides: cells, deletions,
    rows inserted in the middle and appended; ``clash``: some cells two ways."""
    import random  # noqa: F401  (rng is a random.Random)

    from commitfs.ops.changes import Conflict

    repo, setup, _read = tables
    rows = [[f"img_{i:06d}", rng.choice(["cat", "dog", "owl"]), f"{rng.random():.4f}"] for i in range(30_000)]

    def text(rs):
        return "image_id,label,score\n" + "".join(",".join(r) + "\n" for r in rs)

    picked = rng.sample(range(30_000), 700)
    ours = [list(r) for r in rows]
    theirs = [list(r) for r in rows]
    for i in picked[:200]:
        ours[i][1] = "zebra"
    for i in picked[200:400]:
        theirs[i][2] = "0.0000"
    for i in picked[400:450]:  # the same row, different cells: merges
        ours[i][1], theirs[i][2] = "lynx", "1.0000"
    for i in picked[450:460]:  # the same change on both sides
        ours[i][1] = theirs[i][1] = "same"
    if clash:
        for i in picked[460:463]:
            ours[i][1], theirs[i][1] = "ours", "theirs"
        theirs[picked[463]][1] = "edited"
        ours[picked[463]] = None
        ours[picked[464]][2] = "9.9999"
        theirs[picked[464]] = None
    gone_o, gone_t = set(picked[500:520]), set(picked[520:540])
    ours = [r for i, r in enumerate(ours) if r is not None and i not in gone_o]
    theirs = [r for i, r in enumerate(theirs) if r is not None and i not in gone_t]
    for n in range(10):
        ours.insert(rng.randrange(len(ours)), [f"new_o{n}", "ant", "0.5"])
        theirs.insert(rng.randrange(len(theirs)), [f"new_t{n}", "bee", "0.5"])
    ours.append(["both", "x", "1"])
    theirs.append(["both", "x", "1"])
    setup({"labels.csv": text(rows)}, {"labels.csv": text(ours)}, {"labels.csv": text(theirs)})

    def entry(rev):
        return repo.load_tree(repo.load_commit(repo.refs.lookup_branch(rev)).tree).get("labels.csv")

    head = repo.load_commit(repo.refs.lookup_branch("main"))
    base = repo.load_tree(repo.load_commit(head.parents[0]).tree).get("labels.csv")
    assert len(repo.load_manifest(base.id).chunk_ids) > 3  # the region path has chunks to skip

    def conflict():
        return Conflict("labels.csv", "modify/modify", base, entry("main"), entry("dev"))

    return repo, conflict


@pytest.mark.timeout(120)
@pytest.mark.parametrize("clash", [False, True])
def test_keyed_merge_through_regions_equals_the_whole_parse(tables, clash):
    import random

    from commitfs.ops import tablemerge

    repo, conflict = _region_case(tables, random.Random(7 + clash), clash=clash)
    for prefer in (None, "ours", "theirs") if clash else (None,):
        fast = tablemerge._merge_regions(repo, conflict(), ("image_id",), prefer)
        assert fast is not None  # the region path applied (it is not the fallback)
        whole = tablemerge._merge_whole(repo, conflict(), ("image_id",), prefer)
        assert type(fast) is type(whole), prefer
        if clash and prefer is None:
            assert fast.details == whole.details and len(fast.details) == 5
            assert fast.note == whole.note
        else:
            assert fast.data == whole.data, prefer
