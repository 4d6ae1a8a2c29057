"""``commitfs run --log-to mlflow|wandb`` (ops/trackers.py).

Neither library is a dependency (nor installed in the test environment): the
"absent" case is the real one here.  The "present" case puts a minimal
stand-in package for each library on the command's PYTHONPATH, with the
few calls commitfs makes (MLflow's ``start_run``/``log_params``, W&B's
``init``/``config.update``/``finish``), writing what it was given to a file:
it checks what commitfs sends, not the trackers themselves.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from lineage_fixtures import cfs

pytestmark = [pytest.mark.usefixtures("lineage_env"), pytest.mark.timeout(120)]

PY = sys.executable
MAKE_OUTPUT = "import os; os.makedirs(os.environ['COMMITFS_OUTPUT']); open(os.environ['COMMITFS_OUTPUT'] + '/m', 'w')"

STUBS = {
    "mlflow/__init__.py": """
        import contextlib, json, os
        class _Info:
            run_id = "mlflow-run-1"
        class _Run:
            info = _Info()
        @contextlib.contextmanager
        def start_run(run_id=None):
            json.dump({"run_id": run_id}, open(os.environ["TRACKER_LOG"] + ".mlflow.start", "w"))
            yield _Run()
        def log_params(params):
            json.dump(params, open(os.environ["TRACKER_LOG"] + ".mlflow", "w"))
    """,
    "wandb/__init__.py": """
        import json, os
        class _Config:
            def update(self, values, allow_val_change=False):
                json.dump(values, open(os.environ["TRACKER_LOG"] + ".wandb", "w"))
        class _Run:
            id = "wandb-run-1"
            config = _Config()
            def finish(self):
                open(os.environ["TRACKER_LOG"] + ".wandb.finished", "w").close()
        def init(id=None, resume=None):
            json.dump({"id": id, "resume": resume}, open(os.environ["TRACKER_LOG"] + ".wandb.init", "w"))
            return _Run()
    """,
}


@pytest.fixture
def repos(tmp_path, sample_dir):
    data, models = str(tmp_path / "data"), str(tmp_path / "models")
    cfs("-r", data, "init")
    data_id = cfs("-r", data, "commit", sample_dir, "-m", "v1").stdout.strip()
    cfs("-r", models, "init")
    return data, data_id, models


def _run(tmp_path, repos, *extra, env=None):
    data, _, models = repos
    return cfs("run", "-r", models, "--input", f"data={data}@main", "--output", tmp_path / "out", "--to", "main",
               "--json", *extra, "--", PY, "-c", MAKE_OUTPUT, env=env, check=False, cwd=tmp_path)


def test_an_absent_tracker_is_skipped_with_a_message(tmp_path, repos):
    proc = _run(tmp_path, repos, "--log-to", "mlflow", "--log-to", "wandb")
    assert proc.returncode == 0, proc.stderr
    assert "--log-to mlflow: the mlflow library is not installed here; not logged" in proc.stderr
    assert "--log-to wandb: the wandb library is not installed here; not logged" in proc.stderr
    assert "Traceback" not in proc.stderr and json.loads(proc.stdout)["logged_to"] == {}
    bad = _run(tmp_path, repos, "--log-to", "tensorboard")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_present_trackers_get_the_input_and_output_commit_ids(tmp_path, repos):
    data, data_id, models = repos
    stubs = tmp_path / "stubs"
    for rel, body in STUBS.items():
        (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
        (stubs / rel).write_text(textwrap.dedent(body))
    log = tmp_path / "tracker"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(stubs), os.environ.get("PYTHONPATH")) if p),
               TRACKER_LOG=str(log), MLFLOW_RUN_ID="abc123")
    proc = _run(tmp_path, repos, "--log-to", "mlflow", "--log-to", "wandb", env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["logged_to"] == {"mlflow": "mlflow-run-1", "wandb": "wandb-run-1"}
    expected = {"commitfs.input.data.commit": data_id, "commitfs.input.data.repo": data,
                "commitfs.output.commit": out["id"], "commitfs.output.repo": models, "commitfs.output.branch": "main"}
    assert json.loads((tmp_path / "tracker.mlflow").read_text()) == expected
    assert json.loads((tmp_path / "tracker.wandb").read_text()) == expected
    assert json.loads((tmp_path / "tracker.mlflow.start").read_text()) == {"run_id": "abc123"}  # the command's run
    assert json.loads((tmp_path / "tracker.wandb.init").read_text()) == {"id": None, "resume": None}
    assert (tmp_path / "tracker.wandb.finished").exists()
