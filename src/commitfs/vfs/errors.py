"""Errors of the file-system core, besides those of commitfs.errors.

Each names a condition, not an errno: commitfs.fuse maps them (and the
general ones: PathNotFoundError, NotADirectoryError_, IsADirectoryError_,
StorageError, CorruptObjectError...) to errno values in one place.
"""

from commitfs.errors import CommitfsError, StorageError


class ReadOnlyError(CommitfsError):
    """A write of any kind: the mount is read-only."""


class NoSuchAttributeError(CommitfsError):
    """An extended attribute the node does not have."""


class StaleInodeError(CommitfsError):
    """The kernel named an inode the table does not (or no longer) know."""


class BadHandleError(CommitfsError):
    """A file or directory handle that is not open."""


class NotASymlinkError(CommitfsError):
    """readlink of something that is not a symbolic link."""


class ShuttingDownError(CommitfsError):
    """The file system stopped while a request was waiting for data."""


# --- writable workspaces ---------------------------------------------------------
class NoSpaceError(CommitfsError):
    """The workspace's disk is full."""


class ExistsError(CommitfsError):
    """The name already exists (create, mkdir, symlink, rename with RENAME_NOREPLACE)."""


class NotEmptyError(CommitfsError):
    """rmdir of, or rename over, a directory that is not empty."""


class NotPermittedError(CommitfsError):
    """An operation the workspace does not support for this kind of node: hard links,
    special files (FIFOs, sockets, devices), changing the owner."""


class UnsupportedError(CommitfsError):
    """An operation the workspace does not support at all (extended attributes, RENAME_EXCHANGE)."""


class InvalidArgumentError(CommitfsError):
    """A request that cannot be right (a directory moved into itself)."""


class NameTooLongError(CommitfsError):
    """A new name longer than NAME_MAX (255 bytes), as ext4 refuses it."""


class WorkspaceIOError(StorageError):
    """The workspace's own disk failed (an fdatasync of a data file): EIO, one line."""


class OverlayBusyError(WorkspaceIOError):
    """A worker thread abandoned after an I/O timeout still holds the overlay's
    database: a change on the event loop is refused (EIO) rather than wait for it."""
