"""The Python API's diffs: Repository.diff (file level, as before, and with
contents), diff_table, diff_tensors, path_log, stats."""

from __future__ import annotations

import pytest

import commitfs
from commitfs.errors import TableKeyError
from commitfs.ops.contentdiff import FileDiff
from commitfs.ops.diff import Change

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def repo(tmp_path, cache_home):
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    r = commitfs.Repository.init(str(tmp_path / "repo"))
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "t.csv").write_bytes(b"id,y\n1,a\n2,b\n")
    (d / "m.safetensors").write_bytes(st.save({"w": np.zeros(8, np.float32), "v": np.ones(4, np.float32)}))
    (d / "x.bin").write_bytes(b"x")
    r.commit(d, message="v1")
    (d / "sub" / "t.csv").write_bytes(b"id,y\n1,a\n2,c\n3,d\n")
    (d / "m.safetensors").write_bytes(st.save({"w": np.full(8, 0.5, np.float32), "v": np.ones(4, np.float32)}))
    r.commit(d, message="v2")
    yield r
    r.close()


def test_diff_keeps_its_change_records_and_adds_contents(repo):
    changes = repo.diff("main~1", "main")
    assert all(isinstance(c, Change) for c in changes)
    assert [(c.status, c.path) for c in changes] == [("modified", "m.safetensors"), ("modified", "sub/t.csv")]
    assert [c.path for c in repo.diff("main")] == [c.path for c in changes]   # new omitted: vs first parent
    assert [c.path for c in repo.diff("main~1", "main", paths=["sub"])] == ["sub/t.csv"]
    files = repo.diff("main", contents=True, keys=["id"], values=True)
    assert all(isinstance(f, FileDiff) for f in files)
    by = {f.path: f for f in files}
    t = by["sub/t.csv"].table
    assert t.counts == {"added": 1, "removed": 0, "changed": 1, "moved": 0}
    assert [(c.column, c.old, c.new) for r in t.rows for c in r.cells] == [("y", "b", "c")]
    tz = by["m.safetensors"].tensors
    assert tz.unchanged == ["v"] and tz.changes[0].name == "w" and tz.changes[0].max_abs_diff == 0.5
    assert by["sub/t.csv"].to_json()["table"]["counts"]["added"] == 1


def test_diff_table_tensors_path_log_stats(repo):
    t = repo.diff_table("main~1", "main", "sub/t.csv", keys=["id"])
    assert t.counts["changed"] == 1
    with pytest.raises(TableKeyError):
        repo.diff_table("main~1", "main", "sub/t.csv", keys=["nope"])
    assert repo.diff_tensors("main~1", "main", "m.safetensors").unchanged == ["v"]
    log = repo.path_log("sub/t.csv")
    assert [c["message"] for c in log] == ["v2", "v1"]
    assert [c["message"] for c in repo.path_log("x.bin")] == ["v1"]
    s = repo.stats("main")
    assert s.files == 3 and s.unique_stored_bytes + s.shared_stored_bytes == s.stored_bytes
    assert repo.stats().commits == 2
