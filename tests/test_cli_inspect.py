"""diff (A [B], -- PATH, --stat, --rows, --key, --values, --json), show's
changes, log --stat, log -- PATH, stats: the command line over ops/contentdiff."""

from __future__ import annotations

import json

import pytest
from core_fixtures import assert_one_line_error, run_cli

from commitfs.cli import main
from commitfs.repo.repository import Repository

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cli(capsys, cache_home):
    def run(*argv, code: int = 0):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc}\nstdout: {out}\nstderr: {err}"
        return out, err

    return run


def labels(n: int, changed=()) -> bytes:
    rows = [f"img/{i:05d}.jpg,{'dog' if i in changed else 'cat'}" for i in range(n)]
    return ("path,label\n" + "\n".join(rows) + "\n").encode()


@pytest.fixture
def history(tmp_path, cli):
    """Three commits: v1; v2 changes 30 rows of labels.csv, adds a tensor;
    v3 only touches notes.txt."""
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    url = str(tmp_path / "repo")
    cli("-r", url, "init")
    d = tmp_path / "d"
    d.mkdir()
    w = {"a": np.zeros((64, 64), np.float32), "b": np.ones(128, np.float32)}
    (d / "labels.csv").write_bytes(labels(2000))
    (d / "model.safetensors").write_bytes(st.save(w))
    (d / "notes.txt").write_text("one\n")
    cli("-r", url, "commit", d, "-m", "v1")
    (d / "labels.csv").write_bytes(labels(2000, changed=range(100, 130)))
    w["a"][3, 3] = 2.0
    w["c"] = np.ones(4, np.float32)
    (d / "model.safetensors").write_bytes(st.save(w))
    cli("-r", url, "commit", d, "-m", "v2")
    (d / "notes.txt").write_text("two\n")
    cli("-r", url, "commit", d, "-m", "v3")
    return url


def test_diff_file_level_default_and_first_parent(history, cli):
    url = history
    out, _ = cli("-r", url, "diff", "main~2", "main~1")
    assert out.splitlines() == [f"M labels.csv ({len(labels(2000))} -> {len(labels(2000, range(100, 130)))})",
                                "M model.safetensors (" + out.split("model.safetensors (")[1].split(")")[0] + ")"]
    out2, _ = cli("-r", url, "diff", "main~1")  # B omitted: main~1 against its first parent
    assert out2 == out
    assert cli("-r", url, "diff", "main~2..main~1")[0] == out
    cli("-r", url, "diff", "main", "--max-rows", "-1", code=2)
    out, _ = cli("-r", url, "diff", "main~2", "main", "--", "notes.txt")
    assert out.splitlines() == ["M notes.txt (4 -> 4)"]
    out, _ = cli("-r", url, "diff", "main~2")  # the root commit: everything added
    assert sorted(line.split()[1] for line in out.splitlines()) == ["labels.csv", "model.safetensors", "notes.txt"]


def test_diff_stat_rows_key_values_json(history, cli):
    url = history
    out, _ = cli("-r", url, "diff", "main~1", "--stat")
    lines = out.splitlines()
    assert "  rows: 0 added, 0 removed, 30 changed, 0 moved" in lines
    assert "  tensors: 1 added, 0 removed, 1 changed, 1 unchanged" in lines
    assert lines[-1] == "2 files changed: 0 added, 0 removed, 2 modified"

    out, _ = cli("-r", url, "diff", "main~1", "--key", "path", "--max-rows", "5", "--", "labels.csv")
    lines = out.splitlines()
    assert lines[1] == "  rows: 0 added, 0 removed, 30 changed"
    assert lines[2] == "  ~ key img/00100.jpg: label: cat -> dog"
    assert lines[-1] == "  ... 25 more rows (--json gives all)" and len(lines) == 8

    out, _ = cli("-r", url, "diff", "main~1", "--rows", "--values", "--", "model.safetensors")
    assert "  + c F32[4]" in out.splitlines()
    assert any(line.startswith("  ~ a F32[64, 64]: bytes changed (max abs diff 2") for line in out.splitlines())

    got = json.loads(cli("-r", url, "diff", "main~1", "--key", "path", "--json", "--max-rows", "5")[0])
    table = next(f["table"] for f in got if f["path"] == "labels.csv")
    assert table["counts"]["changed"] == 30 and len(table["rows"]) == 30  # --json: all rows
    assert table["rows"][0]["cells"] == [{"column": "label", "old": "cat", "new": "dog"}]


def test_bad_table_still_shows_the_file_level_diff(tmp_path, cli, cache_home):
    url = str(tmp_path / "repo")
    cli("-r", url, "init")
    d = tmp_path / "d"
    d.mkdir()
    (d / "t.csv").write_bytes(b"id,v\n1,a\n")
    cli("-r", url, "commit", d, "-m", "v1")
    (d / "t.csv").write_bytes(b'id,v\n1,"a\n2,b\n')
    cli("-r", url, "commit", d, "-m", "v2")
    out, err = cli("-r", url, "diff", "main", "--rows", code=1)
    assert out.splitlines() == ["M t.csv (9 -> 14)"]
    assert_one_line_error(1, err)
    assert "t.csv (new side), line 2: bad quoting" in err  # where the record starts
    out, err = cli("-r", url, "diff", "main", "--rows", "--json", code=1)
    got = json.loads(out)  # still valid JSON, the error beside the file
    assert got[0]["path"] == "t.csv" and "line 2: bad quoting" in got[0]["error"]
    assert_one_line_error(1, err)
    proc = run_cli("-r", url, "diff", "main", "--key", "nope")  # the same contract as a subprocess
    assert proc.stdout.decode().splitlines() == ["M t.csv (9 -> 14)"]
    line = assert_one_line_error(proc.returncode, proc.stderr.decode())
    assert "key column 'nope' is not in the" in line


def test_show_log_stat_and_log_path(history, cli):
    url = history
    out, _ = cli("-r", url, "show", "main~1")
    assert "M labels.csv" in out and "  rows: 0 added, 0 removed, 30 changed, 0 moved" in out
    shown = json.loads(cli("-r", url, "show", "main~1", "--json")[0])
    assert {c["path"]: c.get("rows") for c in shown["changes"]}["labels.csv"]["changed"] == 30

    out, _ = cli("-r", url, "log", "--oneline", "--stat")
    lines = out.splitlines()
    assert lines[0].endswith(" v3") and lines[1] == "M notes.txt (4 -> 4)"
    assert lines[2].endswith(" v2")

    repo = Repository.open(url)
    ids = [repo.resolve(r).hex() for r in ("main", "main~1", "main~2")]
    out, _ = cli("-r", url, "log", "--oneline", "--", "labels.csv")
    assert [line.split()[0] for line in out.splitlines()] == [ids[1][:12], ids[2][:12]]
    out, _ = cli("-r", url, "log", "--oneline", "--", "notes.txt")
    assert [line.split()[0] for line in out.splitlines()] == [ids[0][:12], ids[2][:12]]
    got = json.loads(cli("-r", url, "log", "main~1", "--json", "--stat", "--", "model.safetensors")[0])
    assert [c["id"] for c in got] == ids[1:]
    assert got[0]["changes"][0]["tensors"]["added"] == 1
    out, _ = cli("-r", url, "log", "--", "no/such/path")
    assert out == ""


def test_stats(history, cli):
    url = history
    s = json.loads(cli("-r", url, "stats", "main", "--json")[0])
    assert s["files"] == 3 and s["logical_bytes"] > 0
    # v3 changed only notes.txt: all but that one chunk is shared with its parent
    assert 0 < s["unique_stored_bytes"] <= 16 and s["shared_stored_bytes"] > 0
    assert s["unique_stored_bytes"] + s["shared_stored_bytes"] == s["stored_bytes"]
    r = json.loads(cli("-r", url, "stats", "--json")[0])
    assert r["commits"] == 3 and r["packs"] > 0 and r["chunks"] > 0
    assert r["logical_bytes"] == sum(json.loads(cli("-r", url, "stats", rev, "--json")[0])["logical_bytes"]
                                     for rev in ("main", "main~1", "main~2"))
    out, _ = cli("-r", url, "stats")
    assert "dedup ratio:" in out and "commits:        3" in out


def test_keys_from_the_attributes_file(tmp_path, cli):
    url = str(tmp_path / "repo")
    cli("-r", url, "init")
    d = tmp_path / "d"
    (d / ".commitfs").mkdir(parents=True)
    (d / ".commitfs" / "attributes").write_text("*.csv key=id\n")
    (d / "t.csv").write_bytes(b"id,v\n1,a\n2,b\n")
    cli("-r", url, "commit", d, "-m", "v1")
    (d / "t.csv").write_bytes(b"id,v\n2,b\n1,c\n")
    cli("-r", url, "commit", d, "-m", "v2")
    out, _ = cli("-r", url, "diff", "main", "--rows")
    assert "  ~ key 1: v: a -> c" in out.splitlines()
    got = json.loads(cli("-r", url, "diff", "main", "--json", "--rows")[0])
    assert got[0]["table"]["keys"] == ["id"]
    out, _ = cli("-r", url, "diff", "main", "--rows", "--key", "v")  # --key wins over the file
    assert "  + key c: id=1, v=c" in out.splitlines()
    (d / ".commitfs" / "attributes").write_text("*.csv nokey\n")
    (d / "t.csv").write_bytes(b"id,v\n2,b\n1,d\n")
    cli("-r", url, "commit", d, "-m", "v3")
    out, err = cli("-r", url, "diff", "main", "--rows", code=1)
    assert "M t.csv" in out and "attributes, line 1" in err
