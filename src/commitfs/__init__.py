"""commitfs: version ML datasets and model weights as content-addressed commits."""

from commitfs.errors import CommitfsError

__all__ = ["Repository", "CommitfsError", "run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Python API is imported on first use, not with the package: every
    # ``commitfs`` process (the CLI, the mount daemon) imports this package,
    # and the API pulls in most of commitfs (a mount's start-up time).
    if name in ("Repository", "run"):
        from commitfs import api

        return getattr(api, name)
    raise AttributeError(f"module 'commitfs' has no attribute {name!r}")
