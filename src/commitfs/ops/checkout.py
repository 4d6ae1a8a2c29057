"""Materialise a commit (or a subtree of it) as a plain directory, bit-exact.

All or nothing: the tree is written into a temporary directory beside DEST
(``.DEST.checkout-XXXXXXXX``, same file system) and renamed to DEST only once
every file is written.  A checkout that fails (a corrupt chunk, a full disk,
Ctrl-C) removes the temporary directory and leaves DEST as it was (absent or
empty), so the same command can simply be run again.  A process killed
outright (SIGKILL, power loss) may leave the temporary directory behind;
DEST is still untouched, and the leftover is visible by its name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from commitfs.errors import InputError
from commitfs.model.objects import Kind
from commitfs.ops.browse import lookup_path
from commitfs.repo.reader import FileReader
from commitfs.repo.repository import Repository
from commitfs.repo.treewalk import check_expansion

#: The temporary directory's prefix, before DEST's name.
TEMP_PREFIX = "."
TEMP_SUFFIX = ".checkout-"


def checkout(repo: Repository, commit_id: bytes, dest: str | os.PathLike, path: str = "",
             progress: Callable[[int, int], None] | None = None) -> int:
    """Write the tree at ``path`` of a commit into ``dest`` (absent or empty); return
    files written.  ``progress(bytes_done, bytes_total)`` is called as bytes are written."""
    dest = Path(dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest} exists and is not an empty directory")
    entry = lookup_path(repo, commit_id, path)
    existed = dest.is_dir()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{dest.name}{TEMP_SUFFIX}", dir=dest.parent))
    except OSError as exc:
        raise InputError(f"cannot write {exc.filename or dest}: {exc.strerror or exc}") from None
    try:
        count = _write_tree(repo, entry, tmp, progress)
        os.chmod(tmp, dest.stat().st_mode & 0o7777 if existed else 0o777 & ~_umask())
        os.rename(tmp, dest)  # replaces DEST if it is (still) an empty directory
        return count
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.filename == str(tmp) and exc.filename2 == str(dest):
            raise InputError(f"{dest} was created meanwhile and is not empty: nothing checked out") from None
        shown = exc.filename or dest
        if isinstance(shown, str) and shown.startswith(str(tmp)):
            shown = str(dest) + shown[len(str(tmp)):]
        raise InputError(f"cannot write {shown}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_tree(repo: Repository, entry, root: Path, progress) -> int:
    total = entry.size
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    if not entry.is_dir:
        _write_entry(repo, entry, root / entry.name, advance)
        return 1
    check_expansion(repo, entry.id)  # before writing anything: a DAG must not multiply the files
    count = 0
    stack = [(entry.id, root)]
    while stack:
        tid, where = stack.pop()
        for e in repo.load_tree(tid).entries:
            target = where / e.name
            if e.is_dir:
                target.mkdir()
                stack.append((e.id, target))
            else:
                _write_entry(repo, e, target, advance)
                count += e.kind.is_file
    if progress:
        progress(total, total)
    return count


def _write_entry(repo: Repository, e, target: Path, advance: Callable[[int], None]) -> None:
    if e.kind is Kind.SYMLINK:
        os.symlink(e.target, os.fsencode(target))
        return
    reader = FileReader.open(repo, e.id)
    mode = 0o755 if e.kind is Kind.EXEC else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        for chunk in reader.iter_chunks():
            f.write(chunk)
            advance(len(chunk))
    os.chmod(target, mode)  # the umask must not change what the commit recorded
