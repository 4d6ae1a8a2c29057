"""Fixtures and helpers for the repository-core tests (model, repo, ops, CLI).

Registered in conftest.py's ``pytest_plugins``; test modules also import the
plain helpers from here (``from core_fixtures import describe, ...``).

* ``cache_home``: a private XDG_CACHE_HOME (the stat cache lives there) and a
  fixed COMMITFS_AUTHOR, so no test touches the developer's ~/.cache.
* ``repo``: a fresh Repository on ``store_url`` (local directory, then S3).
* ``local_url`` / ``local_repo``: the same, on a local directory only (for
  tests that flip bytes on disk or mount a tmpfs).
* ``small_tmpfs``: a 1 MiB tmpfs, unmounted even if the test fails.
* ``describe(root)``: a comparable picture of a directory tree (kinds,
  executable bits, bytes, symlink targets).
* ``make_random_tree(root, rng, big=...)``: a randomized tree with every kind
  of entry the format stores.
* ``run_cli(...)`` / ``cli_fails(...)``: ``python -m commitfs`` as a
  subprocess, and the one-line-error contract.
"""

from __future__ import annotations

import json
import os
import random
import stat
import contextlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from commitfs.ops.fsck import fsck
from commitfs.repo.pack import ENTRY as PACK_ENTRY
from commitfs.repo.pack import FOOTER as PACK_FOOTER
from commitfs.repo.repository import CONFIG_KEY, Repository
from commitfs.storage.base import Store
from commitfs.storage.url import open_store
from commitfs.storage.faulty import FaultyStore

# Bytes a pack adds around its blobs: one table entry per blob plus a footer.
PACK_ENTRY_SIZE = PACK_ENTRY.size
PACK_FOOTER_SIZE = PACK_FOOTER.size


# --- fixtures ---------------------------------------------------------------------
@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A private stat-cache home and a fixed author for every commit; closes
    the stores ``reopen`` shared during the test."""
    home = tmp_path / "xdg-cache"
    home.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setenv("COMMITFS_AUTHOR", "tester@example")
    monkeypatch.delenv("COMMITFS_REPO", raising=False)
    yield home
    while _STORES:
        _STORES.popitem()[1].close()


@pytest.fixture
def repo(store_url, cache_home):
    """A fresh repository on both backends."""
    r = Repository.init(store_url)
    yield r
    r.close()


@pytest.fixture
def local_url(tmp_path, cache_home):
    return str(tmp_path / "repo")


@pytest.fixture
def local_repo(local_url):
    r = Repository.init(local_url)
    yield r
    r.close()


@pytest.fixture
def versions(local_repo, tmp_path):
    """commit(name, data) -> the TreeEntry of that file in a new commit of local_repo."""
    import shutil

    from commitfs.ops.browse import lookup_path
    from commitfs.ops.snapshot import commit_directory

    n = [0]

    def commit(name: str, data: bytes):
        n[0] += 1
        d = tmp_path / f"v{n[0]}"
        d.mkdir()
        (d / name).write_bytes(data)
        cid = commit_directory(local_repo, d, message=f"v{n[0]}").commit_id
        shutil.rmtree(d)
        return lookup_path(local_repo, cid, name)

    return commit


@contextlib.contextmanager
def mounted_tmpfs(where, size: str):
    """A tmpfs of ``size`` at ``where`` (the machine runs as root); always unmounted."""
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for a full-disk test: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs; always unmounted."""
    with mounted_tmpfs(tmp_path / "tmpfs", "1m") as where:
        yield where


# --- repository helpers ---------------------------------------------------------
# One store per URL for the test's fresh views: an S3 client costs ~0.3 s to
# make, and stores hold no cached content (only connections, descriptors).
_STORES: dict[str, Store] = {}


def shared_store(url: str) -> Store:
    store = _STORES.get(url)
    if store is None:
        store = _STORES[url] = open_store(url)
    return store


class _FreshView(Repository):
    """A Repository over a shared store; closing it leaves the store open."""

    def close(self) -> None:
        pass


def reopen(url: str) -> Repository:
    """A fresh Repository on ``url``: no cached trees, commits or index answers.

    (``Repository.open`` itself, with its format checks, is tested directly.)"""
    store = shared_store(url)
    return _FreshView(store, json.loads(store.load_object(CONFIG_KEY)))


def faulty_repository(url: str) -> Repository:
    """A Repository whose store is a FaultyStore (``repo.store``) over ``url``'s."""
    store = FaultyStore(shared_store(url))
    config = json.loads(store.inner.load_object(CONFIG_KEY))
    return _FreshView(store, config)


_UNSET = object()


def assert_fsck_clean(url: str, read_data: bool = True, *, head=_UNSET, branch: str = "main"):
    """fsck (re-hashing data) finds nothing; with ``head``, ``branch`` names it (None: absent)."""
    with reopen(url) as r:
        if head is not _UNSET:
            assert r.refs.lookup_branch(branch) == head
        report = fsck(r, read_data=read_data)
    assert report.problems == []
    return report


def store_state(url: str) -> tuple[dict[str, int | None], dict[str, bytes]]:
    """Every object key with its size, and every reference: to show nothing changed."""
    store = shared_store(url)
    return {k: store.lookup_size(k) for k in store.iter_keys("")}, dict(store.iter_refs(""))


def pack_bytes(url: str) -> int:
    """The total size of every pack in the repository."""
    store = shared_store(url)
    return sum(store.lookup_size(k) or 0 for k in store.iter_keys("packs/"))


# --- directory trees --------------------------------------------------------------
def describe(root: str | os.PathLike) -> dict[str, tuple]:
    """{relative path: ("dir",) | ("file", executable, bytes) | ("link", target)}.

    Symlinks are never followed; sockets and FIFOs are left out (commitfs skips
    them)."""
    root = os.fsencode(os.fspath(root))
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, root))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = ("file", bool(st.st_mode & stat.S_IXUSR), f.read())
    return out


def age_tree(root: str | os.PathLike, seconds: float = 3600) -> None:
    """Set every entry's mtime ``seconds`` in the past: outside the stat cache's racy window."""
    t = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (t, t), follow_symlinks=False)


def write_file(path: Path, data: bytes, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755 if executable else 0o644)
    return path


_NAMES = [
    "a", "b.txt", "données.csv", "日本語", "emoji-😀", "space name", "UPPER", ".hidden",
    "tab\tname", "new\nline", "x" * 200, "ÅÄÖ", "Ωmega", "-dash", "weights.bin", "z",
]


def _content(rng: random.Random, size: int) -> bytes:
    if rng.random() < 0.3:  # compressible text
        line = f"{rng.randrange(10**6)},label_{rng.randrange(100)},{rng.random():.6f}\n".encode()
        return (line * (size // len(line) + 1))[:size]
    return rng.randbytes(size)


def make_random_tree(root: Path, rng: random.Random, *, big: int = 1 << 20, depth: int = 3,
                     width: int = 5) -> dict[str, tuple]:
    """Fill ``root`` with a random tree; return ``describe(root)``.

    Always present, besides the random part: an empty file, an empty
    directory, a nested chain of directories, Unicode names, an executable, a file of ``big``
    bytes (many chunks), identical files in two places, symlinks (relative,
    absolute, dangling, to a directory, to itself)."""
    root.mkdir(parents=True, exist_ok=True)
    contents: list[bytes] = []

    def fill(d: Path, level: int) -> None:
        names = rng.sample(_NAMES, rng.randint(0, width))
        for name in names:
            roll = rng.random()
            p = d / name
            if roll < 0.45:
                data = _content(rng, rng.choice([0, 1, 100, 5000, 70_000, 200_000]))
                write_file(p, data, executable=rng.random() < 0.2)
                contents.append(data)
            elif roll < 0.55 and contents:
                write_file(p, rng.choice(contents))  # a duplicate of some earlier file
            elif roll < 0.7:
                os.symlink(rng.choice(["a", "../b.txt", "/etc/hostname", "nowhere/at/all", "日本語", ".."]), p)
            elif level < depth:
                p.mkdir()
                fill(p, level + 1)
            else:
                p.mkdir()  # an empty directory

    fill(root, 0)
    big_data = rng.randbytes(big)
    write_file(root / "fixed" / "big.bin", big_data)
    write_file(root / "fixed" / "copy-of-big.bin", big_data)
    write_file(root / "fixed" / "empty", b"")
    write_file(root / "fixed" / "run.sh", b"#!/bin/sh\necho hi\n", executable=True)
    (root / "fixed" / "empty-dir").mkdir()
    write_file(root / "fixed" / "n1" / "n2" / "n3" / "n4" / "leaf.txt", "feuille ✓\n".encode())
    write_file(root / "fixed" / "données" / "日本語 ✓.txt", "unicode names\n".encode())
    os.symlink("big.bin", root / "fixed" / "link-to-big")
    os.symlink("n1/n2", root / "fixed" / "link-to-dir")
    os.symlink("self", root / "fixed" / "self")
    return describe(root)


# --- the command line -------------------------------------------------------------
def cli_env(**extra: str) -> dict[str, str]:
    """The current environment (including the fixtures' monkeypatched variables)."""
    env = dict(os.environ)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 60,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m commitfs ARGS`` (bytes-transparent: stdout and stderr as bytes)."""
    cmd = (prefix or []) + [sys.executable, "-m", "commitfs", *args]
    return subprocess.run(cmd, capture_output=True, env=env if env is not None else cli_env(),
                          cwd=cwd, timeout=timeout)


def cli_ok(*args: str, **kw) -> subprocess.CompletedProcess:
    proc = run_cli(*args, **kw)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr
    return proc


def assert_one_line_error(returncode: int, stderr: str, code: int = 1) -> str:
    """The CLI error contract: exit ``code``, one line 'commitfs: ...', no traceback."""
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr
    assert lines[0].startswith("commitfs: "), stderr
    return lines[0]


def cli_fails(*args: str, code: int = 1, **kw) -> str:
    """Run the CLI, expect the one-line error; return that line."""
    proc = run_cli(*args, **kw)
    return assert_one_line_error(proc.returncode, proc.stderr.decode(errors="replace"), code)


def unique_name(prefix: str = "x") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
