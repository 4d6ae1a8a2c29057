"""The PyTorch example end to end: examples/pytorch/run.sh trains a tiny model with a
multi-worker DataLoader on a mounted sample dataset under `commitfs run`; the weights
commit then answers `commitfs lineage` both ways.

Needs torch (the CPU build: pip install -e ".[example]").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lineage_fixtures import ROOT, cfs

pytestmark = pytest.mark.usefixtures("lineage_env")


def test_pytorch_example(tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, IMAGES="30", EPOCHS="1")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "pytorch" / "run.sh"), str(work)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "epoch 1: loss" in proc.stderr and "on 24 images" in proc.stderr

    datasets, models = str(work / "datasets"), str(work / "models")
    data_id = json.loads(cfs("-r", datasets, "show", "main", "--json").stdout)["id"]
    weights = json.loads(cfs("-r", models, "show", "main", "--json").stdout)
    names = sorted(e["name"] for e in json.loads(cfs("-r", models, "ls", "main", "--json").stdout))
    assert names == ["metrics.json", "model.pt"]

    # What the script logged about its inputs: the exact commit it read, through describe() and params().
    metrics = json.loads(cfs("-r", models, "cat", "main:metrics.json").stdout)
    assert metrics["train_images"] == 24 and metrics["epochs"] == 1
    assert metrics["params"]["commitfs.input.data.commit"] == data_id
    assert metrics["source"]["commit"] == data_id and metrics["source"]["repo"] == datasets

    # The weights load back into the model the script defines.
    check = (
        "import io, subprocess, sys, warnings; warnings.filterwarnings('ignore'); import torch; "
        f"raw = subprocess.run([sys.executable, '-m', 'commitfs', '-r', {models!r}, 'cat', 'main:model.pt'], "
        "capture_output=True, check=True).stdout; "
        "state = torch.load(io.BytesIO(raw)); print(sorted((k, tuple(v.shape)) for k, v in state.items()))"
    )
    shapes = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert "('1.weight', (32, 768))" in shapes and "('3.weight', (4, 32))" in shapes

    # Lineage: upstream of the weights is the dataset commit; downstream of the dataset, the weights.
    up = json.loads(cfs("-r", models, "lineage", "main", "--json").stdout)
    assert [(n["name"], n["repo"], n["id"]) for n in up["upstream"]] == [("data", datasets, data_id)]
    assert up["run"]["command"][-4:] == ["--epochs", "1", "--workers", "2"] and up["run"]["exit_code"] == 0
    down = json.loads(cfs("-r", datasets, "lineage", "main", "--search", models, "--json").stdout)
    assert [(n["repo"], n["id"]) for n in down["downstream"]] == [(models, weights["id"])]
    # The script's own lineage printout (the last lines of run.sh) says the same.
    assert f"{models}@{weights['id'][:12]} (as data)" in proc.stdout
