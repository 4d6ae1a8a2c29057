"""``commitfs run --log-to mlflow|wandb``: log the run's dataset and output commit ids to
an experiment tracker, when its library is importable (neither is a dependency).

What is logged, as parameters (MLflow ``log_params``; W&B ``config.update``):
``commitfs.input.<name>.commit`` / ``.repo`` for each input,
``commitfs.output.commit``, ``commitfs.output.repo``, ``commitfs.output.branch``,
and ``commitfs.readset`` when reads were recorded.  The run logged to is the
one named by ``$MLFLOW_RUN_ID`` / ``$WANDB_RUN_ID`` when set (the command's
own run, resumed), else a new one.  A tracker that is not installed, or that
fails, is skipped with a warning: the commit is made either way.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping

TRACKERS = ("mlflow", "wandb")


def params(result) -> dict[str, str]:
    out = {}
    for inp in result.inputs:
        out[f"commitfs.input.{inp.name}.commit"] = inp.commit.hex()
        out[f"commitfs.input.{inp.name}.repo"] = inp.url
    if result.commit_id is not None:
        out["commitfs.output.commit"] = result.commit_id.hex()
        out["commitfs.output.repo"] = result.repo
        out["commitfs.output.branch"] = result.branch
    if result.readset is not None:
        out["commitfs.readset"] = result.readset.hex()
    return out


def _mlflow(lib, values: Mapping[str, str], env: Mapping[str, str]) -> str:
    with lib.start_run(run_id=env.get("MLFLOW_RUN_ID") or None) as run:
        lib.log_params(dict(values))
        return run.info.run_id


def _wandb(lib, values: Mapping[str, str], env: Mapping[str, str]) -> str:
    run = lib.init(id=env.get("WANDB_RUN_ID") or None, resume="allow" if env.get("WANDB_RUN_ID") else None)
    try:
        run.config.update(dict(values), allow_val_change=True)
        return run.id
    finally:
        run.finish()


def log_to(trackers: list[str], result, warn: Callable[[str], None], environ: Mapping[str, str] | None = None
           ) -> dict[str, str]:
    """Log ``result`` (an ops.run.RunResult) to each tracker; {tracker: its run id} of those that took it."""
    env = os.environ if environ is None else environ
    done = {}
    values = params(result)
    for name in trackers:
        try:
            lib = importlib.import_module(name)
        except ImportError:
            warn(f"--log-to {name}: the {name} library is not installed here; not logged")
            continue
        try:
            done[name] = (_mlflow if name == "mlflow" else _wandb)(lib, values, env)
        except Exception as exc:  # a tracker's own failure must not lose the commit
            warn(f"--log-to {name}: logging failed ({type(exc).__name__}: {exc}); not logged")
    return done
