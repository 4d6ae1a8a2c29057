"""commitfs: version ML datasets and model weights as content-addressed commits."""

from commitfs.api import Repository, run
from commitfs.errors import CommitfsError

__all__ = ["Repository", "CommitfsError", "run"]
__version__ = "0.1.0"
