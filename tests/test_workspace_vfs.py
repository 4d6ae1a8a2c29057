"""The workspace core without a kernel: the crash window of a commit (composed by
fuse/control.py), resolved on reopen."""

from __future__ import annotations

import os
import random
import stat

import pytest
import trio

from core_fixtures import make_random_tree
from commitfs.fuse import control
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from commitfs.vfs.overlay import Overlay
from commitfs.vfs.workspace import WorkspaceFS


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def run_until_crash(fn, *args) -> None:
    try:
        trio.run(fn, *args)
    except Crash:
        return
    except BaseExceptionGroup as group:
        assert group.subgroup(Crash) is not None, group
        return
    raise AssertionError("no crash")


@pytest.fixture
def repo_and_base(tmp_path, cache_home):
    src = tmp_path / "src"
    make_random_tree(src, random.Random(3), big=100_000)
    repo = Repository.init(str(tmp_path / "repo"))
    base = commit_directory(repo, src, message="base").commit_id
    yield repo, base
    repo.close()


async def _edit_and_commit(fs: WorkspaceFS) -> None:
    async with fs.running():
        fh, _ = await fs.create(1, b"new.txt", 0o644, os.O_WRONLY)
        await fs.write(fh, 0, b"new bytes")
        await fs.release(fh)
        await fs.mkdir(1, b"made", 0o755)
        await control.commit(fs, "crashing")


def _open(repo, ws) -> WorkspaceFS:
    return WorkspaceFS.open_workspace(repo, str(ws), "main")


def test_crash_after_the_branch_moved_resolves_to_the_new_commit(repo_and_base, tmp_path, monkeypatch):
    repo, base = repo_and_base
    ws = tmp_path / "ws"
    fs = _open(repo, ws)

    def crash(*args, **kwargs):
        raise Crash()
    monkeypatch.setattr(Overlay, "clear", crash)  # the branch moved; the overlay was not cleared
    run_until_crash(_edit_and_commit, fs)
    monkeypatch.undo()
    head = repo.refs.lookup_branch("main")
    assert head != base and repo.load_commit(head).parents == (base,)
    ov = Overlay.open(ws, repo.url, "main")
    assert ov.pending == head and not ov.is_clean()  # the state a SIGKILL leaves
    ov.close()

    fs = _open(repo, ws)  # reopening settles it: the edits are in the branch, none pending
    assert fs.base == head and fs.overlay.is_clean() and fs.overlay.pending is None
    fs.overlay.close()


def test_crash_before_the_branch_moved_keeps_the_edits(repo_and_base, tmp_path, monkeypatch):
    repo, base = repo_and_base
    ws = tmp_path / "ws"
    fs = _open(repo, ws)
    real = type(repo.refs).set_branch_if_equals

    def crash(self, *args):
        raise Crash()
    monkeypatch.setattr(type(repo.refs), "set_branch_if_equals", crash)  # pending recorded, no CAS
    run_until_crash(_edit_and_commit, fs)
    monkeypatch.setattr(type(repo.refs), "set_branch_if_equals", real)
    assert repo.refs.lookup_branch("main") == base
    ov = Overlay.open(ws, repo.url, "main")
    assert ov.pending is not None and not ov.is_clean()  # the state a SIGKILL leaves
    ov.close()
    fs = _open(repo, ws)
    assert fs.base == base and fs.overlay.pending is None and not fs.overlay.is_clean()

    async def commit_again():
        async with fs.running():
            return await control.commit(fs, "again")
    outcome = trio.run(commit_again)
    assert repo.refs.lookup_branch("main") == outcome.commit_id
    names = {e.name for e in repo.load_tree(repo.load_commit(outcome.commit_id).tree).entries}
    assert {"new.txt", "made"} <= names


def test_fsync_runs_in_a_worker_thread_and_other_requests_go_on(repo_and_base, tmp_path, monkeypatch):
    """fsync of the overlay (data file, data directory, database) is blocking disk work:
    it runs in a worker thread (the loader's limiter), so a slow fsync does not stall
    the event loop, and so every other request of the mount."""
    import threading

    repo, _ = repo_and_base
    fs = _open(repo, tmp_path / "ws")
    release = threading.Event()
    threads = []
    real_sync = Overlay.sync

    def slow_sync(self, fd=None):
        threads.append(threading.current_thread() is threading.main_thread())
        assert release.wait(30), "never released"
        real_sync(self, fd)
    monkeypatch.setattr(Overlay, "sync", slow_sync)

    async def main():
        async with fs.running():
            fh, _ = await fs.create(1, b"f", 0o644, os.O_RDWR)
            await fs.write(fh, 0, b"data")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.fsync, fh, False)
                with trio.fail_after(30):
                    while not threads:  # until the fsync started (and blocks in its thread)
                        await trio.sleep(0.01)
                assert threads == [False]
                # The loop is free: reads and lookups answer while the fsync waits.
                assert await fs.read(fh, 0, 4) == b"data"
                assert (await fs.lookup(1, b"f")).size == 4
                release.set()
            await fs.release(fh)
    trio.run(main)
    assert threads == [False]


# --- found by the reference model (tests/test_workspace_model.py), kernel-free -------------
def _session(repo, ws):
    from wsharness import Session
    return Session(repo, ws)


def test_a_base_node_keeps_its_atime_when_its_mtime_moves(repo_and_base, tmp_path):
    """The mount is noatime: a new entry (a directory's mtime) or a write (a file's)
    leaves the atime alone; it used to show the mtime, so it moved with it."""
    repo, base = repo_and_base
    base_ns = repo.load_commit(base).time * 1_000_000_000

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            await k.write_file("new.txt", b"new")
            fh = await k.open("fixed/run.sh", os.O_WRONLY)
            await k.pwrite(fh, 0, b"#")
            await k.close(fh)
            for p in ("", "fixed/run.sh"):
                st = await k.lstat(p)
                assert st.st_atime_ns == base_ns, p
                assert st.st_mtime_ns > base_ns and st.st_ctime_ns > base_ns, p
    trio.run(main)


def test_open_with_o_trunc_truncates_in_any_access_mode_and_moves_ctime(repo_and_base, tmp_path):
    """open(O_TRUNC) truncates also with O_RDONLY (Linux does; FUSE passes O_TRUNC to
    OPEN: atomic_o_trunc), and moves the ctime with the mtime."""
    repo, base = repo_and_base

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            await k.write_file("f", b"some bytes")
            await k.utime("f", 1_000_000_000_000_000_000, 1_000_000_000_000_000_000)
            before = await k.lstat("f")
            fh = await k.open("f", os.O_RDONLY | os.O_TRUNC)
            await k.close(fh)
            st = await k.lstat("f")
            assert st.st_size == 0 and await k.read_file("f") == b""
            assert st.st_mtime_ns > before.st_ctime_ns and st.st_ctime_ns == st.st_mtime_ns
            fh = await k.open("fixed/big.bin", os.O_RDONLY | os.O_TRUNC)  # a base file
            await k.close(fh)
            assert (await k.lstat("fixed/big.bin")).st_size == 0
    trio.run(main)


def test_an_unlinked_open_file_keeps_its_atime_across_a_commit(repo_and_base, tmp_path):
    """A file unlinked while open keeps its times: a commit (a new base) does not move them."""
    from wsharness import commit
    repo, base = repo_and_base

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            fh = await k.open("fixed/run.sh", os.O_RDONLY)
            before = await k.fstat(fh)
            await k.unlink("fixed/run.sh")
            await trio.sleep(1.1)  # commit times are in seconds
            assert await commit(k) is not None
            st = await k.fstat(fh)
            assert st.st_nlink == 0 and st.st_atime_ns == before.st_atime_ns
            assert await k.read_all(fh) == b"#!/bin/sh\necho hi\n"
            await k.close(fh)
    trio.run(main)



def test_reset_of_an_unchanged_path_next_to_an_edit_changes_nothing(repo_and_base, tmp_path):
    """An edit in a directory gives its entries rows; resetting an unchanged sibling then
    keeps its node (same inode; a file open below it keeps its name) and the parent's
    mtime, as resetting any unchanged path does. Found by the reference model."""
    repo, base = repo_and_base
    base_ns = repo.load_commit(base).time * 1_000_000_000

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            fh = await k.open("fixed/n1/n2/n3/n4/leaf.txt")
            ino = (await k.lstat("fixed/n1")).st_ino
            await k.chown("fixed/run.sh", 1234, None)  # an edit next to fixed/n1
            await k.fs.reset(["fixed/n1"])
            assert (await k.lstat("fixed/n1")).st_ino == ino
            assert (await k.fstat(fh)).st_nlink == 1
            assert (await k.lstat("fixed")).st_mtime_ns == base_ns
            await k.close(fh)
            await k.chmod("fixed/n1/n2", 0o700)  # a change of its own: the reset replaces it
            await k.fs.reset(["fixed/n1"])
            assert stat.S_IMODE((await k.lstat("fixed/n1/n2")).st_mode) == 0o755
    trio.run(main)


@pytest.mark.parametrize("everything", [False, True])
def test_reset_discards_edits_in_place_for_an_open_file(repo_and_base, tmp_path, everything):
    """``reset PATH`` and ``reset`` of everything agree: a node the base has at its path
    (the same kind) keeps its inode and shows the base again, so an editor holding the
    file reads the base's bytes through its descriptor, and a file open below a reset
    directory keeps its name (reset PATH replaced the node: the descriptor kept the
    edited bytes, st_nlink 0, and a file below an untouched directory was unlinked)."""
    repo, _ = repo_and_base
    leaf = "fixed/n1/n2/n3/n4/leaf.txt"
    base_leaf = "feuille ✓\n".encode()

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            base_run = await k.read_file("fixed/run.sh")
            fh = await k.open("fixed/run.sh", os.O_RDWR)
            await k.pwrite(fh, 0, b"edited, and more bytes than the base has\n")
            ino = (await k.fstat(fh)).st_ino
            below = await k.open(leaf)
            await k.chmod("fixed/n1", 0o700)  # a change of its own
            await k.write_file("fixed/n1/new.txt", b"new")
            await k.fs.reset(None if everything else ["fixed/run.sh", "fixed/n1"])
            st = await k.fstat(fh)
            assert st.st_ino == ino and st.st_nlink == 1 and st.st_size == len(base_run)
            assert await k.read_all(fh) == base_run
            assert (await k.lstat("fixed/run.sh")).st_ino == ino
            assert (await k.fstat(below)).st_nlink == 1 and await k.read_all(below) == base_leaf
            assert stat.S_IMODE((await k.lstat("fixed/n1")).st_mode) == 0o755
            assert not await k.exists("fixed/n1/new.txt")
            await k.pwrite(fh, 0, b"#")  # the open file is the workspace's file again
            await k.close(fh)
            assert (await k.read_file("fixed/run.sh"))[:1] == b"#"
            await k.close(below)
            assert await k.read_file(leaf) == base_leaf
    trio.run(main)


def test_an_mtime_of_0_survives_a_remount(repo_and_base, tmp_path):
    """utimensat to the epoch is kept across a remount (a row's 0 read as "the base's
    time"), the root's too. Found by the reference model (hypothesis)."""
    repo, _ = repo_and_base

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            await k.utime("fixed/run.sh", 0, 0)
            await k.utime("fixed", None, 0)
            await k.utime("", None, 0)  # the root's row too (its 0 once meant the base's time)
        async with _session(repo, tmp_path / "ws") as k:
            assert (await k.lstat("fixed/run.sh")).st_mtime_ns == 0
            assert (await k.lstat("fixed/run.sh")).st_atime_ns == 0
            assert (await k.lstat("fixed")).st_mtime_ns == 0
            assert (await k.lstat("")).st_mtime_ns == 0
    trio.run(main)

# --- workspace logic once tested through a mount, now kernel-free (same assertions) ----------
def test_a_file_unlinked_while_open_stays_readable(repo_and_base, tmp_path):
    repo, _ = repo_and_base
    big = (tmp_path / "src" / "fixed" / "big.bin").read_bytes()

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            base_file = await k.open("fixed/big.bin")  # untouched: read from the repository
            await k.write_file("scratch", b"local bytes")
            local_file = await k.open("scratch", os.O_RDWR)  # in the overlay
            await k.unlink("fixed/big.bin")
            await k.unlink("scratch")
            assert not await k.exists("scratch")
            assert await k.read_all(base_file) == big
            assert await k.read_all(local_file) == b"local bytes"
            await k.pwrite(local_file, 11, b" and more")  # writes to the unlinked file work too
            assert await k.read_all(local_file) == b"local bytes and more"
            await k.close(base_file)
            await k.close(local_file)
            assert sorted(await k.listdir("fixed")).count("big.bin") == 0
    trio.run(main)


def test_names_over_name_max_are_enametoolong(repo_and_base, tmp_path):
    import errno

    repo, _ = repo_and_base

    async def errno_of(coro) -> int | None:
        try:
            await coro
        except OSError as exc:
            return exc.errno
        return None

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            long = "n" * 256
            assert await errno_of(k.write_file(long, b"x")) == errno.ENAMETOOLONG
            assert await errno_of(k.mkdir(long)) == errno.ENAMETOOLONG
            assert await errno_of(k.symlink("t", long)) == errno.ENAMETOOLONG
            await k.write_file("short", b"x")
            assert await errno_of(k.rename("short", long)) == errno.ENAMETOOLONG
            await k.write_file("m" * 255, b"ok")  # NAME_MAX itself is fine
            assert await k.read_file("m" * 255) == b"ok"
    trio.run(main)


def test_an_older_overlay_gains_the_links_table_and_a_newer_one_is_refused(repo_and_base, tmp_path):
    """Overlay format versions (vfs/overlay.py): a version-1 overlay (no links, no
    owners, no copy-on-write) opens with its edits and can take a hard link; an overlay
    of a version this commitfs does not know is a one-line error, nothing changed."""
    import sqlite3

    from commitfs.vfs.overlay import PLACEHOLDER, SCHEMA_VERSION, WorkspaceMismatchError

    repo, base = repo_and_base
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "2").write_bytes(b"version one")
    tree = repo.load_commit(base).tree
    db = sqlite3.connect(str(ws / "overlay.db"))
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE nodes (id INTEGER PRIMARY KEY, parent INTEGER, name TEXT NOT NULL, kind TEXT NOT NULL,
            okind BLOB, osize INTEGER, oid BLOB, otarget BLOB, materialized INTEGER NOT NULL DEFAULT 0,
            upper TEXT, mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, target BLOB);
        CREATE UNIQUE INDEX nodes_by_name ON nodes(parent, name);
    """)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("version", "1"), ("repo", repo.url), ("branch", "main"),
                                                      ("base", base.hex())])
    # The root, materialized, holding only one new file (every base entry deleted).
    db.execute("INSERT INTO nodes VALUES (1, NULL, '', 'dir', ?, 0, ?, NULL, 1, NULL, 493, 0, NULL)",
               (b"d", tree))
    db.execute("INSERT INTO nodes VALUES (2, 1, 'old.txt', 'file', NULL, NULL, NULL, NULL, 0, '2', 420, 1, NULL)")
    db.commit()
    db.close()

    async def link_it(fs: WorkspaceFS) -> None:
        async with fs.running():
            a = await fs.lookup(1, b"old.txt")
            await fs.link(a.ino, 1, b"again.txt")

    fs = _open(repo, ws)
    assert fs.overlay.get_meta("version") == SCHEMA_VERSION
    # Moved to version 4's layout: the database renamed, a placeholder in its place.
    assert (ws / "overlay.sqlite").exists() and (ws / "overlay.db").read_bytes() == PLACEHOLDER
    trio.run(link_it, fs)
    fs = _open(repo, ws)
    names = {name: n for name, n in fs.root.children.items()}
    assert sorted(names) == ["again.txt", "old.txt"] and names["again.txt"] is names["old.txt"]
    assert fs.attr(names["old.txt"]).nlink == 2
    fs.overlay.close()

    db = sqlite3.connect(str(ws / "overlay.sqlite"))
    db.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    db.commit()
    db.close()
    before = (ws / "overlay.sqlite").read_bytes()
    with pytest.raises(WorkspaceMismatchError, match=r"overlay format '99'.*newer commitfs") as info:
        _open(repo, ws)
    assert "\n" not in str(info.value)
    assert (ws / "overlay.sqlite").read_bytes() == before


def test_crash_after_the_branch_moved_with_hard_links(repo_and_base, tmp_path, monkeypatch):
    """A commit of hard-linked files killed after the branch moved: reopening clears
    the links with the other edits; the commit holds both names with one content id."""
    from commitfs.ops.browse import lookup_path

    repo, base = repo_and_base
    ws = tmp_path / "ws"
    fs = _open(repo, ws)

    async def link_and_commit(fs: WorkspaceFS) -> None:
        async with fs.running():
            fh, a = await fs.create(1, b"one.bin", 0o644, os.O_WRONLY)
            await fs.write(fh, 0, b"linked bytes")
            await fs.release(fh)
            d = await fs.mkdir(1, b"sub", 0o755)
            await fs.link(a.ino, d.ino, b"two.bin")
            await control.commit(fs, "links")

    def crash(*args, **kwargs):
        raise Crash()
    monkeypatch.setattr(Overlay, "clear", crash)
    run_until_crash(link_and_commit, fs)
    monkeypatch.undo()
    ov = Overlay.open(ws, repo.url, "main")
    assert ov.links() and ov.pending is not None  # what a SIGKILL leaves
    ov.close()
    fs = _open(repo, ws)
    head = repo.refs.lookup_branch("main")
    assert fs.base == head and fs.overlay.is_clean() and fs.overlay.links() == []
    e1, e2 = lookup_path(repo, head, "one.bin"), lookup_path(repo, head, "sub/two.bin")
    assert e1.id == e2.id and e1.size == len(b"linked bytes")
    fs.overlay.close()


def test_a_rebase_resolves_split_directories_before_it_clears(tmp_path, cache_home, monkeypatch):
    """A reset (or a commit's settle) re-bases every node the kernel knows onto the new
    tree: a split directory's lookups (model/splittree.py: a leaf load each) run in a worker
    thread before the overlay is cleared, so a storage error there leaves the edits and
    the nodes as they were (it came after the clear, on the event loop: nodes
    half-rebased onto a cleared overlay)."""
    import threading

    from commitfs.errors import StorageError
    from commitfs.model import splittree
    from wsharness import Session

    for name, value in (("SPLIT_ENTRIES", 32), ("LEAF_MIN", 4), ("LEAF_BITS", 2), ("LEAF_MAX", 16),
                        ("INDEX_MIN", 2), ("INDEX_BITS", 1), ("INDEX_MAX", 6)):
        monkeypatch.setattr(splittree, name, value)
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(200):
        (src / "big" / f"f{i:03}.txt").write_bytes(b"base %d\n" % i)
    repo = Repository.init(str(tmp_path / "repo"))
    commit_directory(repo, src, message="base")
    assert isinstance(repo.load_tree(repo.load_tree(repo.load_commit(repo.refs.lookup_branch("main")).tree)
                                     .get("big").id), splittree.SplitTree)
    calls: list[bool] = []
    real_get = splittree.SplitTree.get

    def failing_get(self, name):
        calls.append(threading.current_thread() is threading.main_thread())
        raise StorageError("a leaf of the split directory cannot be read")

    async def main():
        async with Session(repo, tmp_path / "ws") as k:
            await k.write_file("big/f007.txt", b"edited\n")
            fh = await k.open("big/f150.txt")  # a lazy node below the split directory
            ino = (await k.lstat("big/f007.txt")).st_ino
            monkeypatch.setattr(splittree.SplitTree, "get", failing_get)
            with pytest.raises(StorageError):
                await k.fs.reset(None)
            assert calls and not any(calls), "a split directory's get ran on the event loop"
            monkeypatch.setattr(splittree.SplitTree, "get", real_get)
            assert not k.fs.overlay.is_clean()
            assert (await k.lstat("big/f007.txt")).st_ino == ino
            assert await k.read_file("big/f007.txt") == b"edited\n"
            assert await k.read_all(fh) == b"base 150\n"
            await k.fs.reset(None)  # the storage is back: the reset goes through
            assert k.fs.overlay.is_clean() and await k.read_file("big/f007.txt") == b"base 7\n"
            assert (await k.lstat("big/f007.txt")).st_ino == ino
            await k.close(fh)
    trio.run(main)
    repo.close()


def test_a_flush_writes_only_the_ranges_that_changed_in_a_worker_thread(repo_and_base, tmp_path):
    """Copy-on-write ranges (vfs/wscow.py) are stored incrementally: after a file with
    many written ranges was flushed, one more small write costs a flush of one row,
    not of every range; and the rows are written in a worker thread (the loader's
    limiter and I/O timeout), never on the event loop.  It used to delete and insert
    all of a file's ranges on the event loop at every flush."""
    import threading

    repo, _ = repo_and_base
    statements: list[tuple[str, bool]] = []

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            conn = k.fs.overlay._conn
            fh = await k.open("fixed/big.bin", os.O_RDWR)
            for i in range(200):  # 200 ranges apart from each other
                await k.pwrite(fh, i * 400, b"w")
            await k.fsync(fh)
            assert len(k.fs.overlay.load_ranges()[k.fs._node(k.handles[fh]).oid]) == 200
            conn.set_trace_callback(lambda sql: statements.append(
                (sql, threading.current_thread() is threading.main_thread())))
            await k.pwrite(fh, 50, b"x")  # a new range
            await k.pwrite(fh, 400, b"yy")  # one that grows
            await k.fsync(fh)
            conn.set_trace_callback(None)
            await k.close(fh)
            assert await k.read_file("fixed/big.bin") == expected
    base = bytearray((tmp_path / "src" / "fixed" / "big.bin").read_bytes())
    for i in range(200):
        base[i * 400] = ord("w")
    base[50:51], base[400:402] = b"x", b"yy"
    expected = bytes(base)
    trio.run(main)
    ranges = [(sql, main) for sql, main in statements if "ranges" in sql]
    assert 1 <= len(ranges) <= 4, ranges
    assert not any(main for _, main in ranges), ranges


def test_a_version_3_overlay_moves_in_place_and_older_commitfs_refuse_it(repo_and_base, tmp_path):
    """Version 4's layout (vfs/overlay.py, docs/FORMAT.md): a version-3 overlay (its
    database overlay.db, a sparse copy-on-write data file) opens with every edit and
    range, its database moved to overlay.sqlite; overlay.db is then a placeholder no
    older commitfs can open as a database (they all start with its journal mode), so
    they refuse the workspace instead of reading the sparse data file as the file."""
    import sqlite3

    from commitfs.vfs.overlay import PLACEHOLDER

    repo, _ = repo_and_base
    ws = tmp_path / "ws"
    big = (tmp_path / "src" / "fixed" / "big.bin").read_bytes()
    want = b"EDIT" + big[4:50_000] + b"more" + big[50_004:]

    async def edit():
        async with _session(repo, ws) as k:
            fh = await k.open("fixed/big.bin", os.O_RDWR)
            await k.pwrite(fh, 0, b"EDIT")
            await k.pwrite(fh, 50_000, b"more")
            await k.close(fh)
            await k.write_file("new.txt", b"new")
    trio.run(edit)
    # Back to version 3's layout, as the commitfs before this one left it.
    (ws / "overlay.db").unlink()
    (ws / "overlay.sqlite").rename(ws / "overlay.db")
    db = sqlite3.connect(str(ws / "overlay.db"))
    db.execute("UPDATE meta SET value = '3' WHERE key = 'version'")
    db.commit()
    db.close()

    async def check():
        async with _session(repo, ws) as k:
            assert await k.read_file("fixed/big.bin") == want
            assert await k.read_file("new.txt") == b"new"
            assert k.fs.overlay.get_meta("version") == "4"
    trio.run(check)
    assert (ws / "overlay.db").read_bytes() == PLACEHOLDER
    assert not (ws / "overlay.db-wal").exists()
    old = sqlite3.connect(str(ws / "overlay.db"))  # what every older commitfs does first
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        old.execute("PRAGMA journal_mode=WAL")
    old.close()
    trio.run(check)  # and opened again, as it is


def test_an_open_overlay_is_locked_against_a_second_opener(repo_and_base, tmp_path):
    """One process at a time has an overlay open (vfs/overlay.py): a second opener (a
    second mount of the workspace, or a second upgrade of a version 1-3 overlay racing
    the first) gets a one-line error and changes nothing; after close it opens."""
    from commitfs.vfs.overlay import WorkspaceBusyError

    repo, _ = repo_and_base
    ws = tmp_path / "ws"
    fs = _open(repo, ws)
    before = sorted(os.listdir(ws))
    with pytest.raises(WorkspaceBusyError, match=r"in use by another commitfs \(process \d+\)") as info:
        Overlay.open(ws, repo.url, "main")
    assert "\n" not in str(info.value) and str(ws) in str(info.value)
    with pytest.raises(WorkspaceBusyError):
        _open(repo, ws)
    assert sorted(os.listdir(ws)) == before
    fs.overlay.close()
    ov = Overlay.open(ws, repo.url, "main")
    ov.close()


def _version_3_layout(repo, ws) -> None:
    """A workspace as a version-3 commitfs leaves it: the database overlay.db, no placeholder."""
    import sqlite3

    Overlay.open(ws, repo.url, "main").close()
    (ws / "overlay.db").unlink()
    (ws / "overlay.sqlite").rename(ws / "overlay.db")
    db = sqlite3.connect(str(ws / "overlay.db"))
    db.execute("UPDATE meta SET value = '3' WHERE key = 'version'")
    db.execute("INSERT INTO meta VALUES ('marker', 'edits of version 3')")
    db.commit()
    db.close()


def test_the_upgrade_always_leaves_an_overlay_db_and_never_overwrites_a_database(repo_and_base, tmp_path,
                                                                                 monkeypatch):
    """Moving a version-3 overlay (vfs/overlay.py, docs/FORMAT.md): killed after the
    database got its new name, overlay.db is still that same database (so an older
    commitfs does not start an empty one), and what an older commitfs wrote through
    it then is kept by the next open; a database overlay.db beside a different
    overlay.sqlite is a one-line error, both left as they are."""
    import sqlite3

    import commitfs.vfs.overlay as overlay_mod
    from commitfs.errors import CommitfsError
    from commitfs.vfs.overlay import PLACEHOLDER

    repo, _ = repo_and_base
    ws = tmp_path / "ws"
    _version_3_layout(repo, ws)

    def crash(path):
        raise Crash()
    monkeypatch.setattr(overlay_mod, "_fsync_dir", crash)  # killed right after the database's new name
    with pytest.raises(Crash):
        Overlay.open(ws, repo.url, "main")
    monkeypatch.undo()
    assert os.path.samefile(ws / "overlay.db", ws / "overlay.sqlite")
    old = sqlite3.connect(str(ws / "overlay.db"))  # an older commitfs, in the window
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("INSERT INTO meta VALUES ('older', 'written through overlay.db')")
    old.commit()
    old.close()
    ov = Overlay.open(ws, repo.url, "main")
    assert ov.get_meta("marker") == "edits of version 3" and ov.get_meta("older") == "written through overlay.db"
    assert ov.get_meta("version") == "4"
    ov.close()
    assert (ws / "overlay.db").read_bytes() == PLACEHOLDER

    # An older commitfs made a fresh overlay.db beside the moved database: an error, nothing overwritten.
    (ws / "overlay.db").unlink()
    other = sqlite3.connect(str(ws / "overlay.db"))
    other.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    other.commit()
    other.close()
    before = {name: (ws / name).read_bytes() for name in ("overlay.db", "overlay.sqlite")}
    with pytest.raises(CommitfsError, match="two different overlay databases") as info:
        Overlay.open(ws, repo.url, "main")
    assert "\n" not in str(info.value)
    assert {name: (ws / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("placeholder", [True, False])
def test_a_newer_overlay_is_refused_with_nothing_changed(repo_and_base, tmp_path, placeholder):
    """An overlay of a format this commitfs does not know (a made-up format 5: its own
    placeholder, a table this one would ALTER) is refused with the version message
    before anything is written: no journal mode, schema, columns, data/, reserve or
    placeholder of this commitfs (docs/FORMAT.md)."""
    import sqlite3

    from commitfs.vfs.overlay import WorkspaceMismatchError

    repo, _ = repo_and_base
    ws = tmp_path / "ws"
    ws.mkdir()
    if placeholder:
        (ws / "overlay.db").write_bytes(b"commitfs workspace overlay, format 5: see overlay.sqlite\n")
    db = sqlite3.connect(str(ws / "overlay.sqlite"))
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); "
                     "CREATE TABLE nodes (id INTEGER PRIMARY KEY, v5col TEXT);")
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("version", "5"), ("repo", repo.url), ("branch", "main")])
    db.commit()
    db.close()
    before = {p.name: p.read_bytes() for p in ws.iterdir()}
    with pytest.raises(WorkspaceMismatchError, match=r"overlay format '5'.*newer commitfs") as info:
        Overlay.open(ws, repo.url, "main")
    assert "\n" not in str(info.value)
    after = {p.name: p.read_bytes() for p in ws.iterdir() if p.name != "lock"}
    assert after == before


def test_range_rows_are_written_only_after_their_bytes_are_durable(repo_and_base, tmp_path, monkeypatch):
    """A copy-on-write file's range rows (vfs/wscow.py) name bytes of its data file: the
    data file is fdatasync'd before any transaction writing such rows commits (at
    flush, close, truncation, fsyncdir), in the worker thread for a file's flush, so
    a later WAL fsync (another file's fsync, a checkpoint) never makes a row durable
    before its bytes (after a power loss the range read as zeros)."""
    import threading

    repo, _ = repo_and_base
    events: list[tuple[str, object, bool]] = []
    real_datasync, real_update = os.fdatasync, Overlay.update_ranges

    def datasync(fd):
        events.append(("datasync", os.readlink(f"/proc/self/fd/{fd}"), threading.current_thread()
                       is threading.main_thread()))
        return real_datasync(fd)

    def update_ranges(self, node_id, put, gone):
        events.append(("rows", list(put), threading.current_thread() is threading.main_thread()))
        return real_update(self, node_id, put, gone)
    monkeypatch.setattr(os, "fdatasync", datasync)
    monkeypatch.setattr(Overlay, "update_ranges", update_ranges)
    big = (tmp_path / "src" / "fixed" / "big.bin").read_bytes()

    async def main():
        async with _session(repo, tmp_path / "ws") as k:
            fh = await k.open("fixed/big.bin", os.O_RDWR)
            await k.pwrite(fh, 10, b"one")
            await k.close(fh)  # the flush of a closing file
            fh = await k.open("fixed/big.bin", os.O_RDWR)
            await k.pwrite(fh, 60_000, b"two")
            await k.ftruncate(fh, 60_001)  # clips the range written, not yet stored
            await k.pwrite(fh, 1000, b"three")
            await k.fsync(fh)
            await k.close(fh)
            assert await k.read_file("fixed/big.bin") == \
                big[:10] + b"one" + big[13:1000] + b"three" + big[1005:60_000] + b"t"
    trio.run(main)
    puts = [i for i, e in enumerate(events) if e[0] == "rows" and e[1]]
    assert puts, events
    for i in puts:
        before = events[:i]
        last_rows = max([j for j, e in enumerate(before) if e[0] == "rows" and e[1]], default=-1)
        synced = [e for e in before[last_rows + 1:] if e[0] == "datasync" and "/data/" in e[1]]
        assert synced, (i, events)
        assert not events[i][2] and not synced[-1][2], events  # both in a worker thread


# --- blocking work off the event loop (review findings) -----------------------------------
async def _open_big(fs: WorkspaceFS) -> int:
    d = await fs.lookup(1, b"fixed")
    f = await fs.lookup(d.ino, b"big.bin")
    return await fs.open(f.ino, os.O_RDWR)


async def _max_gap_while(fn, *args) -> tuple[float, object]:
    """Run ``fn(*args)`` beside a task ticking every 10 ms: (the longest the event loop
    went without a tick, what ``fn`` returned or raised)."""
    import time
    gaps = [0.0]
    done = trio.Event()

    async def tick():
        last = time.monotonic()
        while not done.is_set():
            await trio.sleep(0.01)
            now = time.monotonic()
            gaps[0] = max(gaps[0], now - last)
            last = now
    outcome = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await trio.sleep(0.05)
        try:
            outcome = await fn(*args)
        except Exception as exc:
            outcome = exc
        done.set()
    return gaps[0], outcome


def test_a_status_syncs_a_writers_ranges_in_a_worker_thread_and_answers_a_disk_error(repo_and_base, tmp_path,
                                                                                      monkeypatch):
    """A writer holds a copy-on-write file with ranges not yet recorded: a status (and
    a commit: both flush under ``paused``) fdatasyncs its data file in a worker thread,
    so a slow disk does not stall the mount, and an I/O error there is a one-line
    error answer, the edits kept (docs/SEMANTICS.md)."""
    import threading

    repo, _ = repo_and_base
    fs = _open(repo, tmp_path / "ws")
    calls: list[bool] = []
    fail = []
    real = os.fdatasync

    def slow_datasync(fd):
        calls.append(threading.current_thread() is threading.main_thread())
        threading.Event().wait(1.0)  # a slow disk
        if fail:
            raise OSError(5, "Input/output error")
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", slow_datasync)

    async def main():
        async with fs.running():
            fh = await _open_big(fs)
            await fs.write(fh, 10, b"edit")  # ranges in memory only: the writer keeps it open
            gap, answer = await _max_gap_while(control.handle, fs, {"op": "status"})
            assert answer["ok"], answer
            assert [c["path"] for c in answer["changes"]] == ["fixed/big.bin"]
            assert calls and not any(calls), calls  # in a worker thread
            assert gap < 0.5, gap  # the loop went on meanwhile
            await fs.write(fh, 20_000, b"more")
            fail.append(True)
            answer = await control.handle(fs, {"op": "status"})
            assert answer["ok"] is False and answer["kind"] == "error", answer
            assert "Input/output error" in answer["error"] and "\n" not in answer["error"], answer
            assert "daemon failed" not in answer["error"], answer  # an expected fault, not a crash
            assert fs._handle(fh).node.cow.dirty  # not recorded: tried again at the next flush
            fail.clear()
            answer = await control.handle(fs, {"op": "status"})
            assert answer["ok"], answer
            assert not fs._handle(fh).node.cow.dirty
            assert await fs.read(fh, 0, 30_000) == big[:10] + b"edit" + big[14:20_000] + b"more" + big[20_004:30_000]
            await fs.release(fh)
    big = (tmp_path / "src" / "fixed" / "big.bin").read_bytes()
    trio.run(main)


def test_a_commit_or_reset_syncs_the_cleared_overlay_in_a_worker_thread(repo_and_base, tmp_path, monkeypatch,
                                                                         caplog):
    """A commit's and a reset's clearing of the overlay fsyncs the WAL and removes the
    data files in a worker thread under the loader's limiter and I/O timeout: a slow
    disk there does not stall the mount, and a disk error there is logged, the commit
    made and the edits gone as it says (docs/SEMANTICS.md)."""
    import logging
    import threading

    repo, _ = repo_and_base
    ws = tmp_path / "ws"
    fs = _open(repo, ws)
    syncs: list[bool] = []  # on the loop's thread?
    unlinks: list[bool] = []
    fail = []
    real_fsync, real_unlink = os.fsync, os.unlink

    def slow_fsync(fd):
        syncs.append(threading.current_thread() is threading.main_thread())
        threading.Event().wait(0.8)  # a slow disk
        if fail:
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    def unlink(path, *args, **kwargs):
        if str(ws / "data") in str(path):
            unlinks.append(threading.current_thread() is threading.main_thread())
        return real_unlink(path, *args, **kwargs)

    async def edit(name: bytes) -> None:
        fh, _ = await fs.create(1, name, 0o644, os.O_WRONLY)
        await fs.write(fh, 0, b"bytes of " + name)
        await fs.release(fh)

    async def main():
        async with fs.running():
            await edit(b"one.txt")
            monkeypatch.setattr(os, "fsync", slow_fsync)
            monkeypatch.setattr(os, "unlink", unlink)
            gap, outcome = await _max_gap_while(control.commit, fs, "one")
            assert not isinstance(outcome, Exception), outcome
            assert syncs and not any(syncs), syncs  # the WAL's fsync: in a worker thread
            assert unlinks and not any(unlinks), unlinks  # and the data file's removal
            assert gap < 0.5, gap  # the loop went on meanwhile
            assert os.listdir(ws / "data") == []
            committed = outcome.commit_id

            monkeypatch.undo()
            await edit(b"two.txt")
            syncs.clear(), unlinks.clear()
            monkeypatch.setattr(os, "fsync", slow_fsync)
            monkeypatch.setattr(os, "unlink", unlink)
            gap, outcome = await _max_gap_while(fs.reset)
            assert not isinstance(outcome, Exception), outcome
            assert syncs and not any(syncs), syncs
            assert unlinks and not any(unlinks), unlinks
            assert gap < 0.5, gap
            assert await fs.lookup(1, b"one.txt") and fs.overlay.is_clean()

            monkeypatch.undo()
            await edit(b"three.txt")
            monkeypatch.setattr(os, "fsync", slow_fsync)
            real_finish = Overlay.finish_clear

            def failing_finish(self, below):
                fail.append(True)  # only the clear's fsync fails (not the pending id's)
                return real_finish(self, below)
            monkeypatch.setattr(Overlay, "finish_clear", failing_finish)
            with caplog.at_level(logging.WARNING):
                outcome = await control.commit(fs, "three")  # the branch moved: no error
            monkeypatch.undo()
            assert "not yet synced" in caplog.text and "Input/output error" in caplog.text
            assert repo.refs.lookup_branch("main") == outcome.commit_id != committed
            assert fs.base == outcome.commit_id and fs.overlay.is_clean()
    trio.run(main)
    fs = _open(repo, ws)  # what was committed is the base, the data directory empty
    try:
        assert fs.overlay.is_clean() and os.listdir(ws / "data") == []
    finally:
        fs.shutdown()


def test_only_a_write_only_open_of_a_file_without_set_id_bits_writes_direct(repo_and_base, tmp_path):
    """WorkspaceFS.writes_direct (FOPEN_DIRECT_IO, fuse/adapter.py): a write-only open,
    never one that reads (it could map the file), nor one of a set-id file (a direct
    write leaves clearing the set-id bits to the server, which pyfuse3 cannot see)."""
    repo, _ = repo_and_base
    fs = _open(repo, tmp_path / "ws")

    async def main():
        async with fs.running():
            fh, attr = await fs.create(1, b"new.txt", 0o644, os.O_WRONLY | os.O_CREAT)
            assert fs.writes_direct(fh, os.O_WRONLY | os.O_CREAT)
            await fs.release(fh)
            out = []
            for flags in (os.O_WRONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_RDONLY):
                fh = await fs.open(attr.ino, flags)
                out.append(fs.writes_direct(fh, flags))
                await fs.release(fh)
            for mode in (0o4755, 0o2755):
                await fs.setattr(attr.ino, mode=stat.S_IFREG | mode)
                fh = await fs.open(attr.ino, os.O_WRONLY)
                out.append(fs.writes_direct(fh, os.O_WRONLY))
                await fs.release(fh)
            return out
    assert trio.run(main) == [True, True, False, False, False, False]


def test_the_c_write_path_gets_a_descriptor_only_when_write_would_not_wait(repo_and_base, tmp_path):
    """WorkspaceFS.write_fd (the C module's WRITE fast path, fuse/fastpath.py): the data
    file's descriptor only while ``write`` would run through without an await (the lock
    free, the data file open), else -1 (the WRITE goes to ``write``); ``wrote`` then keeps
    the size, times and dirty marks as ``write`` does, and a commit has the bytes."""
    repo, _ = repo_and_base
    fs = _open(repo, tmp_path / "ws")

    async def main():
        async with fs.running():
            assert fs.write_fd(12345) == -1  # no such handle
            fh, attr = await fs.create(1, b"new.txt", 0o644, os.O_WRONLY | os.O_CREAT)
            fd = fs.write_fd(fh)
            assert fd >= 0
            async with fs._lock:  # a commit, flush or fsync holds it: the write waits
                assert fs.write_fd(fh) == -1
            before = (await fs.getattr(attr.ino)).mtime_ns
            await trio.sleep(0.002)
            assert os.pwrite(fd, b"bytes written in C", 7) == 18
            fs.wrote(fh, 7, 18)
            a = await fs.getattr(attr.ino)
            assert a.size == 25 and a.mtime_ns > before and a.ctime_ns == a.mtime_ns
            assert await fs.read(fh, 0, 100) == bytes(7) + b"bytes written in C"
            await fs.release(fh)
            # A committed file not yet written: its data file is made by ``write`` (an await).
            name = next(n for n in sorted(os.listdir(tmp_path / "src")) if os.path.isfile(tmp_path / "src" / n))
            ino = (await fs.lookup(1, name.encode())).ino
            fh = await fs.open(ino, os.O_RDWR)
            assert fs.write_fd(fh) == -1
            await fs.write(fh, 0, b"X")
            assert fs.write_fd(fh) >= 0
            await fs.release(fh)
            await control.commit(fs, "c write")
    trio.run(main)
    fs2 = _open(repo, tmp_path / "ws")

    async def reread():
        async with fs2.running():
            ino = (await fs2.lookup(1, b"new.txt")).ino
            fh = await fs2.open(ino, os.O_RDONLY)
            got = await fs2.read(fh, 0, 100)
            await fs2.release(fh)
            return got
    assert trio.run(reread) == bytes(7) + b"bytes written in C"


def test_closing_a_new_file_records_its_row_in_a_worker_thread(repo_and_base, tmp_path, monkeypatch):
    """The close of a new file (no copy-on-write) writes its times' row in a worker
    thread, not on the event loop."""
    import threading

    repo, _ = repo_and_base
    fs = _open(repo, tmp_path / "ws")
    updates: list[tuple[dict, bool]] = []
    real = Overlay.update

    def update(self, node_id, **fields):
        updates.append((fields, threading.current_thread() is threading.main_thread()))
        return real(self, node_id, **fields)
    monkeypatch.setattr(Overlay, "update", update)

    async def main():
        async with fs.running():
            fh, _ = await fs.create(1, b"new.txt", 0o644, os.O_WRONLY)
            await fs.write(fh, 0, b"new bytes")
            updates.clear()
            await fs.release(fh)
            closing = list(updates)
            return closing, (await fs.lookup(1, b"new.txt")).mtime_ns
    closing, mtime = trio.run(main)
    assert [u for u in closing if u[0].get("mtime_ns") == mtime], closing
    assert all(not on_loop for _, on_loop in closing), closing
    fs = _open(repo, tmp_path / "ws")
    try:
        assert fs.root.children["new.txt"].mtime_ns == mtime  # the row was written
    finally:
        fs.shutdown()


def test_a_slow_overlay_write_past_the_timeout_never_blocks_the_loop(repo_and_base, tmp_path, monkeypatch):
    """A flush's overlay write in a worker thread that outlives the I/O timeout is
    abandoned while it holds the overlay's database: the next change on the event
    loop is EIO at once (OverlayBusyError) instead of waiting for the thread with
    the whole mount stalled; once the thread finishes, changes work again."""
    import threading

    from commitfs.vfs.errors import OverlayBusyError
    from commitfs.vfs.workspace import WorkspaceOptions

    repo, _ = repo_and_base
    fs = WorkspaceFS.open_workspace(repo, str(tmp_path / "ws"), "main", WorkspaceOptions(io_timeout_s=0.3))
    release = threading.Event()
    real = Overlay.update_ranges

    def slow_update_ranges(self, node_id, put, gone):
        if threading.current_thread() is not threading.main_thread():
            release.wait(3.0)  # a stalled disk, inside the transaction (the mutex held)
        return real(self, node_id, put, gone)
    monkeypatch.setattr(Overlay, "update_ranges", slow_update_ranges)

    async def main():
        async with fs.running():
            fh = await _open_big(fs)
            await fs.write(fh, 10, b"edit")
            with pytest.raises(Exception) as info:
                await fs.flush(fh)
            assert "no answer within" in str(info.value)  # the I/O timeout: EIO
            gap, outcome = await _max_gap_while(fs.mkdir, 1, b"made", 0o755)
            assert gap < 1.0, gap  # never waited on the abandoned thread's mutex
            assert isinstance(outcome, OverlayBusyError), outcome
            release.set()
            with trio.fail_after(10):
                while True:  # until the abandoned thread let go
                    try:
                        await fs.mkdir(1, b"made", 0o755)
                        break
                    except OverlayBusyError:
                        await trio.sleep(0.05)
            await fs.flush(fh)
            await fs.release(fh)
    trio.run(main)


def test_the_roots_mode_after_a_commit_or_reset_is_the_stored_one(repo_and_base, tmp_path):
    """chmod of the root, then a commit (or a reset): the root shows a directory's
    mode as the commit gives it (0755, a commit records no directory modes), in
    memory and in its stored row, so a remount shows the same."""
    repo, _ = repo_and_base

    async def chmod_then(what: str) -> tuple[int, int]:
        fs = _open(repo, tmp_path / "ws")
        async with fs.running():
            await fs.setattr(1, mode=0o700)
            before = (await fs.getattr(1)).mode
            if what == "commit":
                fh, _ = await fs.create(1, f"{what}.txt".encode(), 0o644, os.O_WRONLY)
                await fs.release(fh)
                await control.commit(fs, "with a chmod of the root")
            else:
                await fs.reset()
            return before, (await fs.getattr(1)).mode

    for what in ("commit", "reset"):
        before, after = trio.run(chmod_then, what)
        assert stat.S_IMODE(before) == 0o700
        fs = _open(repo, tmp_path / "ws")
        try:
            remounted = fs.attr(fs.root).mode
        finally:
            fs.shutdown()
        assert stat.S_IMODE(after) == stat.S_IMODE(remounted) == 0o755, (what, oct(after), oct(remounted))


class _CountingDict(dict):
    """A materialized directory's listing that counts the entries anything walks over."""
    walked = 0

    def _count(self, n: int) -> None:
        _CountingDict.walked += n

    def __iter__(self):
        self._count(len(self))
        return super().__iter__()

    def keys(self):
        self._count(len(self))
        return super().keys()

    def values(self):
        self._count(len(self))
        return super().values()

    def items(self):
        self._count(len(self))
        return super().items()


def test_a_commit_after_a_few_edits_visits_the_edits_not_the_materialized_tree(tmp_path, cache_home,
                                                                                monkeypatch):
    """Cost follows the change (issue 18): three files written in three directories of
    2,000 each materialize 6,000 nodes, and the commit (draft, flush, the survey and
    rebase of settle) walks none of their listings; only the trees on the changed
    paths are encoded (the untouched directory keeps its id); its tree is the edits'."""
    from commitfs.repo.repository import BlobWriter
    encoded: list[int] = []
    add_tree = BlobWriter.add_tree

    def counting_add_tree(self, tree, base=None):
        encoded.append(len(tree.entries))
        return add_tree(self, tree, base)
    src = tmp_path / "src"
    ndirs, per_dir = 4, 2000
    for d in range(ndirs):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(per_dir):
            (src / f"d{d}" / f"f{i:04d}").write_bytes(b"%d/%d\n" % (d, i))
    repo = Repository.init(str(tmp_path / "repo"))
    try:
        commit_directory(repo, src, message="base")
        fs = _open(repo, tmp_path / "ws")
        edits = {f"d{d}/f{d * 7:04d}": b"changed %d\n" % d for d in range(3)}

        async def main():
            async with fs.running():
                for path, data in edits.items():
                    dname, fname = path.split("/")
                    d = await fs.lookup(1, dname.encode())
                    f = await fs.lookup(d.ino, fname.encode())
                    fh = await fs.open(f.ino, os.O_WRONLY)
                    await fs.write(fh, 0, data)
                    await fs.release(fh)
                materialized = [c for c in fs.root.children.values() if c.children is not None]
                assert sum(len(c.children) for c in materialized) == 3 * per_dir
                for c in materialized + [fs.root]:
                    c.children = _CountingDict(c.children)
                _CountingDict.walked = 0
                monkeypatch.setattr(BlobWriter, "add_tree", counting_add_tree)
                outcome = await control.commit(fs, "three files")
                walked = _CountingDict.walked
                return outcome, walked
        outcome, walked = trio.run(main)
        assert outcome.changes == 3
        # The root's listing (4 entries) at most, never a materialized directory's 2,000.
        assert walked <= 2 * ndirs, walked
        assert sorted(encoded) == [ndirs, per_dir, per_dir, per_dir], encoded  # the root, the three edited
        tree = repo.load_commit(outcome.commit_id).tree
        for d in range(ndirs):
            sub = repo.load_tree(repo.load_tree(tree).get(f"d{d}").id)
            assert sub.count == per_dir
            for i in (0, d * 7, per_dir - 1):
                want = edits.get(f"d{d}/f{i:04d}", b"%d/%d\n" % (d, i))
                assert bytes(repo.load_file(sub.get(f"f{i:04d}").id)) == want
    finally:
        repo.close()


def test_reset_of_a_path_in_a_merge_in_progress_is_committed(tmp_path, cache_home):
    """``reset PATH`` during a merge shows the base's entry where the merged tree has
    another: the commit records the base's (the reset's change is marked, though no
    edit touched the name: the commit looks only at marked names, vfs/wstree.py)."""
    from commitfs.ops.merge import MergeOptions
    repo = Repository.init(str(tmp_path / "repo"))
    try:
        def tree(path, files):
            for name, data in files.items():
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).write_bytes(data)
            return path
        c0 = commit_directory(repo, tree(tmp_path / "s0", {"sub/a": b"base\n", "sub/b": b"b\n", "top": b"0\n"}),
                              message="base").commit_id
        repo.refs.set_branch_if_equals("dev", c0, None)
        commit_directory(repo, tree(tmp_path / "s1", {"sub/a": b"theirs\n", "sub/b": b"b\n", "top": b"0\n"}),
                         branch="dev", message="theirs")
        commit_directory(repo, tree(tmp_path / "s2", {"sub/a": b"base\n", "sub/b": b"b\n", "top": b"ours\n"}),
                         message="ours")
        fs = _open(repo, tmp_path / "ws")

        async def main():
            async with fs.running():
                await control.merge(fs, "dev", MergeOptions())
                await fs.reset(["sub/a"])
                return await control.commit(fs, "merged, sub/a kept")
        outcome = trio.run(main)
        t = repo.load_tree(repo.load_commit(outcome.commit_id).tree)
        sub = repo.load_tree(t.get("sub").id)
        assert bytes(repo.load_file(sub.get("a").id)) == b"base\n"
        assert bytes(repo.load_file(t.get("top").id)) == b"ours\n"
        assert len(repo.load_commit(outcome.commit_id).parents) == 2
    finally:
        repo.close()


def test_a_directory_link_count_is_two_and_its_subdirectories_lazy_or_edited(tmp_path, cache_home, monkeypatch):
    """st_nlink of a directory is 2 + its subdirectories, as on ext4: for an untouched
    directory counted from its tree (once per tree), for an edited one kept as names come
    and go, after a commit and a remount too; a split directory (its chunks not read for a
    stat) shows 1, "unknown", as btrfs shows for every directory."""
    from commitfs.model import splittree
    from wsharness import Session, commit

    for name, value in (("SPLIT_ENTRIES", 32), ("LEAF_MIN", 4), ("LEAF_BITS", 2), ("LEAF_MAX", 16),
                        ("INDEX_MIN", 2), ("INDEX_BITS", 1), ("INDEX_MAX", 6)):
        monkeypatch.setattr(splittree, name, value)
    src = tmp_path / "src"
    for d in ("a/x", "a/y", "a/z/deep", "b", "big"):
        (src / d).mkdir(parents=True)
    (src / "a" / "file").write_bytes(b"f")
    for i in range(40):
        (src / "big" / f"d{i:02}").mkdir()
    repo = Repository.init(str(tmp_path / "repo"))
    commit_directory(repo, src, message="base")
    root = repo.load_tree(repo.load_commit(repo.refs.lookup_branch("main")).tree)
    assert isinstance(repo.load_tree(root.get("big").id), splittree.SplitTree)

    async def nlinks(k, *paths):
        return [(await k.lstat(p)).st_nlink for p in paths]

    async def main():
        async with Session(repo, tmp_path / "ws") as k:
            assert await nlinks(k, "", "a", "a/x", "a/z", "b", "big") == [5, 5, 2, 3, 2, 1]
            assert k.fs.table.get((await k.lstat("a")).st_ino).children is None  # still lazy
            await k.mkdir("a/new")  # a is edited now
            await k.rename("a/x", "b/x")
            assert await nlinks(k, "a", "b") == [5, 3]
            await k.rmdir("a/y")
            await k.rename("a/file", "b/file")
            await k.mkdir("b/x2")
            await k.rename("b/x2", "b/x")  # over an empty directory
            assert await nlinks(k, "", "a", "b", "a/z") == [5, 4, 3, 3]
            assert await commit(k) is not None
            assert await nlinks(k, "", "a", "b", "a/z", "b/x") == [5, 4, 3, 3, 2]  # over the new trees
            await k.mkdir("b/x/more")
            assert await nlinks(k, "b/x") == [3]
        async with Session(repo, tmp_path / "ws") as k:  # a remount: the overlay's rows
            assert await nlinks(k, "", "a", "b", "b/x", "big") == [5, 4, 3, 3, 1]
    trio.run(main)
    repo.close()


def test_a_reset_of_a_directory_holding_a_hard_links_first_name_keeps_its_other_name(tmp_path, cache_home):
    """``reset missing`` in the session that linked ``missing/a`` as ``d/e`` (after a
    commit, so no earlier edit had marked ``missing/a``): the file loses its name below
    the path and keeps ``d/e``, with st_nlink 1. The link marked only its new name, so
    the reset did not see the node as hard-linked and left it counting a name it no
    longer had. Found by the reference model (seed 37 of 200)."""
    from wsharness import Session, commit

    src = tmp_path / "src"
    (src / "fixed").mkdir(parents=True)
    (src / "fixed" / "x").write_bytes(b"x")
    repo = Repository.init(str(tmp_path / "repo"))
    commit_directory(repo, src, message="base")

    async def main():
        async with Session(repo, tmp_path / "ws") as k:
            await k.mkdir("missing")
            await k.write_file("missing/a", b"aa")
            await k.mkdir("d")
            assert await commit(k) is not None  # missing/a is in the base now, unmarked
            await k.link("missing/a", "d/e")  # nothing else: missing/a stays unmarked
            await k.fs.reset(["missing"])
            assert (await k.lstat("d/e")).st_nlink == 1
            assert (await k.lstat("missing/a")).st_nlink == 1
            assert (await k.lstat("d/e")).st_ino != (await k.lstat("missing/a")).st_ino
            assert await k.read_file("missing/a") == b"aa"
            assert await k.read_file("d/e") == b"aa"
            assert await commit(k) is not None
            assert await k.read_file("d/e") == b"aa"
        async with Session(repo, tmp_path / "ws") as k:
            assert (await k.lstat("d/e")).st_nlink == 1
            assert await k.read_file("d/e") == b"aa" and await k.read_file("missing/a") == b"aa"
    trio.run(main)
    repo.close()
