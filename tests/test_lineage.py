"""Lineage without FUSE: the metadata schema, commit --input, the index, the query, params()."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import commitfs
import commitfs.lineage
from commitfs.errors import InputError
from commitfs.ops import lineage as L
from commitfs.ops.lineage_index import LineageIndex, index_path, query_lineage
from commitfs.repo.repository import Repository, commit_key
from lineage_fixtures import cfs

pytestmark = pytest.mark.usefixtures("lineage_env")


def _dir(tmp_path, name: str, files: dict[str, str]):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def _meta(url: str, rev: str) -> dict:
    return json.loads(cfs("-r", url, "show", rev, "--json").stdout)["metadata"]


@pytest.fixture
def data_repo(tmp_path):
    url = str(tmp_path / "data")
    cfs("-r", url, "init")
    cfs("-r", url, "commit", _dir(tmp_path, "d1", {"labels.csv": "a,1\n"}), "-m", "data v1")
    cfs("-r", url, "commit", _dir(tmp_path, "d2", {"labels.csv": "a,1\nb,2\n"}), "-m", "data v2")
    return url


# --- schema --------------------------------------------------------------------------
def test_parse_input_spec_splits_url_at_the_last_at_sign():
    assert L.parse_input_spec("main") == L.InputSpec("main")
    assert L.parse_input_spec("/data/me@work/repo@v2~1") == L.InputSpec("v2~1", "/data/me@work/repo")
    assert L.parse_input_spec("s3://b/year=2024@main") == L.InputSpec("main", "s3://b/year=2024")
    assert L.parse_input_spec("train=s3://b/p@main", named=True) == L.InputSpec("main", "s3://b/p", "train")
    for bad in ("", "repo@", "@main"):
        with pytest.raises(InputError):
            L.parse_input_spec(bad)
    for bad in ("main", "9x=main", "a-b=main", "=main"):
        with pytest.raises(InputError):
            L.parse_input_spec(bad, named=True)


def test_input_names_must_make_distinct_variables():
    L.check_unique_names([L.InputSpec("a", name="x"), L.InputSpec("b", name="y")])
    with pytest.raises(InputError, match="twice"):
        L.check_unique_names([L.InputSpec("a", name="data"), L.InputSpec("b", name="DATA")])
    with pytest.raises(InputError, match="clashes"):
        L.check_unique_names([L.InputSpec("a", name="x"), L.InputSpec("b", name="x_commit")])


def test_metadata_round_trip():
    a, b = bytes(range(32)), bytes(range(1, 33))
    inputs = [L.Input("/r/data", a, name="train", rev="main"), L.Input("s3://b/p", b)]
    meta = L.input_metadata(inputs)
    assert meta == {
        "lineage.version": "1",
        "lineage.input.0": f"/r/data@{a.hex()}", "lineage.input.0.name": "train", "lineage.input.0.rev": "main",
        "lineage.input.1": f"s3://b/p@{b.hex()}",
    }
    meta.update(L.run_metadata(["python", "train.py", "--lr", "0.1"], 1700000000.25, 1700000060.5, 0,
                               git_commit="c0ffee", git_dirty=True,
                               environ={"MLFLOW_RUN_ID": "mlf1", "WANDB_RUN_ID": "wb2"}))
    parsed = L.parse_lineage(meta)
    assert parsed.problems == []
    assert parsed.inputs == inputs
    assert parsed.run.command == ["python", "train.py", "--lr", "0.1"]
    assert parsed.run.started == "2023-11-14T22:13:20.250Z"
    assert parsed.run.finished == "2023-11-14T22:14:20.500Z"
    assert (parsed.run.exit_code, parsed.run.git_commit, parsed.run.git_dirty) == (0, "c0ffee", True)
    assert (parsed.run.mlflow_run_id, parsed.run.wandb_run_id) == ("mlf1", "wb2")


def test_malformed_metadata_is_reported_not_raised():
    good = "ab" * 32
    parsed = L.parse_lineage({
        "lineage.version": "7",
        "lineage.input.0": "no-at-sign",
        "lineage.input.1": f"/repo@{good[:-2]}",            # short id
        "lineage.input.2": f"/repo@{good}",                 # fine
        "lineage.input.x": "/repo@" + good,
        "lineage.input.3.name": "orphan",
        "lineage.input.01": f"/repo@{good}",               # leading zero
        "lineage.run.command": "python train.py",           # not JSON
        "lineage.run.exit_code": "zero",
        "lineage.code.git_dirty": "maybe",
        "unrelated": "x",
    })
    assert [i.commit.hex() for i in parsed.inputs] == [good]
    text = "\n".join(parsed.problems)
    for needle in ("lineage.version", "lineage.input.0 is malformed", "lineage.input.1 is malformed",
                   "lineage.input.x", "lineage.input.3.name has no lineage.input.3", "lineage.input.01",
                   "lineage.run.command", "lineage.run.exit_code", "lineage.code.git_dirty"):
        assert needle in text
    assert len(parsed.problems) == 9


def test_reserved_keys_are_refused_with_inputs():
    with pytest.raises(InputError, match="reserved"):
        L.merge_metadata({"lineage.input.0": "x"}, {"lineage.input.0": "y"})
    assert L.merge_metadata({"lineage.input.0": "x"}, {}) == {"lineage.input.0": "x"}


# --- commit --input --------------------------------------------------------------------
def test_commit_input_records_the_commit_a_branch_names_now(tmp_path, data_repo):
    models = str(tmp_path / "models")
    cfs("-r", models, "init")
    v2 = json.loads(cfs("-r", data_repo, "show", "main", "--json").stdout)["id"]
    w = _dir(tmp_path, "w", {"model.bin": "weights"})
    cid = cfs("-r", models, "commit", w, "-m", "trained", "--input", f"{data_repo}@main",
              "--input", f"{data_repo}@main~1", "--meta", "lr=0.1").stdout.strip()
    meta = _meta(models, cid)
    v1 = json.loads(cfs("-r", data_repo, "show", "main~1", "--json").stdout)["id"]
    assert meta["lineage.input.0"] == f"{data_repo}@{v2}"
    assert meta["lineage.input.0.rev"] == "main"
    assert meta["lineage.input.1"] == f"{data_repo}@{v1}"
    assert meta["lineage.version"] == "1" and meta["lr"] == "0.1"
    # The branch moves on; the recorded input does not.
    cfs("-r", data_repo, "commit", _dir(tmp_path, "d3", {"labels.csv": "c,3\n"}), "-m", "data v3")
    assert _meta(models, cid)["lineage.input.0"] == f"{data_repo}@{v2}"


def test_commit_input_in_the_same_repository_and_by_id_prefix(tmp_path, data_repo):
    v1 = json.loads(cfs("-r", data_repo, "show", "main~1", "--json").stdout)["id"]
    cid = cfs("-r", data_repo, "commit", _dir(tmp_path, "f", {"features.npy": "f"}), "-b", "features",
              "-m", "features", "--input", v1[:10]).stdout.strip()
    meta = _meta(data_repo, cid)
    assert meta["lineage.input.0"] == f"{Repository.open(data_repo).url}@{v1}"
    assert meta["lineage.input.0.rev"] == v1[:10]


@pytest.mark.parametrize("spec, message", [
    ("nosuchbranch", "unknown revision 'nosuchbranch'"),
    ("{missing}@main", "no commitfs repository at"),
    ("main~9", "history of main is not that long"),
])
def test_commit_input_that_does_not_resolve_commits_nothing(tmp_path, data_repo, spec, message):
    spec = spec.replace("{missing}", str(tmp_path / "missing"))
    w = _dir(tmp_path, "w", {"model.bin": "weights"})
    proc = cfs("-r", data_repo, "commit", w, "-b", "models", "-m", "x", "--input", spec, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("commitfs: input ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "models" not in json.loads(cfs("-r", data_repo, "branch", "--json").stdout)


def test_commit_input_refuses_hand_written_lineage_keys_beside_it(tmp_path, data_repo):
    w = _dir(tmp_path, "w", {"m": "w"})
    proc = cfs("-r", data_repo, "commit", w, "-b", "m", "-m", "x", "--input", "main",
               "--meta", "lineage.input.0=/x@" + "0" * 64, check=False)
    assert proc.returncode == 1 and "reserved for lineage" in proc.stderr


def test_api_commit_accepts_inputs(tmp_path, data_repo):
    head = commitfs.Repository.open(data_repo).resolve("main")
    with commitfs.Repository.init(tmp_path / "models") as models:
        cid = models.commit(_dir(tmp_path, "w", {"m": "1"}), message="a", inputs=[f"{data_repo}@main"])
        assert models.show(cid)["metadata"]["lineage.input.0"].endswith("@" + head)
        cid2 = models.commit(_dir(tmp_path, "w2", {"m": "2"}), message="b", inputs={"train": f"{data_repo}@main"})
        meta = models.show(cid2)["metadata"]
        assert meta["lineage.input.0.name"] == "train" and meta["lineage.input.0"].endswith(head)
        with pytest.raises(commitfs.CommitfsError, match="unknown revision"):
            models.commit(_dir(tmp_path, "w3", {"m": "3"}), message="c", inputs=[f"{data_repo}@nope"])
        assert models.resolve("main") == cid2


# --- the query, across a local and an S3 repository -----------------------------------------
def test_lineage_both_ways_across_local_and_s3(tmp_path, s3_url, data_repo):
    # data (local) -> features (S3) -> model (local); model also reads data directly.
    cfs("-r", s3_url, "init")
    feats = cfs("-r", s3_url, "commit", _dir(tmp_path, "f", {"x.bin": "features"}), "-m", "features",
                "--input", f"{data_repo}@main").stdout.strip()
    models = str(tmp_path / "models")
    cfs("-r", models, "init")
    model = cfs("-r", models, "commit", _dir(tmp_path, "w", {"m.pt": "w"}), "-m", "model",
                "--input", f"{s3_url}@main", "--input", f"{data_repo}@main").stdout.strip()
    data = json.loads(cfs("-r", data_repo, "show", "main", "--json").stdout)["id"]

    up = json.loads(cfs("-r", models, "lineage", model, "--json").stdout)
    assert up["id"] == model and up["problems"] == []
    assert [(n["repo"], n["id"]) for n in up["upstream"]] == [(s3_url, feats), (data_repo, data)]
    assert up["upstream"][0]["summary"] == "features"
    assert [(n["repo"], n["id"]) for n in up["upstream"][0]["inputs"]] == [(data_repo, data)]
    assert up["upstream"][1]["inputs"] == []

    down = json.loads(cfs("-r", data_repo, "lineage", "main", "--json", "--search", s3_url,
                          "--search", models).stdout)
    assert down["searched"] == [s3_url, models]
    direct = {(n["repo"], n["id"]) for n in down["downstream"]}
    assert direct == {(s3_url, feats), (models, model)}
    via_features = next(n for n in down["downstream"] if n["id"] == feats)
    assert [(n["repo"], n["id"]) for n in via_features["downstream"]] == [(models, model)]
    # Default search: the current repository only, which holds no downstream commit.
    assert json.loads(cfs("-r", data_repo, "lineage", "main", "--json").stdout)["downstream"] == []
    # --depth 1 stops after the direct edges.
    d1 = json.loads(cfs("-r", models, "lineage", model, "--json", "--depth", "1").stdout)
    assert d1["upstream"][0]["inputs"] == []
    # Text output names both directions.
    text = cfs("-r", data_repo, "lineage", "main", "--search", s3_url, "--search", models).stdout
    assert f"{s3_url}@{feats[:12]}" in text and f"{models}@{model[:12]}" in text


def test_downstream_sees_commits_made_by_another_process(tmp_path, data_repo):
    models = str(tmp_path / "models")
    cfs("-r", models, "init")
    first = cfs("-r", models, "commit", _dir(tmp_path, "w1", {"m": "1"}), "-m", "one",
                "--input", f"{data_repo}@main").stdout.strip()
    with Repository.open(data_repo) as data, Repository.open(models) as m:
        target = data.resolve("main")
        with L.RepositoryOpener() as opener:
            report = query_lineage(data, target, opener, [m])
        assert [n.commit.hex() for n in report.downstream] == [first]
        # Another process commits (another machine would too: only the store is shared).
        script = textwrap.dedent(f"""
            import commitfs
            r = commitfs.Repository.open({models!r})
            print(r.commit({str(_dir(tmp_path, "w2", {"m": "2"}))!r}, branch="other", message="two",
                           inputs=[{data_repo + "@main"!r}]))
        """)
        second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                check=True).stdout.strip()
        with LineageIndex(m) as index:
            stats = index.update()
            assert (stats.listed, stats.read) == (2, 1)  # only the new commit object was read
            # Ordered by commit time, then id: both may fall in the same second.
            assert sorted(r.commit.hex() for r in index.lookup_downstream(target)) == sorted([first, second])
            assert index.update().read == 0
        with L.RepositoryOpener() as opener:
            report = query_lineage(data, target, opener, [m])
        assert sorted(n.commit.hex() for n in report.downstream) == sorted([first, second])


def test_index_forgets_commits_removed_from_the_store(tmp_path, data_repo):
    models = str(tmp_path / "models")
    cfs("-r", models, "init")
    cid = cfs("-r", models, "commit", _dir(tmp_path, "w1", {"m": "1"}), "-m", "one",
              "--input", f"{data_repo}@main").stdout.strip()
    with Repository.open(data_repo) as data, Repository.open(models) as m, LineageIndex(m) as index:
        target = data.resolve("main")
        index.update()
        assert len(index.lookup_downstream(target)) == 1
        m.store.remove_object(commit_key(bytes.fromhex(cid)))  # as gc would
        assert index.update().removed == 1
        assert index.lookup_downstream(target) == [] and len(index) == 0


def test_index_is_kept_under_the_cache_dir_and_rebuilt_if_deleted(tmp_path, data_repo):
    with Repository.open(data_repo) as data:
        with LineageIndex(data) as index:
            index.update()
            assert index.path == index_path(data)
            assert str(index.path).startswith(os.environ["XDG_CACHE_HOME"])
            assert len(index) == 2
        shutil.rmtree(index_path(data).parent)
        with LineageIndex(data) as index:
            assert index.update().read == 2


def test_unusable_cache_dir_falls_back_to_memory(tmp_path, data_repo, monkeypatch):
    models = str(tmp_path / "models")
    cfs("-r", models, "init")
    cid = cfs("-r", models, "commit", _dir(tmp_path, "w", {"m": "1"}), "-m", "m",
              "--input", f"{data_repo}@main").stdout.strip()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    down = json.loads(cfs("-r", data_repo, "lineage", "main", "--search", models, "--json").stdout)
    assert [n["id"] for n in down["downstream"]] == [cid]


def test_malformed_lineage_in_commits_is_reported_by_the_query(tmp_path, data_repo):
    data_id = json.loads(cfs("-r", data_repo, "show", "main", "--json").stdout)["id"]
    bad = cfs("-r", data_repo, "commit", _dir(tmp_path, "b", {"m": "bad"}), "-b", "bad", "-m", "hand-written",
              "--meta", "lineage.input.0=garbage", "--meta", f"lineage.input.1={data_repo}@{data_id}",
              "--meta", "lineage.run.command=not json").stdout.strip()
    proc = cfs("-r", data_repo, "lineage", "bad", "--json")
    out = json.loads(proc.stdout)
    assert any("lineage.input.0 is malformed" in p for p in out["problems"])
    assert any("lineage.run.command" in p for p in out["problems"])
    assert [n["id"] for n in out["upstream"]] == [data_id]  # the readable input still counts
    # Searching downstream over the repository holding it reports it once, and still answers.
    down = json.loads(cfs("-r", data_repo, "lineage", "main", "--json").stdout)
    assert [n["id"] for n in down["downstream"]] == [bad]
    assert sum("lineage.input.0 is malformed" in p for p in down["problems"]) == 1
    text = cfs("-r", data_repo, "lineage", "bad")
    assert text.returncode == 0 and "commitfs: warning: " in text.stderr and "malformed" in text.stderr


def test_upstream_input_whose_repository_is_gone(tmp_path, data_repo):
    gone = tmp_path / "gone"
    cfs("-r", gone, "init")
    cfs("-r", gone, "commit", _dir(tmp_path, "g", {"x": "1"}), "-m", "g")
    models = str(tmp_path / "models")
    cfs("-r", models, "init")
    cfs("-r", models, "commit", _dir(tmp_path, "w", {"m": "1"}), "-m", "m", "--input", f"{gone}@main",
        "--input", f"{data_repo}@main")
    # A copy of the repository elsewhere, then the original disappears.
    copy = tmp_path / "copy"
    shutil.copytree(gone, copy)
    shutil.rmtree(gone)
    out = json.loads(cfs("-r", models, "lineage", "main", "--json").stdout)
    first, second = out["upstream"]
    assert "no commitfs repository at" in first["error"] and first["summary"] is None
    assert second["error"] is None and second["summary"] == "data v2"
    # A repository that has the commit is used when it is searched (ids are content hashes).
    out = json.loads(cfs("-r", models, "lineage", "main", "--json", "--search", copy, "--search", models).stdout)
    assert out["upstream"][0]["error"] is None and out["upstream"][0]["found_in"] == str(copy)
    text = cfs("-r", models, "lineage", "main").stdout
    assert "error: no commitfs repository at" in text


def test_lineage_usage_errors(tmp_path, data_repo):
    assert cfs("-r", data_repo, "lineage", "nope", check=False).returncode == 1
    assert cfs("-r", data_repo, "lineage", "main", "--depth", "0", check=False).returncode == 1
    assert cfs("-r", data_repo, "lineage", "main", "--upstream", "--downstream", check=False).returncode == 2
    proc = cfs("-r", data_repo, "lineage", "main", "--search", tmp_path / "nothing", check=False)
    assert proc.returncode == 1 and "no commitfs repository" in proc.stderr


# --- params() and inputs() from the environment of `commitfs run` -----------------------------
def test_params_from_the_run_environment():
    a, b = "1" * 64, "2" * 64
    env = L.run_environment([L.Input("/r/data", bytes.fromhex(a), "data", "main"),
                             L.Input("s3://b/p", bytes.fromhex(b), "Base_Model", None)],
                            {"data": "/mnt/x/data", "Base_Model": "/mnt/x/Base_Model"}, "/out")
    assert env["COMMITFS_INPUT_DATA"] == "/mnt/x/data" and env["COMMITFS_INPUT_DATA_COMMIT"] == a
    assert env["COMMITFS_INPUT_BASE_MODEL_COMMIT"] == b and env["COMMITFS_OUTPUT"] == "/out"
    assert commitfs.lineage.params(env) == {
        "commitfs.input.data.commit": a, "commitfs.input.data.repo": "/r/data", "commitfs.input.data.rev": "main",
        "commitfs.input.Base_Model.commit": b, "commitfs.input.Base_Model.repo": "s3://b/p",
    }
    assert commitfs.lineage.inputs(env)["data"].path == "/mnt/x/data"
    assert commitfs.lineage.output_dir(env) == "/out"
    # Set by hand, without COMMITFS_INPUTS: found from the _COMMIT variables.
    assert commitfs.lineage.params({"COMMITFS_INPUT_X": "/p", "COMMITFS_INPUT_X_COMMIT": a}) == {
        "commitfs.input.x.commit": a}
    assert commitfs.lineage.params({}) == {}


def test_describe_outside_a_mount_is_a_clear_error(tmp_path):
    with pytest.raises(commitfs.CommitfsError, match="not inside a commitfs mount"):
        commitfs.lineage.describe(tmp_path)
    with pytest.raises(commitfs.CommitfsError, match="no such file"):
        commitfs.lineage.describe(tmp_path / "missing")
