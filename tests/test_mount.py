"""Real FUSE mounts through ``commitfs mount`` (a daemon process), checked with ordinary tools.

Every mount is made by the ``mounts`` fixture, which unmounts it (and waits
for its daemon) even when the test fails.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from core_fixtures import assert_one_line_error, cli_env, describe, write_file
from mount_fixtures import force_unmount, run_commitfs, wait_gone
from commitfs.fuse import lifecycle
from commitfs.fuse.lifecycle import DaemonConfig, find_mount, lookup_daemon_pid, start_daemon
from commitfs.errors import MountError
from commitfs.model.objects import EMPTY_MANIFEST, Commit, Kind, Tree, TreeEntry
from commitfs.ops.browse import lookup_path
from commitfs.ops.checkout import checkout
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.pack import pack_key
from commitfs.repo.repository import Repository


def sh(cmd: str, cwd) -> bytes:
    return subprocess.run(cmd, shell=True, cwd=cwd, check=True, capture_output=True, timeout=60).stdout


def checked_out(dataset, tmp_path, rev="v1"):
    dest = tmp_path / "checkout"
    with Repository.open(dataset.url) as repo:
        checkout(repo, repo.resolve(rev), dest)
    return dest


# --- the mount shows what checkout writes ------------------------------------------------
def test_mount_equals_checkout(dataset, mounts, tmp_path):
    ref = checked_out(dataset, tmp_path)
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")

    # ls -R and find list the same names, kinds and sizes.
    assert sh("ls -R", mnt) == sh("ls -R", ref)
    fmt = r"find . -mindepth 1 \( -type d -printf '%y %P\n' \) -o -printf '%y %s %P %l\n' | sort"
    assert sh(fmt, mnt) == sh(fmt, ref)
    # stat: sizes, modes (read-only: write bits cleared), symlinks.
    for dirpath, dirnames, filenames in os.walk(ref):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), ref)
            a, b = os.lstat(os.path.join(ref, rel)), os.lstat(os.path.join(mnt, rel))
            assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), rel
            if stat.S_ISLNK(a.st_mode):
                assert os.readlink(os.path.join(mnt, rel)) == os.readlink(os.path.join(ref, rel))
                assert b.st_size == a.st_size
            elif stat.S_ISREG(a.st_mode):
                assert b.st_size == a.st_size, rel
                assert stat.S_IMODE(b.st_mode) == stat.S_IMODE(a.st_mode) & ~0o222, rel
            else:
                assert stat.S_IMODE(b.st_mode) == 0o555
    # Every file's bytes.
    sums = "find . -type f -print0 | sort -z | xargs -0 -r sha256sum"
    assert sh(sums, mnt) == sh(sums, ref)
    assert (mnt / "fixed" / "big.bin").read_bytes() == (ref / "fixed" / "big.bin").read_bytes()
    assert os.access(mnt / "fixed" / "run.sh", os.X_OK)
    assert sh("./fixed/run.sh", mnt) == b"hi\n"
    # cp -r and tar carry everything over.
    sh(f"cp -r '{mnt}' '{tmp_path / 'copy'}'", tmp_path)
    assert describe(tmp_path / "copy") == describe(ref) == dataset.picture
    (tmp_path / "untar").mkdir()
    sh(f"tar -C '{mnt}' -cf - . | tar -C '{tmp_path / 'untar'}' -xf -", tmp_path)
    assert describe(tmp_path / "untar") == dataset.picture


def test_layout_of_a_mount_without_rev(dataset, mounts):
    with Repository.open(dataset.url) as repo:
        write_file(dataset.src / "fixed" / "new.txt", b"new\n")
        second = commit_directory(repo, dataset.src, message="two").commit_id
        repo.refs.set_branch_if_equals("old", dataset.commit, None)
        third = commit_directory(repo, dataset.src / "fixed", branch="other", message="3").commit_id
        repo.refs.set_branch_if_equals("other", None, third)  # deleted: third is now unlisted
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt)
    assert sorted(os.listdir(mnt)) == ["aliases", "branches", "commits", "tags"]
    assert sorted(os.listdir(mnt / "branches")) == ["main", "old"]
    assert os.listdir(mnt / "tags") == ["v1"]
    assert sorted(os.listdir(mnt / "commits")) == sorted([dataset.commit.hex(), second.hex()])
    assert (mnt / "branches" / "main" / "fixed" / "new.txt").read_bytes() == b"new\n"
    assert not (mnt / "branches" / "old" / "fixed" / "new.txt").exists()
    assert describe(mnt / "tags" / "v1") == dataset.picture
    # An unlisted commit by full id and by unique prefix.
    assert (mnt / "commits" / third.hex() / "new.txt").read_bytes() == b"new\n"
    assert (mnt / "commits" / third.hex()[:8] / "new.txt").read_bytes() == b"new\n"
    assert not (mnt / "commits" / ("f" * 64)).exists()
    assert os.statvfs(mnt).f_namemax == 255


# --- concurrency ---------------------------------------------------------------------
def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            h.update(block)
    return h.hexdigest()


def test_concurrent_readers_in_several_processes(dataset, mounts, tmp_path):
    """Six processes read every file, and the large one six times over, at once; in the
    default mode, where the kernel opens files itself and reads come by inode (after
    the first open, which the daemon answers ENOSYS: a clean-clone CI run saw 2 OPEN
    requests when six first opens raced that answer)."""
    mnt = mounts.mountpoint()
    log = tmp_path / "mount.log"
    mounts.mount(dataset.url, mnt, "--log-file", str(log), rev="main")
    files = [p for p, d in dataset.picture.items() if d[0] == "file"]
    jobs = [str(mnt / p) for p in files] + [str(mnt / "fixed" / "big.bin")] * 6
    jobs += [str(mnt / "fixed" / "copy-of-big.bin")] * 3
    # One open first: the kernel stops sending OPEN at the daemon's first ENOSYS answer,
    # and opens already sent by then (six first opens at once) each come as a request.
    assert _digest(jobs[0]) == hashlib.sha256(dataset.picture[files[0]][2]).hexdigest()
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        got = pool.map(_digest, jobs, chunksize=1)
    want = [hashlib.sha256(dataset.picture[os.path.relpath(j, mnt)][2]).hexdigest() for j in jobs]
    assert got == want
    assert run_commitfs("umount", str(mnt)).returncode == 0
    assert "files are opened by the kernel alone" in log.read_text()
    assert _open_requests(log) <= 1


# --- who opens files: the kernel alone (no-open mode), or the daemon ----------------------
def _open_requests(log) -> int:
    """The "OPEN requests: N" the daemon logs when it is unmounted."""
    lines = [x for x in log.read_text().splitlines() if "OPEN requests: " in x]
    assert len(lines) == 1, log.read_text()
    return int(lines[0].split("OPEN requests: ")[1])


def _files_of(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, _, names in os.walk(root) for n in names if os.path.isfile(os.path.join(d, n))
                  and not os.path.islink(os.path.join(d, n)))


def test_read_only_mounts_let_the_kernel_open_files(dataset, mounts, tmp_path):
    """With commitfs's fast path (fuse/fastpath.py: its C module must be built, as setup.py
    does wherever pyfuse3 builds), the first OPEN is answered ENOSYS and the kernel opens
    every later file itself: one OPEN request at most, however many files are opened,
    every read arriving by inode, and every byte right."""
    ref = checked_out(dataset, tmp_path)
    log = tmp_path / "mount.log"
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, "--log-file", str(log), rev="v1")
    same = "fixed/copy-of-big.bin"
    want = (ref / same).read_bytes()
    for i in range(20):
        with open(mnt / same, "rb") as f:
            if i % 2:
                f.seek(i * 100_000)
                assert f.read(70_000) == want[i * 100_000:i * 100_000 + 70_000]
            else:
                assert f.read() == want
    files = _files_of(ref)
    assert len(files) > 5
    for rel in files:
        with open(mnt / rel, "rb") as f:
            assert f.read() == (ref / rel).read_bytes(), rel
    assert (mnt / same).read_bytes() == want
    assert run_commitfs("umount", str(mnt)).returncode == 0
    text = log.read_text()
    assert "files are opened by the kernel alone" in text and "opened by the daemon" not in text
    assert "without commitfs's fast path" not in text
    assert _open_requests(log) <= 1
    (by_inode,) = [int(x.rsplit(": ", 1)[1]) for x in text.splitlines() if "READs by inode (fast path): " in x]
    assert by_inode >= len(files)


def test_a_warm_reopen_and_reread_makes_no_request(dataset, mounts):
    """Once a file has been read, another process opens and reads it again with the daemon
    stopped (SIGSTOP): the open, the reads and the close are the kernel's alone (no OPEN,
    no READ, no GETATTR), so they cannot wait for the daemon.  This test's own mapping of
    the file pins its pages and names (a concurrent drop_caches cannot evict them)."""
    import mmap

    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    pid = lookup_daemon_pid(mnt)
    path = mnt / "fixed" / "copy-of-big.bin"
    want = hashlib.sha256((dataset.src / "fixed" / "copy-of-big.bin").read_bytes()).hexdigest()
    assert _digest(str(path)) == want  # the first read goes to the daemon
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert hashlib.sha256(mm).hexdigest() == want  # every page resident and mapped
        os.kill(pid, signal.SIGSTOP)
        try:
            # A bound on a hang, not a speed goal: a request to the stopped daemon never returns.
            proc = subprocess.run(["sha256sum", str(path)], capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("re-reading a warm file waited for the daemon")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert proc.returncode == 0 and proc.stdout.split()[0].decode() == want


def test_a_random_reads_chunk_goes_to_the_page_cache_whole(dataset, mounts):
    """A random 4 KiB read of a large file makes the daemon fetch and verify the whole
    chunk holding it; the daemon hands the chunk to the kernel's page cache (FUSE
    notify-store), so its pages before the read (which no kernel read-ahead asks
    for) become resident, and reading them again makes no request: they read right
    with the daemon stopped (SIGSTOP)."""
    import mmap

    from test_readpath import _resident_pages_of

    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    pid = lookup_daemon_pid(mnt)
    with Repository.open(dataset.url) as repo:
        sizes = repo.load_manifest(lookup_path(repo, dataset.commit, "fixed/big.bin").id).chunk_sizes
    k = len(sizes) // 2
    start, size = sum(sizes[:k]), sizes[k]
    page = mmap.PAGESIZE
    first = (start + page - 1) // page * page  # the chunk's first whole page
    at = (start + size * 3 // 4) // page * page  # the read, late in the chunk
    assert at - first >= 4 * page
    path = mnt / "fixed" / "big.bin"
    want = (dataset.src / "fixed" / "big.bin").read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, at) == want[at:at + 4096]
        deadline = time.monotonic() + 10
        while _resident_pages_of(fd, first, at - first) < (at - first) // page:
            assert time.monotonic() < deadline, "the chunk's earlier pages never reached the page cache"
            time.sleep(0.02)
    finally:
        os.close(fd)
    os.kill(pid, signal.SIGSTOP)
    try:
        code = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                "sys.stdout.buffer.write(os.pread(fd, int(sys.argv[3]), int(sys.argv[2])))")
        # A bound on a hang, not a speed goal: a request to the stopped daemon never returns.
        proc = subprocess.run([sys.executable, "-c", code, str(path), str(first), str(at - first)],
                              capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("re-reading pages of a random read's chunk waited for the daemon")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 0 and proc.stdout == want[first:at]


def test_without_no_open_the_daemon_opens_files_and_serves_the_same_bytes(dataset, mounts, tmp_path):
    """The fallback (a stock pyfuse3, or no_open=False): every open is an OPEN request
    answered by the daemon, with keep_cache; the bytes are the same."""
    ref = checked_out(dataset, tmp_path)
    mnt = mounts.mountpoint()
    mounts.made.append(str(mnt))  # unmounted by the fixture even if the test fails
    log = tmp_path / "daemon.log"
    config = DaemonConfig(repo=dataset.url, mountpoint=str(mnt), cache_dir=str(tmp_path / "c"),
                          log_file=str(log), commit=dataset.commit.hex(), rev="v1", no_open=False)
    start_daemon(config)
    files = _files_of(ref)
    opened = 0
    for rel in files:
        assert _digest(str(mnt / rel)) == _digest(str(ref / rel)), rel
        opened += 1
    for _ in range(3):  # warm re-opens are OPEN requests too
        assert _digest(str(mnt / "fixed" / "big.bin")) == _digest(str(ref / "fixed" / "big.bin"))
        opened += 1
    assert run_commitfs("umount", str(mnt)).returncode == 0
    text = log.read_text()
    assert "files are opened by the daemon" in text and "kernel alone" not in text
    assert _open_requests(log) >= opened


def test_no_open_mount_still_refuses_writes_and_missing_files(dataset, mounts):
    """The kernel opens files without asking, but never for writing: the mount is ``ro``.
    Checked before any file was opened and after the kernel took opens over."""
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    f = mnt / "fixed" / "run.sh"

    def refused():
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_TRUNC,
                      os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT):
            with pytest.raises(OSError) as exc:
                os.close(os.open(f, flags))
            assert exc.value.errno == errno.EROFS, flags
        for missing in ("fixed/nope", "nope"):
            with pytest.raises(OSError) as exc:
                os.close(os.open(mnt / missing, os.O_RDONLY))
            assert exc.value.errno == errno.ENOENT, missing
        with pytest.raises(OSError) as exc:
            os.close(os.open(mnt / "fixed" / "new", os.O_WRONLY | os.O_CREAT, 0o644))
        assert exc.value.errno == errno.EROFS

    refused()
    for _ in range(3):
        assert f.read_bytes() == b"#!/bin/sh\necho hi\n"
        assert (mnt / "fixed" / "big.bin").read_bytes() == (dataset.src / "fixed" / "big.bin").read_bytes()
    refused()
    assert f.read_bytes() == b"#!/bin/sh\necho hi\n"  # untouched


# --- a moving branch ---------------------------------------------------------------------
def test_branch_view_follows_the_branch_and_open_files_keep_their_bytes(dataset, mounts):
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, "--refresh", "1")
    path = mnt / "branches" / "main" / "fixed" / "run.sh"
    held = open(path, "rb")  # opened before the move, read only after it
    try:
        write_file(dataset.src / "fixed" / "run.sh", b"#!/bin/sh\necho moved\n", executable=True)
        with Repository.open(dataset.url) as repo:
            new = commit_directory(repo, dataset.src, message="moved").commit_id
        deadline = time.monotonic() + 30  # far beyond --refresh: fails only if the view never moves
        while path.read_bytes() != b"#!/bin/sh\necho moved\n":
            assert time.monotonic() < deadline, "the branch view did not follow the branch"
            time.sleep(0.2)
        assert os.getxattr(mnt / "branches" / "main", "user.commitfs.commit") == new.hex().encode()
        assert held.read() == b"#!/bin/sh\necho hi\n"
    finally:
        held.close()


# --- xattrs, read-only, ENOENT -----------------------------------------------------------
def test_xattrs(dataset, mounts):
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    with Repository.open(dataset.url) as repo:
        big_id = lookup_path(repo, dataset.commit, "fixed/big.bin").id
        tree_id = lookup_path(repo, dataset.commit, "fixed").id
    big = mnt / "fixed" / "big.bin"
    assert sorted(os.listxattr(big)) == ["user.commitfs.commit", "user.commitfs.id", "user.commitfs.repo"]
    assert os.getxattr(big, "user.commitfs.commit") == dataset.commit.hex().encode()
    assert os.getxattr(big, "user.commitfs.id") == big_id.hex().encode()
    assert os.getxattr(mnt / "fixed", "user.commitfs.id") == tree_id.hex().encode()
    assert os.getxattr(mnt, "user.commitfs.repo") == dataset.url.encode()
    with pytest.raises(OSError) as exc:
        os.getxattr(big, "user.nope")
    assert exc.value.errno == errno.ENODATA


def test_writes_fail_with_erofs_and_missing_names_with_enoent(dataset, mounts):
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    f, d = mnt / "fixed" / "big.bin", mnt / "fixed"
    attempts = {
        "open for writing": lambda: open(f, "r+b"),
        "open for appending": lambda: open(f, "ab"),
        "create": lambda: open(d / "new-file", "wb"),
        "mkdir": lambda: os.mkdir(d / "new-dir"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(d / "empty-dir"),
        "rename": lambda: os.rename(f, d / "renamed"),
        "symlink": lambda: os.symlink("x", d / "new-link"),
        "link": lambda: os.link(f, d / "hard-link"),
        "chmod": lambda: os.chmod(f, 0o777),
        "truncate": lambda: os.truncate(f, 0),
        "utime": lambda: os.utime(f, (0, 0)),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.commitfs.id"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS, what
    assert (mnt / "fixed" / "big.bin").read_bytes() == (dataset.src / "fixed" / "big.bin").read_bytes()
    for missing in ("nope", "fixed/nope", "fixed/n1/nope/deeper"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / missing)
    with pytest.raises(NotADirectoryError):
        os.stat(mnt / "fixed" / "big.bin" / "x")


# --- faults ------------------------------------------------------------------------------
def test_corrupt_pack_gives_eio_never_wrong_bytes(dataset, mounts, tmp_path):
    data = (dataset.src / "fixed" / "big.bin").read_bytes()
    with Repository.open(dataset.url) as repo:
        manifest = repo.load_manifest(lookup_path(repo, dataset.commit, "fixed/big.bin").id)
        bad = len(manifest.chunk_ids) // 2
        loc = repo.locate(manifest.chunk_ids[bad])
        pack = repo.store.local_path(pack_key(loc.pack))
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.stored // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    bad_start = sum(manifest.chunk_sizes[:bad])
    log = tmp_path / "mount.log"
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, "--log-file", str(log), rev="v1")
    fd = os.open(mnt / "fixed" / "big.bin", os.O_RDONLY)
    try:
        eio, off = 0, 0
        while off < len(data):
            try:
                got = os.pread(fd, 1 << 16, off)
            except OSError as exc:
                assert exc.errno == errno.EIO
                eio += 1
                off += 1 << 16
                continue
            # Whatever is served is right; a read that reaches the bad chunk stops short before it.
            assert got and got == data[off:off + len(got)], off
            off += len(got)
        assert eio >= 1
        with pytest.raises(OSError) as exc:
            os.pread(fd, 100, bad_start)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert "fails its hash check" in log.read_text()


# --- the chunk cache of a non-local repository --------------------------------------------
def _commit_dataset(url: str, src) -> bytes:
    with Repository.init(url) as repo:
        return commit_directory(repo, src, message="dataset").commit_id


def _log_stats(log) -> dict[str, int]:
    line = [x for x in log.read_text().splitlines() if "chunk cache: hits=" in x][-1]
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split("chunk cache: ")[1].split())}


def test_cache_reused_across_remounts_and_capped(dataset, mounts, s3_url, tmp_path):
    from commitfs.cache import DiskChunkCache

    _commit_dataset(s3_url, dataset.src)
    cache_dir = tmp_path / "cache"
    mnt = mounts.mountpoint()

    def read_everything(log):
        mounts.mount(s3_url, mnt, "--cache-dir", str(cache_dir), "--cache-size", "64M",
                     "--log-file", str(log), rev="main")
        assert describe(mnt) == dataset.picture
        assert run_commitfs("umount", str(mnt)).returncode == 0
        return _log_stats(log)

    first = read_everything(tmp_path / "one.log")
    assert first["puts"] > 0 and first["misses"] >= first["puts"]  # (hits: files sharing chunks)
    # The daemon's cache writes what it fetched as bundles, not a file per chunk (a create
    # is what a cold read's cache paid most for: cache/disk.py).
    made = [p for p in (cache_dir / "chunks" / "v1").rglob("*") if p.is_file() and p.name != "evict.lock"]
    assert made and all(p.parent.name == "bundles" for p in made)
    assert len(made) < first["puts"]  # (4 bundles for 50 chunks here; big.bin's chunks come together)
    assert first["put_failures"] == 0 and 0 <= first["memory_hits"] <= first["hits"]  # every counter logged
    # The loader's chunk single flight is counted in the unmount line too.
    (joined,) = [int(x.rsplit(": ", 1)[1]) for x in (tmp_path / "one.log").read_text().splitlines()
                 if "chunks found in flight and waited for: " in x]
    assert joined >= 0
    second = read_everything(tmp_path / "two.log")
    assert second["misses"] == 0 and second["hits"] >= first["puts"] // 2
    # A small cap: the cache evicts and stays near it.
    small = tmp_path / "small.log"
    mounts.mount(s3_url, mnt, "--cache-dir", str(tmp_path / "cache2"), "--cache-size", "1M",
                 "--log-file", str(small), rev="main")
    assert describe(mnt) == dataset.picture
    size = DiskChunkCache(tmp_path / "cache2" / "chunks", 1 << 20).size()
    assert size <= (1 << 20) + (256 << 10)  # the cap, plus at most one chunk written since the last scan
    assert run_commitfs("umount", str(mnt)).returncode == 0
    assert _log_stats(small)["evictions"] >= 1


def test_local_repository_is_read_in_place(dataset, mounts, tmp_path):
    cache_dir = tmp_path / "cache"
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, "--cache-dir", str(cache_dir), rev="main")
    assert describe(mnt) == dataset.picture
    assert not (cache_dir / "chunks").exists()


def test_mount_sets_a_large_kernel_read_ahead(dataset, mounts, tmp_path):
    """The daemon raises the mount's read-ahead from the kernel's 128 KiB to 1 MiB (these
    machines run as root, which the sysfs knob needs), so large files are read in 1 MiB
    requests; reads are as right as ever."""
    assert os.geteuid() == 0, "the set-up runs the tests as root"
    mnt = mounts.mountpoint()
    log = tmp_path / "mount.log"
    mounts.mount(dataset.url, mnt, "--log-file", str(log), rev="main")
    st = os.stat(mnt)
    knob = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    with open(knob) as f:
        assert int(f.read()) == DaemonConfig.read_ahead_kb == 1024
    assert (mnt / "fixed" / "big.bin").read_bytes() == (dataset.src / "fixed" / "big.bin").read_bytes()
    assert "read-ahead 1024 KiB" in log.read_text()


# --- a huge directory ------------------------------------------------------------------------
def test_readdir_of_100k_entries(tmp_path, mounts):
    n = 100_000
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        with repo.writer() as w:
            fid = w.add_manifest(EMPTY_MANIFEST)
            tree = Tree.build([TreeEntry(f"sample-{i:07d}.jpg", Kind.FILE, 0, fid) for i in range(n)])
            tid = w.add_tree(tree)
        cid = repo.save_commit(Commit(tid, (), "t", 1_700_000_000, "100k files"))
    mnt = mounts.mountpoint()
    mounts.mount(url, mnt, rev=cid.hex())
    names = os.listdir(mnt)
    assert names == [e.name for e in tree.entries]
    inos = {e.inode() for e in os.scandir(mnt)}
    assert len(inos) == n
    assert os.stat(mnt / "sample-0099999.jpg").st_size == 0


# --- mount and umount errors ----------------------------------------------------------------
def test_mount_errors(dataset, mounts, tmp_path):
    def fails(*args) -> str:
        proc = mounts.mount(dataset.url, *args, check=False)
        return assert_one_line_error(proc.returncode, proc.stderr)

    assert "does not exist" in fails(tmp_path / "missing")
    full = mounts.mountpoint("full")
    (full / "x").write_text("x")
    assert "not empty" in fails(full)
    assert "not a directory" in fails(full / "x")
    mnt = mounts.mountpoint()
    proc = mounts.mount(dataset.url, mnt, rev="no-such-branch", check=False)
    assert "unknown revision" in assert_one_line_error(proc.returncode, proc.stderr)
    assert find_mount(mnt) is None
    proc = mounts.mount(str(tmp_path / "not-a-repo"), mnt, check=False)
    assert "no commitfs repository" in assert_one_line_error(proc.returncode, proc.stderr)
    mounts.mount(dataset.url, mnt)
    assert "already a mount point" in fails(mnt)
    proc = run_commitfs("umount", str(tmp_path / "full"))
    assert "not mounted" in assert_one_line_error(proc.returncode, proc.stderr)
    other = mounts.mountpoint("other")
    proc = mounts.mount(dataset.url, other, "--log-file", "/proc/no/such.log", check=False)
    assert "cannot write the mount log" in assert_one_line_error(proc.returncode, proc.stderr)
    for bad in (["--cache-size", "lots"], ["--refresh", "-1"], ["--io-timeout", "0"]):
        proc = mounts.mount(dataset.url, other, *bad, check=False)
        assert_one_line_error(proc.returncode, proc.stderr)
    assert find_mount(other) is None


def test_a_mount_starts_its_daemon_before_its_checks_and_a_failed_check_stops_it(dataset, mounts, tmp_path,
                                                                                  monkeypatch):
    """`commitfs mount` starts the daemon process first (it imports pyfuse3, trio and
    the file system while the command checks its arguments and the repository:
    lifecycle.spawn_daemon); a check that fails stops it, and it exits having
    done nothing; a check that passes hands it its configuration and it mounts."""
    from commitfs.cli import main
    from commitfs.fuse import lifecycle

    spawned = []
    spawn = lifecycle.spawn_daemon

    def recording(mountpoint=None):
        spawned.append(spawn(mountpoint))
        return spawned[-1]
    monkeypatch.setattr(lifecycle, "spawn_daemon", recording)
    mnt = mounts.mountpoint()
    assert main(["-r", dataset.url, "mount", "--cache-dir", str(tmp_path / "c"), "no-such-branch", str(mnt)]) == 1
    assert len(spawned) == 1 and spawned[0].proc.returncode == 0 and find_mount(mnt) is None
    assert main(["-r", dataset.url, "mount", "--cache-dir", str(tmp_path / "c"), "v1", str(mnt)]) == 0
    try:
        assert len(spawned) == 2 and spawned[1].proc.poll() is None and find_mount(mnt) is not None
        assert lookup_daemon_pid(mnt) == spawned[1].proc.pid
        # (named on its command line from the start, for ps and scripts/bench.py)
        with open(f"/proc/{spawned[1].proc.pid}/cmdline", "rb") as f:
            assert str(mnt).encode() in f.read()
        assert (mnt / "fixed" / "big.bin").read_bytes() == (dataset.src / "fixed" / "big.bin").read_bytes()
    finally:
        assert run_commitfs("umount", str(mnt)).returncode == 0


def test_a_mount_daemon_holds_none_of_its_callers_descriptors(dataset, mounts, tmp_path):
    """The daemon `commitfs mount` starts (fuse/spawn.py) keeps none of the command's
    inheritable descriptors: a pipe the command's own caller handed it reads to its end
    once the command exits, though the daemon serves on, and the daemon's open
    descriptors are its own (no pipe of the caller's among them)."""
    mnt = mounts.mountpoint()
    r, w = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-m", "commitfs", "-r", dataset.url, "mount", "--cache-dir",
                               str(tmp_path / "c"), "v1", str(mnt)], pass_fds=(w,), capture_output=True,
                              text=True, timeout=120, env=cli_env())
        os.close(w)
        w = None
        assert proc.returncode == 0, proc.stderr
        pid = lookup_daemon_pid(mnt)
        assert pid is not None and find_mount(mnt) is not None
        os.set_blocking(r, False)
        assert os.read(r, 1) == b""  # every write end is closed: the daemon holds none
        pipe = os.readlink(f"/proc/self/fd/{r}")
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert pipe not in held
        assert (mnt / "fixed" / "big.bin").read_bytes() == (dataset.src / "fixed" / "big.bin").read_bytes()
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
        run_commitfs("umount", str(mnt))


def test_daemon_start_failure_reaches_the_caller(dataset, mounts, tmp_path):
    """Errors found by the daemon itself come back through the readiness pipe."""
    mnt = mounts.mountpoint()
    config = DaemonConfig(repo=dataset.url, mountpoint=str(mnt), cache_dir=str(tmp_path / "c"),
                          log_file=str(tmp_path / "d.log"), commit="ab" * 32)
    with pytest.raises(MountError, match="does not exist"):
        start_daemon(config)
    assert find_mount(mnt) is None


def test_umount_of_a_stale_mount(dataset, mounts):
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    pid = lookup_daemon_pid(mnt)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    with pytest.raises(OSError) as exc:
        os.listdir(mnt)
    assert exc.value.errno == errno.ENOTCONN
    proc = mounts.mount(dataset.url, mnt, check=False)
    assert "stale" in assert_one_line_error(proc.returncode, proc.stderr)
    record = lifecycle._record_path(str(mnt))
    assert record.exists()  # the killed daemon's, left behind
    proc = run_commitfs("umount", str(mnt))
    assert proc.returncode == 0, proc.stderr
    assert find_mount(mnt) is None
    assert os.listdir(mnt) == []
    assert not record.exists()  # removed with the stale mount


def test_a_new_mount_removes_the_records_dead_daemons_left(dataset, mounts, tmp_path):
    """A daemon killed after its mount was detached leaves its record; the next
    mount's daemon removes it (lifecycle.prune_records) and keeps its own."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nobody has now
    ghost = tmp_path / "ghost"
    ghost.mkdir()
    ghost_record = lifecycle._record_path(str(ghost))
    lifecycle.ensure_records_dir()
    ghost_record.write_text(json.dumps({"pid": gone.pid, "mountpoint": lifecycle.canonical(ghost), "log": ""}))
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    assert not ghost_record.exists()
    assert lifecycle.lookup_record(mnt) is not None  # a live daemon's record stays


def test_umount_busy_then_lazy(dataset, mounts):
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    pid = lookup_daemon_pid(mnt)
    f = open(mnt / "fixed" / "big.bin", "rb")
    try:
        proc = run_commitfs("umount", str(mnt))
        assert "busy" in assert_one_line_error(proc.returncode, proc.stderr)
        assert find_mount(mnt) is not None
        proc = run_commitfs("umount", "--lazy", str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert find_mount(mnt) is None
        assert len(f.read()) == 3 << 20  # the open file still reads
    finally:
        f.close()
    assert wait_gone(pid)  # the daemon exits once the last file is closed


def test_sigterm_stops_the_daemon_and_unmounts(dataset, mounts):
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, rev="v1")
    pid = lookup_daemon_pid(mnt)
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert find_mount(mnt) is None
    assert lookup_daemon_pid(mnt) is None


def test_sigterm_mid_random_reads_ends_page_cache_hand_offs_before_the_close(dataset, mounts, tmp_path):
    """Random reads hand verified chunks to the page cache from worker threads; a SIGTERM
    while they run ends those hand-offs while requests are still answered (one may wait
    for a READ of a page it stores), then unmounts: the daemon exits cleanly, without
    the 5 s timeout's warning or an abandoned session, and the mount is gone.  The
    connection the daemon would abort is the mount's own (found without a request)."""
    import random
    import threading

    from commitfs.fuse.lifecycle import fuse_connection

    log = tmp_path / "mount.log"
    mnt = mounts.mountpoint()
    mounts.mount(dataset.url, mnt, "--log-file", str(log), rev="v1")
    assert fuse_connection(mnt) == f"/sys/fs/fuse/connections/{os.stat(mnt).st_dev}"
    pid = lookup_daemon_pid(mnt)
    path = mnt / "fixed" / "big.bin"
    size = path.stat().st_size
    stop = threading.Event()

    def reads():
        rng = random.Random(3)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                while not stop.is_set():
                    os.pread(fd, 4096, rng.randrange(size - 4096))
            finally:
                os.close(fd)
        except OSError:
            pass  # the mount went away under the reader

    readers = [threading.Thread(target=reads) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert find_mount(mnt) is None
    text = log.read_text()
    assert "SIGTERM: stopping" in text and "unmounted" in text
    assert "into the unmount" not in text and "left allocated" not in text  # adapter.end_page_stores


def test_foreground_mount_serves_until_unmounted(dataset, mounts, tmp_path):
    mnt = mounts.mountpoint()
    proc = subprocess.Popen(
        [sys.executable, "-m", "commitfs", "-r", dataset.url, "mount", "--foreground",
         "--cache-dir", str(tmp_path / "cache"), "v1", str(mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        deadline = time.monotonic() + 30
        while lookup_daemon_pid(mnt) != proc.pid:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the foreground mount did not become ready"
            time.sleep(0.1)
        assert describe(mnt) == dataset.picture
        umount = run_commitfs("umount", str(mnt))
        assert umount.returncode == 0, umount.stderr
        assert proc.wait(timeout=30) == 0
        assert b"ready" in proc.stderr.read()  # it logs to its stderr
    finally:
        if proc.poll() is None:
            force_unmount(str(mnt))
            proc.kill()
            proc.wait()


def test_a_daemon_that_dies_before_its_log_leaves_its_traceback_there(dataset, mounts, tmp_path, monkeypatch):
    """A daemon started before its configuration (spawn_daemon) has no log yet: what
    it writes then (here: an import that fails) is copied into the mount's log, and
    its last line ends the caller's one-line error, instead of vanishing."""
    from commitfs.fuse import lifecycle

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyfuse3.py").write_text("raise ImportError('pyfuse3 cannot load here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(broken), os.environ.get("PYTHONPATH", "")]))
    mnt = mounts.mountpoint()
    log_file = tmp_path / "d.log"
    config = DaemonConfig(repo=dataset.url, mountpoint=str(mnt), cache_dir=str(tmp_path / "c"),
                          log_file=str(log_file), commit="ab" * 32)
    pending = lifecycle.spawn_daemon(str(mnt))
    with pytest.raises(MountError, match="exited with status 1 before the mount was ready: "
                                         "ImportError: pyfuse3 cannot load here"):
        pending.start(config)
    assert "Traceback" in log_file.read_text() and find_mount(mnt) is None
