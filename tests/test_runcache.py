"""The run cache (ops/runcache.py): a run with the same inputs, command, code and declared
environment is not repeated; misses on each change; --no-cache; read-set keys.

Real mounts through ``commitfs run``; the code lives in a clean git work tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lineage_fixtures import cfs

pytestmark = [pytest.mark.usefixtures("lineage_env"), pytest.mark.timeout(240)]

PY = sys.executable

SCRIPT = """
    import os, sys
    root = os.environ["COMMITFS_INPUT_DATA"]
    with open(sys.argv[1], "a") as f:
        f.write("ran\\n")
    labels = open(os.path.join(root, "labels.csv"), "rb").read()
    out = os.environ["COMMITFS_OUTPUT"]
    os.makedirs(out)
    open(os.path.join(out, "model"), "wb").write(labels[:20] + os.environ.get("SEED", "").encode())
"""


@pytest.fixture
def setup(tmp_path, sample_dir):
    data = str(tmp_path / "data")
    cfs("-r", data, "init")
    cfs("-r", data, "commit", sample_dir, "-m", "v1")
    models = str(tmp_path / "models")
    cfs("-r", models, "init")
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(textwrap.dedent(SCRIPT))
    git = ["git", "-C", str(code), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "train.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "train"], check=True)
    return {"data": data, "models": models, "code": code, "git": git, "sample": sample_dir, "tmp": tmp_path,
            "counter": tmp_path / "ran.txt", "n": 0}


def _run(s, *extra, to=None, env=None):
    s["n"] += 1
    proc = cfs("run", "-r", s["models"], "--input", f"data={s['data']}@main", "--output", s["tmp"] / f"out{s['n']}",
               "--to", to or "main", "--json", *extra, "--", PY, "train.py", s["counter"], cwd=s["code"],
               env=env, check=False, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def _ran(s) -> int:
    return len(s["counter"].read_text().splitlines()) if s["counter"].exists() else 0


def _commit_data(s, rel: str, data: bytes) -> None:
    p = s["sample"] / rel
    p.write_bytes(data)
    cfs("-r", s["data"], "commit", s["sample"], "-m", f"change {rel}")


def test_hit_and_misses_on_input_code_env_and_a_dirty_tree(setup):
    s = setup
    first, _ = _run(s)
    assert (first["cache"], _ran(s)) == ("miss", 1)
    meta = json.loads(cfs("-r", s["models"], "show", first["id"], "--json").stdout)["metadata"]
    assert len(meta["lineage.run.key"]) == 64
    hit, err = _run(s)
    assert (hit["cache"], hit["cached_by"], hit["id"], _ran(s)) == ("hit", "key", first["id"], 1)
    assert "run cache hit" in err and hit["cached_repo"] == s["models"]
    # --no-cache runs it (and commits again)
    forced, _ = _run(s, "--no-cache")
    assert forced["cache"] == "disabled" and forced["id"] != first["id"] and _ran(s) == 2
    # A changed input: a miss
    _commit_data(s, "labels.csv", b"path,label\nnew,1\n")
    changed, _ = _run(s)
    assert changed["cache"] == "miss" and _ran(s) == 3
    assert _run(s)[0]["cache"] == "hit" and _ran(s) == 3
    # Changed code (committed): a miss
    with open(s["code"] / "train.py", "a") as f:
        f.write("# v2\n")
    code_run_dirty, _ = _run(s)  # dirty tree: no key at all, it runs
    assert code_run_dirty["cache"].startswith("off: ") and "modified" in code_run_dirty["cache"] and _ran(s) == 4
    meta = json.loads(cfs("-r", s["models"], "show", code_run_dirty["id"], "--json").stdout)["metadata"]
    assert "lineage.run.key" not in meta
    assert _run(s)[0]["cache"].startswith("off: ") and _ran(s) == 5  # still dirty: still runs
    subprocess.run(s["git"] + ["commit", "-q", "-am", "v2"], check=True)
    assert _run(s)[0]["cache"] == "miss" and _ran(s) == 6
    # Declared environment: its value keys the run; undeclared variables do not
    env = dict(os.environ, SEED="1")
    assert _run(s, "--env", "SEED", env=env)[0]["cache"] == "miss" and _ran(s) == 7
    assert _run(s, "--env", "SEED", env=env)[0]["cache"] == "hit" and _ran(s) == 7
    assert _run(s, "--env", "SEED", env=dict(env, SEED="2"))[0]["cache"] == "miss" and _ran(s) == 8
    assert _run(s, "--env", "SEED", env=dict(env, OTHER="x"))[0]["cache"] == "hit" and _ran(s) == 8


def test_read_set_key_hits_when_only_unread_files_changed(setup):
    s = setup
    first, _ = _run(s, "--record-reads")
    assert first["files_read"] == 1 and _ran(s) == 1
    # A new input commit that changes only files the job never read: a hit, by read set
    _commit_data(s, "README.txt", b"a new readme\n")
    _commit_data(s, "train/cat/img_00004.png", b"not really a png")
    hit, err = _run(s, "--record-reads")
    assert (hit["cache"], hit["cached_by"], hit["id"], _ran(s)) == ("hit", "readset", first["id"], 1)
    assert "the same read files" in err
    # Without --record-reads only the whole-input key counts: a miss
    assert _run(s)[0]["cache"] == "miss" and _ran(s) == 2
    # The file it read changed: a miss
    _commit_data(s, "labels.csv", b"path,label\n")
    assert _run(s, "--record-reads")[0]["cache"] == "miss" and _ran(s) == 3


def test_a_cached_commit_removed_by_gc_is_not_a_hit(setup):
    s = setup
    other = str(s["tmp"] / "other")
    cfs("-r", other, "init")
    s_other = dict(s, models=other)
    first, _ = _run(s_other)
    assert _ran(s) == 1
    hit, _ = _run(s, "--cache-from", other)
    assert (hit["cache"], hit["id"], hit["cached_repo"], _ran(s)) == ("hit", first["id"], other, 1)
    # The branch goes, and a real gc removes the commit nothing reaches any more
    # (--grace 0 --force: nothing else writes to this repository).
    cfs("-r", other, "branch", "-d", "main")
    cfs("-r", other, "gc", "--grace", "0", "--force")
    assert not os.path.exists(os.path.join(other, "commits", first["id"]))
    again, _ = _run(s, "--cache-from", other)
    assert again["cache"] == "miss" and again["id"] != first["id"] and _ran(s) == 2
