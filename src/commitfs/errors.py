"""One exception hierarchy for commitfs.

Every error a user can cause or meet derives from CommitfsError and carries a
one-line message; the CLI prints it and exits 1.  Anything else reaching the
CLI is a bug.  errno values exist only in commitfs.fuse.
"""


class CommitfsError(Exception):
    """Base of every expected, user-facing error."""


class WouldBlock(Exception):
    """Not an error: a ``nowait`` read found its bytes not in memory.

    The ``nowait=True`` forms of reads (Store.load_range_nowait,
    Repository.load_chunks/load_manifest/load_tree) never wait for a disk or
    a network; they raise this instead, and the caller repeats the call
    without ``nowait`` in a worker thread.  The mount's event loop uses them
    to serve bytes already in the page cache without a thread hop.  Never
    reaches a user."""


# --- storage -------------------------------------------------------------
class StorageError(CommitfsError):
    """The storage backend failed (I/O error, network, permissions)."""


class ObjectNotFoundError(StorageError):
    """An object key that should exist does not."""


class StorageTimeoutError(StorageError):
    """Storage did not answer within the retry deadline."""


class RefConflictError(CommitfsError):
    """A compare-and-swap on a reference lost: the reference moved meanwhile."""


# --- repository ----------------------------------------------------------
class RepositoryError(CommitfsError):
    """The repository is missing, malformed or of an unknown format."""


class RepositoryNotFoundError(RepositoryError):
    pass


class CorruptObjectError(RepositoryError):
    """Stored bytes do not match their id (bit rot, truncation, tampering)."""


class GcLeaseError(CommitfsError):
    """Another gc holds the gc lease, or a running gc lost its own."""


class GcStoppedError(RepositoryError):
    """gc met damage it cannot reason about (or an unparsable ref): it stopped,
    deleting nothing more."""


class GcInterferenceError(RepositoryError):
    """A concurrent gc condemned or removed data a writer deduplicated against:
    nothing was published, and running the operation again stores that data anew."""


class RevisionError(CommitfsError):
    """A revision is unknown, ambiguous or malformed."""


class PathNotFoundError(CommitfsError):
    """A path does not exist in a commit."""


class NotADirectoryError_(CommitfsError):
    """A path names a file where a directory was expected."""


class IsADirectoryError_(CommitfsError):
    """A path names a directory where a file was expected."""


class InputError(CommitfsError):
    """Bad user input: a missing directory, an unreadable file, a bad name."""


class NothingToCommitError(CommitfsError):
    """The tree equals the parent's tree; no commit was created."""

    def __init__(self, message: str, commit_id: bytes, warnings: list[str] | None = None):
        super().__init__(message)
        self.commit_id = commit_id
        #: What the scan skipped (special files), so callers can still show it.
        self.warnings = list(warnings or [])


class MountError(CommitfsError):
    """Mounting or unmounting failed."""
