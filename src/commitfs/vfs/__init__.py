"""The file-system core (trio, no pyfuse3): inode table, commit views, read-ahead."""

from commitfs.vfs.core import FileSystem, StatFs, VfsOptions
from commitfs.vfs.inode import ROOT_INODE, XATTR_COMMIT, XATTR_ID, XATTR_REPO, Attr

__all__ = ["ROOT_INODE", "XATTR_COMMIT", "XATTR_ID", "XATTR_REPO", "Attr", "FileSystem", "StatFs", "VfsOptions"]
