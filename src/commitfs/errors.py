"""One exception hierarchy for commitfs.

Every error a user can cause or meet derives from CommitfsError and carries a
one-line message; the CLI prints it and exits 1.  Anything else reaching the
CLI is a bug.  errno values exist only in commitfs.fuse.
"""


class CommitfsError(Exception):
    """Base of every expected, user-facing error."""


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


class DamagedRefError(RepositoryError):
    """A branch or tag holds something other than one commit id (empty, not
    hex, trailing bytes), or a name from storage is not a valid ref name.
    The message names the reference."""


class ExpansionLimitError(RepositoryError):
    """A tree expands to more entries than the walk's bound allows (a DAG of
    shared subtrees whose paths multiply): refused rather than walked."""


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


class UsageError(InputError):
    """The command line itself is wrong (a missing operand, options that do not
    go together): the CLI exits 2, as for argparse's own usage errors."""


class OutputError(CommitfsError):
    """Writing the command's output failed (stdout on a full disk, a closed
    descriptor); a broken pipe is not one (the reader left)."""


class NothingToCommitError(CommitfsError):
    """The tree equals the parent's tree; no commit was created."""

    def __init__(self, message: str, commit_id: bytes, warnings: list[str] | None = None):
        super().__init__(message)
        self.commit_id = commit_id
        #: What the scan skipped (special files), so callers can still show it.
        self.warnings = list(warnings or [])


class MountError(CommitfsError):
    """Mounting or unmounting failed."""


class ConflictError(CommitfsError):
    """Two lines of history changed the same paths differently (a commit's rebase, a merge).

    ``paths``: the conflicting paths; ``conflicts``: the engine's Conflict
    records (ops/changes.py), when there are any."""

    def __init__(self, message: str, paths: list[str], conflicts: list | None = None):
        super().__init__(message)
        self.paths = paths
        self.conflicts = list(conflicts or [])


# --- contents of files (tables, tensors) ----------------------------------------
class TableError(CommitfsError):
    """A table cannot be read or compared as asked."""


class TableParseError(TableError):
    """A tabular file (.csv, .tsv, .jsonl, .parquet) does not parse.

    The message names the file, the side of a comparison ("old"/"new", if
    any) and the line (or byte offset, where the line is not known)."""

    def __init__(self, path: str, side: str, reason: str, line: int | None = None, offset: int | None = None):
        self.path, self.side, self.reason, self.line, self.offset = path, side, reason, line, offset
        where = f"line {line}" if line is not None else f"byte {offset}" if offset is not None else ""
        parts = [path + (f" ({side} side)" if side else "")] + ([where] if where else [])
        super().__init__(f"{', '.join(parts)}: {reason}")


class TableKeyError(TableError):
    """A key column is missing, or a key value is not unique."""

    def __init__(self, message: str, key: tuple | None = None):
        super().__init__(message)
        self.key = key


class TensorHeaderError(CommitfsError):
    """A file named .safetensors has no valid safetensors header."""


# --- the web UI (commitfs ui) -------------------------------------------
class UndecodableImageError(CommitfsError):
    """An image file that Pillow cannot decode (the UI shows a placeholder)."""


class ServerError(CommitfsError):
    """The UI's web server cannot start (port in use, bad address)."""


class BadURLError(CommitfsError):
    """A UI URL that names no path of a tree: '..', '.', an empty or encoded-slash
    segment, bad percent-encoding (the page answers 400)."""


class AttributesError(CommitfsError):
    """The attributes file (.commitfs/attributes) does not parse."""


class MergeError(CommitfsError):
    """A merge cannot start: unknown or unsuitable branches, a bad rule."""


class ReadSetError(CorruptObjectError):
    """A commit's read set (``commitfs.object.readset``) is missing, unreadable or malformed."""
