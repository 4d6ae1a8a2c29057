"""Committing directories (ops.snapshot) and reading them back (checkout, browse).

Round trips of randomized trees, dedup measured in stored bytes, incremental
commits through the stat cache, and every bad input: each error is a
CommitfsError and leaves the repository valid (fsck clean, branch unmoved).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
import stat
import time

import pytest

from commitfs.errors import (
    CommitfsError,
    InputError,
    IsADirectoryError_,
    NothingToCommitError,
    PathNotFoundError,
    StorageError,
)
from commitfs.model import chunker
from commitfs.model.objects import Kind
from commitfs.ops import browse, snapshot
from commitfs.ops.checkout import checkout
from commitfs.ops.diff import diff_trees
from commitfs.ops.snapshot import commit_directory
from commitfs.ops.statcache import cache_root
from commitfs.repo.repository import Repository
from core_fixtures import (
    PACK_ENTRY_SIZE,
    PACK_FOOTER_SIZE,
    age_tree,
    assert_fsck_clean,
    describe,
    faulty_repository,
    make_random_tree,
    pack_bytes,
    reopen,
    store_state,
    write_file,
)

MAX = chunker.MAX_SIZE
# Metadata a small commit adds (manifests, trees): far below one chunk.
META_SLACK = 64 * 1024


def _commit(repo, d, message="m", **kw):
    return commit_directory(repo, d, message=message, **kw)


def _checkout_describe(repo, rev_id, dest, path=""):
    checkout(repo, rev_id, dest, path)
    return describe(dest)


# --- round trips ------------------------------------------------------------------------------
def test_random_trees_round_trip(repo, tmp_path):
    seeds = range(4) if repo.is_local else range(1)  # S3 variant kept small
    for seed in seeds:
        rng = random.Random(seed)
        src = tmp_path / f"src{seed}"
        expected = make_random_tree(src, rng, big=(1 << 20) + 12345 if repo.is_local else 300_000)
        res = _commit(repo, src, f"seed {seed}", branch=f"b{seed}")
        assert res.created and res.warnings == []
        assert res.files == sum(1 for v in expected.values() if v[0] == "file")

        fresh = reopen(repo.url)
        cid = fresh.resolve(f"b{seed}")
        assert _checkout_describe(fresh, cid, tmp_path / f"out{seed}") == expected

        # The same picture through the browse API, without touching the disk.
        seen = {}
        for item in browse.walk(fresh, cid):
            e = item.entry
            if e.kind is Kind.DIR:
                seen[item.path] = ("dir",)
            elif e.kind is Kind.SYMLINK:
                seen[item.path] = ("link", e.target)
            else:
                with browse.open_file(fresh, cid, item.path) as f:
                    seen[item.path] = ("file", e.executable, f.read())
        assert seen == expected

        # Ids depend on content only: committing the checked-out copy gives the same tree.
        again = _commit(fresh, tmp_path / f"out{seed}", "copy", branch=f"copy{seed}")
        assert again.tree_id == res.tree_id
        assert again.write.blobs_new == 0
    assert_fsck_clean(repo.url)


def test_modes_symlinks_and_empty_things_are_exact(repo, tmp_path):
    src = tmp_path / "src"
    write_file(src / "run.sh", b"#!/bin/sh\n", executable=True)
    write_file(src / "data.txt", b"x")
    (src / "data.txt").chmod(0o600)  # only the user's executable bit is recorded
    write_file(src / "empty", b"")
    (src / "empty-dir" / "nested-empty").mkdir(parents=True)
    os.symlink("/absolute/target", src / "abs")
    os.symlink("../../outside", src / "rel")
    os.symlink("run.sh", src / "to-exec")
    res = _commit(repo, src)
    fresh = reopen(repo.url)
    root = fresh.load_tree(fresh.load_commit(res.commit_id).tree)
    kinds = {e.name: e.kind for e in root.entries}
    assert kinds == {"run.sh": Kind.EXEC, "data.txt": Kind.FILE, "empty": Kind.FILE, "empty-dir": Kind.DIR,
                     "abs": Kind.SYMLINK, "rel": Kind.SYMLINK, "to-exec": Kind.SYMLINK}
    out = tmp_path / "out"
    checkout(fresh, res.commit_id, out)
    assert stat.S_IMODE(os.stat(out / "run.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out / "data.txt").st_mode) == 0o644
    assert os.readlink(out / "abs") == "/absolute/target"
    assert os.readlink(out / "rel") == "../../outside"
    assert (out / "empty-dir" / "nested-empty").is_dir()
    assert (out / "empty").read_bytes() == b""


def test_checkout_of_a_subtree_and_of_one_file(repo, tmp_path):
    src = tmp_path / "src"
    expected = make_random_tree(src, random.Random(20), big=200_000)
    res = _commit(repo, src)
    r = reopen(repo.url)
    sub = {k[len("fixed/"):]: v for k, v in expected.items() if k.startswith("fixed/")}
    assert _checkout_describe(r, res.commit_id, tmp_path / "sub", "fixed") == sub
    checkout(r, res.commit_id, tmp_path / "one", "fixed/n1/n2/n3/n4/leaf.txt")
    assert describe(tmp_path / "one") == {"leaf.txt": expected["fixed/n1/n2/n3/n4/leaf.txt"]}
    with pytest.raises(PathNotFoundError):
        checkout(r, res.commit_id, tmp_path / "none", "fixed/nope")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("occupied")
    with pytest.raises(InputError, match="not an empty directory"):
        checkout(r, res.commit_id, tmp_path / "busy")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_browse_errors(repo, tmp_path):
    write_file(tmp_path / "src" / "d" / "f", b"1")
    os.symlink("d/f", tmp_path / "src" / "l")
    cid = _commit(repo, tmp_path / "src").commit_id
    with pytest.raises(PathNotFoundError):
        browse.lookup_path(repo, cid, "d/missing")
    with pytest.raises(CommitfsError, match="not a directory"):
        browse.lookup_path(repo, cid, "d/f/deeper")
    with pytest.raises(IsADirectoryError_):
        browse.open_file(repo, cid, "d")
    with pytest.raises(PathNotFoundError, match="symlink"):
        browse.open_file(repo, cid, "l")
    assert [i.path for i in browse.list_dir(repo, cid, "")] == ["d", "l"]
    assert [i.path for i in browse.list_dir(repo, cid, "d/f")] == ["d/f"]


def test_streamed_large_files_get_the_same_ids(repo, tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_random_tree(src, random.Random(21), big=700_000)
    whole = _commit(repo, src, branch="whole")
    monkeypatch.setattr(snapshot, "_SMALL_FILE", 100_000)  # stream every file above 100 kB
    shutil.rmtree(cache_root())  # forget the stat cache: read everything again
    streamed = _commit(repo, src, branch="streamed")
    assert streamed.files_read == streamed.files == whole.files
    assert streamed.tree_id == whole.tree_id
    assert streamed.write.blobs_new == 0


def test_commit_metadata_author_and_parents(repo, tmp_path, monkeypatch):
    write_file(tmp_path / "d" / "f", b"1")
    first = _commit(repo, tmp_path / "d", "one", metadata={"source": "unit", "é": "ü"})
    write_file(tmp_path / "d" / "f", b"2")
    second = _commit(repo, tmp_path / "d", "two\n\nbody", author="someone else")
    r = reopen(repo.url)
    c1, c2 = r.load_commit(first.commit_id), r.load_commit(second.commit_id)
    assert c1.metadata == {"source": "unit", "é": "ü"} and c1.author == "tester@example"
    assert c1.parents == () and c2.parents == (first.commit_id,)
    assert c2.message == "two\n\nbody" and c2.author == "someone else"
    assert abs(c2.time - time.time()) < 3600
    assert [c.status for c in diff_trees(r, c1.tree, c2.tree)] == ["modified"]


# --- dedup -------------------------------------------------------------------------------------
def test_dedup_across_files_and_versions(repo, tmp_path):
    rng = random.Random(22)
    size = 1 << 20 if repo.is_local else 400_000
    a, other = rng.randbytes(size), rng.randbytes(size)
    src = tmp_path / "src"
    write_file(src / "a.bin", a)
    write_file(src / "copy" / "b.bin", a)       # identical file elsewhere
    write_file(src / "c.bin", a + other)        # shares a's bytes as a prefix
    age_tree(src)
    packs0 = pack_bytes(repo.url)
    r1 = _commit(repo, src, "v1")
    unique = 2 * size
    # Stored: the unique content, plus at most the chunk where c.bin runs on past a's end.
    assert unique <= r1.write.bytes_new_raw <= unique + 2 * MAX + META_SLACK
    assert r1.write.blobs_dedup >= size // MAX  # b.bin and the prefix of c.bin stored nothing
    w = r1.write
    assert pack_bytes(repo.url) - packs0 == w.bytes_new_stored + PACK_ENTRY_SIZE * w.blobs_new + PACK_FOOTER_SIZE * w.packs

    # v2: a small edit in the middle of a, a renamed copy, a new copy of c.
    edited = bytearray(a)
    edited[size // 2:size // 2 + 100] = rng.randbytes(100)
    write_file(src / "a.bin", bytes(edited))
    os.rename(src / "copy" / "b.bin", src / "copy" / "renamed.bin")
    write_file(src / "d.bin", a + other)
    packs1 = pack_bytes(repo.url)
    r2 = _commit(repo, src, "v2")
    assert 100 <= r2.write.bytes_new_raw <= 3 * MAX + META_SLACK
    w = r2.write
    assert pack_bytes(repo.url) - packs1 == w.bytes_new_stored + PACK_ENTRY_SIZE * w.blobs_new + PACK_FOOTER_SIZE * w.packs
    assert pack_bytes(repo.url) - packs0 < unique + 4 * MAX + 2 * META_SLACK

    fresh = reopen(repo.url)
    changes = {c.path: c.status
               for c in diff_trees(fresh, fresh.load_commit(r1.commit_id).tree, fresh.load_commit(r2.commit_id).tree)}
    assert changes == {"a.bin": "modified", "copy/b.bin": "removed", "copy/renamed.bin": "added", "d.bin": "added"}
    out = tmp_path / "out"
    checkout(fresh, r2.commit_id, out)
    assert describe(out) == describe(src)


# --- incremental commits and the stat cache -----------------------------------------------------
def _files(rng, src, n=6):
    for i in range(n):
        write_file(src / f"dir{i % 2}" / f"f{i}.bin", rng.randbytes(rng.choice([10, 5000, 150_000])))


def test_unchanged_files_are_not_read_again(repo, tmp_path):
    rng = random.Random(23)
    src = tmp_path / "src"
    _files(rng, src)
    age_tree(src)
    r1 = _commit(repo, src, "v1")
    assert (r1.files, r1.files_read) == (6, 6)

    # One file changes (new content, a new but old-enough mtime).
    changed = src / "dir1" / "f3.bin"
    changed.write_bytes(b"new content")
    t = time.time() - 1800
    os.utime(changed, (t, t))
    r2 = _commit(repo, src, "v2")
    assert (r2.files_read, r2.bytes_read) == (1, len(b"new content"))
    assert r2.tree_id != r1.tree_id

    # Add one, delete one: only the new one is read.
    write_file(src / "dir0" / "new.bin", b"added")
    (src / "dir0" / "f0.bin").unlink()
    os.utime(src / "dir0" / "new.bin", (t, t))
    r3 = _commit(repo, src, "v3")
    assert r3.files_read == 1 and r3.files == 6

    r4 = _commit(repo, src, "v4", allow_empty=True)
    assert (r4.files_read, r4.bytes_read) == (0, 0) and r4.tree_id == r3.tree_id

    # Same size and mtime but a new inode (a file replaced by rename): read again.
    victim = src / "dir1" / "f1.bin"
    st = victim.stat()
    tmp = src / "dir1" / ".tmp"
    tmp.write_bytes(bytes(st.st_size))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, victim)
    r5 = _commit(repo, src, "v5")
    assert r5.files_read == 1 and r5.tree_id != r4.tree_id
    out = tmp_path / "out"
    checkout(reopen(repo.url), r5.commit_id, out)
    assert describe(out) == describe(src)


def test_racy_files_are_read_again(repo, tmp_path):
    src = tmp_path / "src"
    _files(random.Random(24), src, n=4)
    age_tree(src, seconds=-60)  # mtimes in the future: inside the racy window however slow this machine is
    r1 = _commit(repo, src)
    assert r1.files_read == 4
    r2 = _commit(repo, src, allow_empty=True)
    assert r2.files_read == 4  # not trusted: could change again within the mtime granularity
    age_tree(src)
    r3 = _commit(repo, src, allow_empty=True)
    assert r3.files_read == 4  # mtimes moved: read, now recorded as trusted
    r4 = _commit(repo, src, allow_empty=True)
    assert r4.files_read == 0
    assert r1.tree_id == r2.tree_id == r3.tree_id == r4.tree_id


def test_stat_cache_is_per_repository_and_advisory(repo, tmp_path):
    src = tmp_path / "src"
    _files(random.Random(25), src)
    age_tree(src)
    first = _commit(repo, src)
    assert _commit(repo, src, allow_empty=True).files_read == 0
    # Another repository never trusts this one's cache (its blobs are not there).
    local_url = str(tmp_path / "other-repo")
    other = Repository.init(local_url)
    elsewhere = _commit(other, src)
    assert elsewhere.files_read == 6 and elsewhere.tree_id == first.tree_id
    assert_fsck_clean(local_url)
    # Deleting the cache only costs a re-read.
    shutil.rmtree(cache_root())
    again = _commit(repo, src, allow_empty=True)
    assert again.files_read == 6 and again.tree_id == first.tree_id


def test_nothing_to_commit_creates_nothing(repo, tmp_path):
    src = tmp_path / "src"
    _files(random.Random(26), src)
    first = _commit(repo, src)
    before = store_state(repo.url)
    with pytest.raises(NothingToCommitError) as info:
        _commit(repo, src, "again")
    assert info.value.commit_id == first.commit_id
    age_tree(src)  # also when every file is read again
    with pytest.raises(NothingToCommitError):
        _commit(repo, src, "and again")
    assert store_state(repo.url) == before
    assert reopen(repo.url).refs.lookup_branch("main") == first.commit_id


def test_empty_directory_commits(repo, tmp_path):
    (tmp_path / "empty").mkdir()
    res = _commit(repo, tmp_path / "empty")
    assert res.created and res.files == 0
    assert browse.list_dir(reopen(repo.url), res.commit_id) == []
    with pytest.raises(NothingToCommitError):
        _commit(repo, tmp_path / "empty")


# --- bad input: a clear error, the repository still valid ---------------------------------------
@pytest.fixture
def committed(repo, tmp_path):
    """A repository with one commit on main, and the directory it came from."""
    src = tmp_path / "src"
    write_file(src / "keep.txt", b"kept")
    res = _commit(repo, src, "base")
    return repo, src, res.commit_id


def _still_valid(repo, head):
    assert_fsck_clean(repo.url, head=head)


def test_missing_dir(committed, tmp_path):
    repo, _, head = committed
    with pytest.raises(InputError, match="nowhere"):
        _commit(repo, tmp_path / "nowhere")
    write_file(tmp_path / "plain-file", b"x")
    with pytest.raises(InputError, match="not a directory"):
        _commit(repo, tmp_path / "plain-file")
    _still_valid(repo, head)


def test_symlink_loop_as_dir(committed, tmp_path):
    repo, _, head = committed
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(InputError, match="loop"):
        _commit(repo, tmp_path / "loop")
    os.symlink("pong", tmp_path / "ping")
    os.symlink("ping", tmp_path / "pong")
    with pytest.raises(InputError):
        _commit(repo, tmp_path / "ping")
    _still_valid(repo, head)


def test_symlink_to_a_directory_as_dir_commits_the_directory(committed, tmp_path):
    repo, src, head = committed
    os.symlink(src, tmp_path / "alias")
    with pytest.raises(NothingToCommitError):  # the same tree as src
        _commit(repo, tmp_path / "alias")


def test_symlink_loops_inside_the_tree_are_stored_not_followed(committed):
    repo, src, head = committed
    os.symlink("self", src / "self")
    os.symlink("b", src / "a")
    os.symlink("a", src / "b")
    os.symlink("..", src / "up")
    os.symlink(".", src / "here")
    os.symlink("/", src / "root")
    res = _commit(repo, src)
    fresh = reopen(repo.url)
    tree = fresh.load_tree(fresh.load_commit(res.commit_id).tree)
    links = {e.name: e.target for e in tree.entries if e.kind is Kind.SYMLINK}
    assert links == {"self": b"self", "a": b"b", "b": b"a", "up": b"..", "here": b".", "root": b"/"}
    assert res.files == 1  # nothing behind a link was walked
    out = src.parent / "out"
    checkout(fresh, res.commit_id, out)
    assert describe(out) == describe(src)
    _still_valid(repo, res.commit_id)


def test_unreadable_file(committed, monkeypatch):
    """A file whose read fails (EACCES): a one-line InputError naming it.

    As root, permissions do not stop reads; the CLI test runs the real thing
    without CAP_DAC_OVERRIDE.  Here the open() of that one file fails."""
    repo, src, head = committed
    write_file(src / "secret.bin", b"s" * 1000)
    write_file(src / "other.bin", b"o" * 1000)
    real_open = open

    def failing_open(path, *args, **kwargs):
        if os.fspath(path).endswith("secret.bin"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(snapshot, "open", failing_open, raising=False)
    def failing_open_fd(path, *args, **kwargs):  # every file's open (snapshot._open_checked)
        if os.fspath(path).endswith("secret.bin"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return os.open(path, *args, **kwargs)

    monkeypatch.setattr(snapshot, "_open_fd", failing_open_fd)
    with pytest.raises(InputError, match=r"cannot read .*secret\.bin: Permission denied"):
        _commit(repo, src)
    monkeypatch.setattr(snapshot, "_SMALL_FILE", 10)  # the streaming path too
    with pytest.raises(InputError, match=r"secret\.bin"):
        _commit(repo, src)
    _still_valid(repo, head)


def _fifo_watchdog(fifo, done):
    """Only if a reader blocks in open() on ``fifo`` (a commit without the O_NONBLOCK
    open) and the commit has not returned within 10 s: open its other end and close it,
    so that the reader gets an end of file and the test fails instead of hanging."""
    import threading

    def unblock():
        if done.wait(10):
            return
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader (yet), or the FIFO gone
                pass
            done.wait(0.05)
    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("large", [False, True])
def test_a_file_swapped_between_the_scan_and_its_read_is_taken_as_what_it_became(repo, tmp_path, monkeypatch,
                                                                                 large):
    """Between the scan's stat and the open of a file, it is swapped for a FIFO, a
    symlink, another file: the read opens it with O_NOFOLLOW|O_NONBLOCK relative to the
    directory's descriptor and checks the descriptor (fstat) is the regular file the scan
    saw; it is not, so the commit stats it again: the FIFO is skipped with the scan's
    warning (never waited on), the symlink recorded as a symlink (never followed), the
    new file read.  The same tree as a commit of the directory as it now is; and the
    stat cache agrees: committing again finds nothing changed."""
    import threading

    if large:
        monkeypatch.setattr(snapshot, "_SMALL_FILE", 10)  # the streaming path
    src = tmp_path / "src"
    for name in ("a.bin", "b.bin", "c.bin", "d.bin"):
        write_file(src / name, name.encode() * 20)
    scan_dir = snapshot._scan_dir

    def swapping_scan(d, *a, **kw):
        to_read = scan_dir(d, *a, **kw)
        if d.rel == "":
            assert len(to_read) == 4
            os.unlink(src / "a.bin")
            os.mkfifo(src / "a.bin")
            os.unlink(src / "b.bin")
            os.symlink("c.bin", src / "b.bin")
            write_file(src / "d.new", b"another file" * 10)
            os.rename(src / "d.new", src / "d.bin")
        return to_read

    monkeypatch.setattr(snapshot, "_scan_dir", swapping_scan)
    done = threading.Event()
    watchdog = _fifo_watchdog(str(src / "a.bin"), done)
    try:
        res = _commit(repo, src)
    finally:
        done.set()
        watchdog.join()
    monkeypatch.setattr(snapshot, "_scan_dir", scan_dir)
    assert [w for w in res.warnings if w.startswith("skipped FIFO")] == [f"skipped FIFO {src / 'a.bin'}"]
    tree = repo.load_tree(repo.load_commit(res.commit_id).tree)
    assert [e.name for e in tree.entries] == ["b.bin", "c.bin", "d.bin"]
    assert tree.get("b.bin").kind is Kind.SYMLINK
    assert res.files == 2
    out = tmp_path / "out"
    checkout(repo, res.commit_id, out)
    assert os.readlink(out / "b.bin") == "c.bin"
    assert (out / "d.bin").read_bytes() == b"another file" * 10
    with Repository.init(str(tmp_path / "fresh")) as fresh:
        assert _commit(fresh, src).tree_id == res.tree_id
    age_tree(src)
    with pytest.raises(NothingToCommitError):
        _commit(repo, src)
    again = _commit(repo, src, allow_empty=True)
    assert again.files_read == 0 and again.tree_id == res.tree_id
    assert not [p for p in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{p}") == str(src)]


def test_fifo_and_socket_are_skipped_with_a_warning(committed, monkeypatch):
    repo, src, head = committed
    os.mkfifo(src / "pipe")
    write_file(src / "new.txt", b"new")
    monkeypatch.chdir(src)  # AF_UNIX paths are limited to ~108 bytes: bind relatively
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("sock")
        res = _commit(repo, src)
    finally:
        sock.close()
    assert len(res.warnings) == 2
    assert any(w.startswith("skipped FIFO") and w.endswith("pipe") for w in res.warnings)
    assert any(w.startswith("skipped socket") and w.endswith("sock") for w in res.warnings)
    assert [i.path for i in browse.list_dir(reopen(repo.url), res.commit_id)] == ["keep.txt", "new.txt"]
    _still_valid(repo, res.commit_id)


@pytest.mark.parametrize("where", [b"bad\xff.txt", b"sub\xfe/inner.txt"])
def test_non_utf8_names_are_refused(committed, where):
    repo, src, head = committed
    path = os.fsencode(src) + b"/" + where
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    before = store_state(repo.url)
    with pytest.raises(InputError, match=r"not valid UTF-8: .*(bad\\xff\.txt|sub\\xfe)"):
        _commit(repo, src)
    assert store_state(repo.url) == before
    _still_valid(repo, head)


# --- storage failures (a full disk) ----------------------------------------------------------------
def _no_space(message: str) -> StorageError:
    return StorageError(f"no space left on device ({message})")


@pytest.mark.parametrize("fail", ["packs/", "index/", "commits/", "ref"])
def test_full_disk_leaves_the_branch_unmoved(committed, fail):
    repo, src, head = committed
    write_file(src / "more.bin", random.Random(27).randbytes(200_000))
    faulty = faulty_repository(repo.url)
    store = faulty.store
    store.error = _no_space
    if fail == "ref":
        store.fail_on = {"save_ref_if_equals"}
    else:
        store.fail_on = {"save_object"}
        store.fail_keys = lambda key: key.startswith(fail)
    with pytest.raises(StorageError, match="no space left"):
        _commit(faulty, src, "fails")
    assert store.calls["save_object"] >= 1
    _still_valid(repo, head)
    # Space is back: the same commit goes through and is complete.
    fresh = reopen(repo.url)
    res = _commit(fresh, src, "works")
    assert fresh.load_commit(res.commit_id).parents == (head,)
    out = src.parent / "out"
    checkout(fresh, res.commit_id, out)
    assert describe(out) == describe(src)
    _still_valid(repo, res.commit_id)


def test_full_tmpfs_leaves_the_repository_valid(small_tmpfs, tmp_path, cache_home):
    url = str(small_tmpfs / "repo")
    repo = Repository.init(url)
    src = tmp_path / "src"
    write_file(src / "small.txt", b"fits")
    head = _commit(repo, src).commit_id
    write_file(src / "big.bin", random.Random(28).randbytes(3 << 20))  # 3 MiB into 1 MiB
    with pytest.raises(StorageError, match="no space left on device"):
        _commit(reopen(url), src)
    assert reopen(url).refs.lookup_branch("main") == head
    assert_fsck_clean(url)
    leftovers = [p for p in small_tmpfs.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    (src / "big.bin").unlink()
    write_file(src / "small2.txt", b"still fits")
    res = _commit(reopen(url), src)
    assert reopen(url).load_commit(res.commit_id).parents == (head,)
    assert_fsck_clean(url)


def test_nothing_to_commit_still_reports_skipped_special_files(tmp_path, cache_home):
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a\n")
    os.mkfifo(data / "pipe")
    repo = str(tmp_path / "repo")
    env = {**os.environ, "COMMITFS_REPO": repo}
    run = lambda *a: subprocess.run([sys.executable, "-m", "commitfs", *a], env=env, capture_output=True, text=True)
    assert run("init").returncode == 0
    assert run("commit", str(data), "-m", "one").returncode == 0
    again = run("commit", str(data), "-m", "two")
    assert again.returncode == 0
    assert "nothing to commit" in again.stderr
    assert "warning: skipped FIFO" in again.stderr


def test_short_reads_are_not_taken_for_the_end_of_a_file(tmp_path, cache_home, monkeypatch):
    """POSIX lets read(2) return fewer bytes than asked before the end (a FUSE source with
    direct_io, a network file system, a signal): a commit reads on, and stores the same
    files as from a source that never reads short."""
    src = tmp_path / "src"
    for name, size in [("a.bin", 10), ("b.bin", 5000), ("c.bin", 200_000), ("d.bin", 3_000_000)]:
        write_file(src / name, random.Random(size).randbytes(size))
    plain = Repository.init(str(tmp_path / "plain"))
    try:
        want = plain.load_commit(commit_directory(plain, str(src), message="m").commit_id).tree
    finally:
        plain.close()
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 1000)))
    shorty = Repository.init(str(tmp_path / "short"))
    try:
        got = shorty.load_commit(commit_directory(shorty, str(src), message="m").commit_id).tree
        tree = shorty.load_tree(got)
        assert {e.name: e.size for e in tree.entries} == {"a.bin": 10, "b.bin": 5000, "c.bin": 200_000,
                                                          "d.bin": 3_000_000}
    finally:
        shorty.close()
    assert got == want  # the same tree (commit ids differ by their time)


def test_the_one_chunk_manifest_written_by_hand_is_the_model_s_encoding(tmp_path):
    """prepare_batch encodes a one-chunk file's manifest itself (a million-file commit's
    hot path); it must stay byte-identical to FileManifest.encode, or the same content
    would get two ids depending on how it was committed."""
    from commitfs.model import chunker
    from commitfs.model.ids import HASHER
    from commitfs.model.objects import FileManifest
    sizes = sorted({1, 2, 127, 128, 129, 255, 256, chunker.MIN_SIZE - 1, chunker.MIN_SIZE})
    paths = []
    for n in sizes:
        p = tmp_path / f"f{n}"
        p.write_bytes(random.Random(n).randbytes(n))
        paths.append((str(p), n))
    for (path, n), prepared in zip(paths, snapshot.prepare_batch(paths)):
        assert isinstance(prepared, tuple), f"a {n}-byte file took the general path"
        cid, data, _stored, _comp, fid, mdata = prepared
        want = FileManifest((cid,), (n,)).encode()
        assert mdata == want and fid == HASHER(want).digest()


# --- the compiled reads of small files (commitfs.ops._fastscan) ------------------------------
def test_compiled_batch_reads_give_what_the_python_reads_give(tmp_path, monkeypatch):
    """prepare_batch reads a batch of small files in C (_fastscan.read_files, the GIL
    released once); every case must come out as the Python reads make it: the same
    bytes, chunk and file ids, manifests and compressions for files read whole, None
    for what is not the regular file the scan saw (a symlink, a FIFO, another inode),
    the same one-line error for a file that cannot be opened, and a file that grew
    since its stat read whole by the Python path."""
    fastscan = snapshot._fastscan
    assert fastscan is not None, "commitfs.ops._fastscan is not built (pip install -e .)"
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    sizes = [0, 1, 63, 64, 1000, 4097, chunker.MIN_SIZE, chunker.MIN_SIZE + 1, 3 * chunker.MAX_SIZE + 5]
    for n in sizes:
        (src / f"f{n}").write_bytes(rng.randbytes(n))
    (src / "text").write_bytes(b"compressible " * 500)
    (src / "grown").write_bytes(b"g" * 100)
    os.symlink("f1", src / "link")
    os.mkfifo(src / "fifo")
    (src / "swapped").write_bytes(b"s" * 10)
    dfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def where(name):
            st = os.lstat(src / name)
            return (dfd, name, st.st_dev, st.st_ino)
        files = [(str(src / f"f{n}"), n, where(f"f{n}")) for n in sizes]
        files += [(str(src / f"f{n}"), n) for n in sizes[:3]]  # by path, unchecked
        files += [(str(src / "f1000"), 1000, (None, "f1000", None, None)),  # by path
                  (str(src / "text"), 6500, where("text")),
                  (str(src / "grown"), 10, where("grown")),  # stat'ed at 10 bytes, 100 now
                  (str(src / "link"), 2, where("link")),  # a symlink now
                  (str(src / "fifo"), 0, where("fifo")),  # a FIFO now
                  (str(src / "swapped"), 10, (dfd, "swapped", 1, 1))]  # another inode
        raw = fastscan.read_files(files, snapshot._OPEN_FLAGS)
        assert raw[:len(sizes)] == [(src / f"f{n}").read_bytes() for n in sizes]
        assert raw[-3:] == [None, None, None] and raw[-4] is False  # (grown: the Python read takes it)
        fast = snapshot.prepare_batch(files)
        monkeypatch.setattr(snapshot, "_fastscan", None)
        slow = snapshot.prepare_batch(files)

        def plain(p):
            if type(p) is tuple:
                return tuple(bytes(x) if isinstance(x, (bytes, memoryview)) else x for x in p)
            if p is None:
                return None
            return (p.ids, [bytes(c) for c in p.chunks], [bytes(s) for s in p.stored], p.compression)
        assert [plain(p) for p in fast] == [plain(p) for p in slow]
        assert fast[-3:] == [None, None, None] and type(fast[-4]) is tuple and len(fast[-4][1]) == 100
        monkeypatch.setattr(snapshot, "_fastscan", fastscan)
        missing = [(str(src / "gone"), 5, (dfd, "gone", None, None))]
        assert fastscan.read_files(missing, snapshot._OPEN_FLAGS) == [errno.ENOENT]
        with pytest.raises(InputError, match=r"^cannot read .*gone: No such file or directory$"):
            snapshot.prepare_batch(missing)
        monkeypatch.setattr(snapshot, "_fastscan", None)
        with pytest.raises(InputError, match=r"^cannot read .*gone: No such file or directory$"):
            snapshot.prepare_batch(missing)
    finally:
        os.close(dfd)


def test_compiled_directory_stats_give_what_os_stat_gives(tmp_path, cache_home, monkeypatch):
    """The scan lists a directory and stats its entries in C (_fastscan.lstat_names,
    the GIL released once per directory): the same names in the same order and the
    same six fields as DirEntry.stat for every kind of entry (file, executable,
    directory, symlink, dangling symlink, FIFO, a non-ASCII name), the errno of a
    name gone since the listing, and the same commit of the directory."""
    fastscan = snapshot._fastscan
    assert fastscan is not None, "commitfs.ops._fastscan is not built (pip install -e .)"
    src = tmp_path / "src"
    write_file(src / "file.bin", b"f" * 1234)
    write_file(src / "exec.sh", b"#!/bin/sh\n")
    os.chmod(src / "exec.sh", 0o755)
    write_file(src / "sub" / "inner.txt", b"inner")
    write_file(src / "caf\u00e9.txt", b"accent")
    os.symlink("file.bin", src / "link")
    os.symlink("nowhere", src / "dangling")
    os.mkfifo(src / "fifo")
    os.utime(src / "file.bin", ns=(1, 1_700_000_000_123_456_789))
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        monkeypatch.setattr(snapshot, "_STAT_CHUNK", 3)  # names stat'ed in three calls
        fast_names, fast_stats = snapshot._list_and_stat(fd)
        fast_stats = list(fast_stats)
        assert all(type(st) is tuple for st in fast_stats) and len(fast_stats) == 7
        monkeypatch.setattr(snapshot, "_fastscan", None)
        slow_names, slow_stats = snapshot._list_and_stat(fd)
        assert (slow_names, list(slow_stats)) == (fast_names, fast_stats)
        assert fast_names == sorted(os.listdir(src)) and len(fast_names) == 7
        assert fast_stats[fast_names.index("file.bin")][2] == 1_700_000_000_123_456_789
        assert fastscan.lstat_names(fd, ["gone", "file.bin"])[0] == errno.ENOENT
    finally:
        os.close(fd)
    with Repository.init(str(tmp_path / "slow")) as slow_repo:
        slow = _commit(slow_repo, src)
    monkeypatch.setattr(snapshot, "_fastscan", fastscan)
    with Repository.init(str(tmp_path / "fast")) as fast_repo:
        fast = _commit(fast_repo, src)
    assert fast.tree_id == slow.tree_id and fast.warnings == slow.warnings
