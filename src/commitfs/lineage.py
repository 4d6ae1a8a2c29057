"""Lineage helpers for training code: what exactly did this run read?

    import commitfs.lineage
    mlflow.log_params(commitfs.lineage.params())       # inputs of `commitfs run`
    src = commitfs.lineage.describe("/mnt/data/train")  # any path in a mount
    print(src.repo, src.commit, src.id)

``describe`` reads the extended attributes a commitfs mount exposes on every
file and directory (``user.commitfs.repo``, ``user.commitfs.commit``,
``user.commitfs.id``), so it works for mounts made by ``commitfs run`` and
by ``commitfs mount`` alike, and costs no repository access.  ``params``
reads the ``COMMITFS_INPUT_*`` environment ``commitfs run`` gives the
command.  Neither needs anything but the standard library.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from commitfs.errors import CommitfsError, PathNotFoundError
from commitfs.ops.lineage import ENV_NAMES, ENV_OUTPUT, ENV_PREFIX

XATTR_REPO = "user.commitfs.repo"
XATTR_COMMIT = "user.commitfs.commit"
XATTR_ID = "user.commitfs.id"

__all__ = ["Source", "RunInput", "describe", "params", "inputs", "output_dir"]


@dataclass(frozen=True)
class Source:
    """Where a path inside a commitfs mount comes from."""

    path: str    # absolute path as given
    repo: str    # repository URL
    commit: str  # full commit id (hex) the mount shows
    id: str      # content id (hex): file id, tree id, or symlink target id

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _xattr(path: str, name: str) -> str:
    try:
        return os.getxattr(path, name).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        raise PathNotFoundError(f"{path}: no such file or directory") from None
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG):
            raise CommitfsError(f"{path} is not inside a commitfs mount (it has no {name} attribute)") from None
        raise CommitfsError(f"{path}: cannot read {name}: {exc.strerror or exc}") from None


def describe(path: str | os.PathLike) -> Source:
    """Repository URL, commit id and content id of a path inside a commitfs mount.

    Raises CommitfsError if the path is not inside one."""
    p = os.path.abspath(os.fspath(path))
    return Source(path=p, repo=_xattr(p, XATTR_REPO), commit=_xattr(p, XATTR_COMMIT), id=_xattr(p, XATTR_ID))


@dataclass(frozen=True)
class RunInput:
    """One input of the current ``commitfs run``."""

    name: str
    path: str | None
    commit: str
    repo: str | None
    rev: str | None


def _input_names(env: Mapping[str, str]) -> list[str]:
    listed = env.get(ENV_NAMES)
    if listed is not None:
        return [n for n in listed.split(",") if n]
    # Not started by `commitfs run` (variables set by hand): every
    # COMMITFS_INPUT_<NAME> that has a matching _COMMIT.
    names = []
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key.endswith("_COMMIT"):
            names.append(key[len(ENV_PREFIX):-len("_COMMIT")].lower())
    return names


def inputs(environ: Mapping[str, str] | None = None) -> dict[str, RunInput]:
    """The inputs of the current ``commitfs run``, by name ({} outside one)."""
    env = os.environ if environ is None else environ
    out = {}
    for name in _input_names(env):
        var = ENV_PREFIX + name.upper()
        commit = env.get(var + "_COMMIT")
        if not commit:
            continue
        out[name] = RunInput(name=name, path=env.get(var), commit=commit, repo=env.get(var + "_REPO"),
                             rev=env.get(var + "_REV"))
    return out


def params(environ: Mapping[str, str] | None = None, prefix: str = "commitfs.") -> dict[str, str]:
    """A flat dict of the current run's inputs, for ``mlflow.log_params`` or
    ``wandb.config.update``: ``commitfs.input.<name>.commit``, ``.repo`` and
    ``.rev`` (when known).  Empty outside ``commitfs run``."""
    out = {}
    for name, inp in inputs(environ).items():
        key = f"{prefix}input.{name}"
        out[f"{key}.commit"] = inp.commit
        if inp.repo:
            out[f"{key}.repo"] = inp.repo
        if inp.rev:
            out[f"{key}.rev"] = inp.rev
    return out


def output_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The directory ``commitfs run`` will commit (its --output), or None."""
    env = os.environ if environ is None else environ
    return env.get(ENV_OUTPUT)
