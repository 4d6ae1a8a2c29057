"""Defaults from configuration files: ``repo``, ``endpoint_url``, ``author``,
``cache_size``, ``cache_dir``.

Two TOML files (read with tomllib), the nearer one winning key by key:

* the user's: ``$XDG_CONFIG_HOME/commitfs/config.toml`` (default
  ``~/.config/commitfs/config.toml``);
* the repository's (the project's, as DVC's ``.dvc/config``):
  ``.commitfs/config.toml`` in the current directory or the nearest parent
  holding one.

A value given on the command line wins over the environment, which wins
over the files: flag > environment > repository file > user file > built-in
default.  A file that is not valid TOML, a key not listed here or a value of
the wrong type is a one-line error naming the file.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from commitfs.errors import InputError

#: key -> (type, the environment variables that win over it)
KEYS: dict[str, tuple[type, tuple[str, ...]]] = {
    "repo": (str, ("COMMITFS_REPO",)),
    "endpoint_url": (str, ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "COMMITFS_S3_ENDPOINT_URL")),
    "author": (str, ("COMMITFS_AUTHOR",)),
    "cache_size": (str, ("COMMITFS_CACHE_SIZE",)),
    "cache_dir": (str, ("COMMITFS_CACHE_DIR",)),
}
PROJECT_FILE = Path(".commitfs") / "config.toml"


def user_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "commitfs" / "config.toml"


def project_file(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).absolute()
    for d in (here, *here.parents):
        candidate = d / PROJECT_FILE
        if candidate.is_file():
            return candidate
    return None


def _read(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if key not in KEYS:
            raise InputError(f"{path}: unknown setting {key!r} (known: {', '.join(KEYS)})")
        if not isinstance(value, KEYS[key][0]):
            raise InputError(f"{path}: {key} must be a string, got {value!r}")
    return data


def load(cwd: Path | None = None) -> dict[str, str]:
    """The settings of both files merged (the repository's over the user's)."""
    merged = _read(user_file())
    project = project_file(cwd)
    if project is not None:
        merged.update(_read(project))
    return merged


def value(settings: dict[str, str], key: str) -> str | None:
    """``key`` from the files unless one of its environment variables is set (then None:
    the code that reads that variable applies it)."""
    if any(os.environ.get(var) for var in KEYS[key][1]):
        return None
    return settings.get(key)


def from_environment_or_file(settings: dict[str, str], key: str) -> str | None:
    """The first of ``key``'s environment variables that is set, else the files' value."""
    for var in KEYS[key][1]:
        if os.environ.get(var):
            return os.environ[var]
    return settings.get(key)
