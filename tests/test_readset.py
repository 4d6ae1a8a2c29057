"""``commitfs run --record-reads``: the read set of a run (vfs/readlog.py, ops/readset.py),
``lineage REV --files``, ``lineage --trained-on`` through the lineage index, bad read sets.

Real FUSE mounts through ``commitfs run``; ``lineage_env`` fails a test that leaves a mount.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lineage_fixtures import cfs

pytestmark = [pytest.mark.usefixtures("lineage_env"), pytest.mark.timeout(180)]

PY = sys.executable

LOADER = """
    import json, os, sys
    import torch
    from torch.utils.data import DataLoader, Dataset

    root = os.environ["COMMITFS_INPUT_DATA"]
    images = sorted(os.path.relpath(os.path.join(d, f), root)
                    for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)
    subset = images[int(sys.argv[1])::int(sys.argv[2])]
    # Opened but never read, and only looked at: neither is a read.
    open(os.path.join(root, "labels.csv"), "rb").close()
    os.stat(os.path.join(root, "README.txt"))

    class Images(Dataset):
        def __len__(self):
            return len(subset)

        def __getitem__(self, i):
            with open(os.path.join(root, subset[i]), "rb") as f:
                return torch.tensor(len(f.read()))

    total = sum(int(b.sum()) for b in DataLoader(Images(), batch_size=2, num_workers=2))
    out = os.environ["COMMITFS_OUTPUT"]
    os.makedirs(out)
    json.dump({"read": subset, "bytes": total}, open(os.path.join(out, "read.json"), "w"))
"""


# The same reads without torch (for the tests about what happens to a read set afterwards).
PLAIN = """
    import json, os, sys
    root = os.environ["COMMITFS_INPUT_DATA"]
    images = sorted(os.path.relpath(os.path.join(d, f), root)
                    for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)
    subset = images[int(sys.argv[1])::int(sys.argv[2])]
    total = sum(len(open(os.path.join(root, p), "rb").read()) for p in subset)
    out = os.environ["COMMITFS_OUTPUT"]
    os.makedirs(out)
    json.dump({"read": subset, "bytes": total}, open(os.path.join(out, "read.json"), "w"))
"""


@pytest.fixture
def data(tmp_path, sample_dir):
    url = str(tmp_path / "data")
    cfs("-r", url, "init")
    cid = cfs("-r", url, "commit", sample_dir, "-m", "sample v1").stdout.strip()
    ids = {e["path"]: e["id"] for e in json.loads(cfs("-r", url, "ls", "-R", "main", "--json").stdout)}
    return url, cid, ids


def _models(tmp_path, name="models") -> str:
    url = str(tmp_path / name)
    cfs("-r", url, "init")
    return url


def _train(tmp_path, data_url, models, start: int, step: int, *extra, body: str = PLAIN) -> dict:
    script = tmp_path / ("loader.py" if body is LOADER else "plain.py")
    script.write_text(textwrap.dedent(body))
    out = tmp_path / f"out-{models.rsplit('/', 1)[-1]}-{start}-{step}"
    proc = cfs("run", "-r", models, "--record-reads", "--input", f"data={data_url}@main", "--output", out,
               "--to", "main", "--json", *extra, "--", PY, script, str(start), str(step), timeout=180)
    return json.loads(proc.stdout)


def test_a_two_worker_dataloader_records_exactly_the_files_it_read(tmp_path, data):
    data_url, data_id, ids = data
    models = _models(tmp_path)
    out = _train(tmp_path, data_url, models, 0, 2, body=LOADER)
    read = json.loads(cfs("-r", models, "cat", "main:read.json").stdout)["read"]
    assert 2 <= len(read) < len([p for p in ids if p.endswith(".png") and p.startswith("train/")])
    assert out["files_read"] == len(read) and out["readset"]

    files = json.loads(cfs("-r", models, "lineage", "main", "--files", "--json").stdout)
    assert files["complete"] is True and files["readset"] == out["readset"]
    assert [(f["input"], f["repo"], f["commit"]) for f in files["files"]] == [("data", data_url, data_id)] * len(read)
    # Exactly the files the script read (not labels.csv, opened only; not README.txt, stat'ed),
    # with their content ids, sorted by path.
    assert [(f["path"], f["id"]) for f in files["files"]] == [(p, ids[p]) for p in sorted(read)]
    meta = json.loads(cfs("-r", models, "show", "main", "--json").stdout)["metadata"]
    assert meta["commitfs.object.readset"] == out["readset"] and meta["lineage.readset.files"] == str(len(read))
    text = cfs("-r", models, "lineage", "main", "--files").stdout.splitlines()
    assert [ln.split("\t")[-1] for ln in text] == sorted(read)
    # fsck checks the read set too
    assert json.loads(cfs("-r", models, "fsck", "--json").stdout)["ok"] is True


def test_trained_on_across_two_repositories(tmp_path, data):
    data_url, data_id, ids = data
    a, b = _models(tmp_path, "models-a"), _models(tmp_path, "models-b")
    _train(tmp_path, data_url, a, 0, 2)   # even images
    _train(tmp_path, data_url, b, 0, 3)   # every third: shares images 0, 6, ... with a
    read_a = set(json.loads(cfs("-r", a, "cat", "main:read.json").stdout)["read"])
    read_b = set(json.loads(cfs("-r", b, "cat", "main:read.json").stdout)["read"])
    ca = json.loads(cfs("-r", a, "show", "main", "--json").stdout)["id"]
    cb = json.loads(cfs("-r", b, "show", "main", "--json").stdout)["id"]
    images = sorted(p for p in ids if p.startswith("train/") and p.endswith(".png"))
    assert read_a & read_b and read_a - read_b and set(images) - read_a - read_b
    # Every image, in-process (the same code as the CLI's, without a process per query) ...
    from commitfs.ops.lineage_index import trained_on
    from commitfs.repo.repository import Repository

    with Repository.open(data_url) as d, Repository.open(a) as ra, Repository.open(b) as rb:
        reports = {p: trained_on(d, bytes.fromhex(data_id), p, [ra, rb]).to_json() for p in images}
    # ... and one through the command line, whose JSON is the same.
    shared = sorted(read_a & read_b)[0]
    proc = cfs("lineage", "--trained-on", f"{data_url}@main:{shared}", "--search", a, "--search", b, "--json")
    assert json.loads(proc.stdout) == reports[shared]
    for path, report in reports.items():
        assert report["file_id"] == ids[path] and report["problems"] == []
        expected = sorted(([(a, ca)] if path in read_a else []) + ([(b, cb)] if path in read_b else []))
        assert sorted((r["repo"], r["id"]) for r in report["readers"]) == expected, path
        assert all(r["input"] == "data" and r["input_id"] == data_id and r["path"] == path
                   for r in report["readers"])
    # Text form, and the default search repository (-r)
    lines = cfs("-r", a, "lineage", "--trained-on", f"{data_url}@main:{shared}").stdout.splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(f"{a}@{ca[:12]}  as data ")
    err = cfs("lineage", "--trained-on", f"{data_url}@main:nosuch.png", "--search", a, check=False).stderr
    assert err.startswith("commitfs: ") and "Traceback" not in err


def test_missing_or_corrupt_read_sets_are_reported(tmp_path, data):
    data_url, data_id, ids = data
    models = _models(tmp_path)
    # A commit naming a read set that does not exist ...
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w").write_text("weights")
    cfs("-r", models, "commit", tmp_path / "m", "-m", "missing", "--meta", "commitfs.object.readset=" + "ab" * 32,
        "--input", f"{data_url}@main")
    proc = cfs("-r", models, "lineage", "main", "--files", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("commitfs: read set abababababab is missing or unreadable")
    # ... and one naming a file that is not a read set.
    (tmp_path / "m" / "bogus.txt").write_text("not a read set\n")
    cfs("-r", models, "commit", tmp_path / "m", "-m", "bad")
    bogus = next(e["id"] for e in json.loads(cfs("-r", models, "ls", "main", "--json").stdout)
                 if e["path"] == "bogus.txt")
    cfs("-r", models, "commit", tmp_path / "m", "-b", "corrupt", "-m", "corrupt", "--meta",
        f"commitfs.object.readset={bogus}")
    proc = cfs("-r", models, "lineage", "corrupt", "--files", check=False)
    assert proc.returncode == 1 and "is malformed" in proc.stderr and len(proc.stderr.splitlines()) == 1
    # fsck and --trained-on report both, without a traceback
    fsck = cfs("-r", models, "fsck", check=False)
    assert fsck.returncode != 0 and "Traceback" not in fsck.stderr
    assert "is missing or unreadable" in fsck.stdout + fsck.stderr and "is malformed" in fsck.stdout + fsck.stderr
    proc = cfs("-r", models, "lineage", "--trained-on", f"{data_url}@main:labels.csv", "--json")
    problems = json.loads(proc.stdout)["problems"]
    assert any("missing or unreadable" in p for p in problems) and any("malformed" in p for p in problems)
    # A commit without a read set says so
    proc = cfs("-r", data_url, "lineage", "main", "--files", check=False)
    assert proc.returncode == 1 and "has no read set" in proc.stderr


def test_a_run_killed_while_recording_commits_nothing_and_leaves_no_mounts(tmp_path, data):
    models = _models(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        open(os.path.join(os.environ["COMMITFS_INPUT_DATA"], "labels.csv"), "rb").read()
        os.makedirs(os.environ["COMMITFS_OUTPUT"])
        open({str(marks)!r} + "/started", "w").close()
        time.sleep(60)
    """))
    run = subprocess.Popen([PY, "-m", "commitfs", "-r", models, "run", "--record-reads", "--input",
                            f"data={data[0]}@main", "--output", str(tmp_path / "out"), "--to", "main", "--",
                            PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (marks / "started").exists():
            assert time.monotonic() < deadline and run.poll() is None, "the command did not start"
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM and "nothing committed" in err
    assert json.loads(cfs("-r", models, "branch", "--json").stdout) == {}
    assert not list(Path(os.environ["TMPDIR"]).glob("commitfs-reads-*"))


def test_read_sets_travel_with_push_and_clone(tmp_path, data, s3_url):
    data_url, _, ids = data
    models = _models(tmp_path)
    _train(tmp_path, data_url, models, 1, 4)
    local = json.loads(cfs("-r", models, "lineage", "main", "--files", "--json").stdout)
    cfs("-r", s3_url, "init")
    cfs("-r", models, "push", s3_url, "main")
    clone = str(tmp_path / "clone")
    cfs("clone", s3_url, clone)
    for url in (s3_url, clone):
        assert json.loads(cfs("-r", url, "lineage", "main", "--files", "--json").stdout) == local
    assert json.loads(cfs("-r", clone, "fsck", "--json").stdout)["ok"] is True
