"""Materialise a commit (or a subtree of it) as a plain directory, bit-exact."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from commitfs.errors import InputError
from commitfs.model.objects import Kind
from commitfs.ops.browse import lookup_path
from commitfs.repo.reader import FileReader
from commitfs.repo.repository import Repository


def checkout(repo: Repository, commit_id: bytes, dest: str | os.PathLike, path: str = "",
             progress: Callable[[int, int], None] | None = None) -> int:
    """Write the tree at ``path`` of a commit into ``dest`` (absent or empty); return files written."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest} exists and is not an empty directory")
    entry = lookup_path(repo, commit_id, path)
    try:
        if not entry.is_dir:
            dest.mkdir(parents=True, exist_ok=True)
            _write_entry(repo, entry, dest / entry.name)
            return 1
        dest.mkdir(parents=True, exist_ok=True)
        count = 0
        total = entry.size
        done = 0
        stack = [(entry.id, dest)]
        while stack:
            tid, where = stack.pop()
            for e in repo.load_tree(tid).entries:
                target = where / e.name
                if e.is_dir:
                    target.mkdir()
                    stack.append((e.id, target))
                else:
                    _write_entry(repo, e, target)
                    if e.kind.is_file:
                        count += 1
                        done += e.size
                        if progress:
                            progress(done, total)
        return count
    except OSError as exc:
        raise InputError(f"cannot write {exc.filename or dest}: {exc.strerror or exc}") from None


def _write_entry(repo: Repository, e, target: Path) -> None:
    if e.kind is Kind.SYMLINK:
        os.symlink(e.target, os.fsencode(target))
        return
    reader = FileReader.open(repo, e.id)
    mode = 0o755 if e.kind is Kind.EXEC else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        for chunk in reader.iter_chunks():
            f.write(chunk)
    os.chmod(target, mode)  # the umask must not change what the commit recorded
