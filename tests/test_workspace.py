"""Writable workspace mounts: every operation through a real mount, status/reset/commit,
persistence across remounts and crashes, an fsx-style randomized comparison with a
plain directory, concurrent commits, faults.

Every mount is made through the ``mounts`` fixture (unmounted at teardown even on
failure)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core_fixtures import assert_one_line_error
from mount_fixtures import run_commitfs
from workspace_fixtures import compare_trees, normalize_modes, picture
from commitfs.ops.browse import lookup_path
from commitfs.ops.checkout import checkout
from commitfs.repo.repository import Repository


def checkout_of(ws, rev: str, dest_name: str):
    dest = ws.tmp / dest_name
    with Repository.open(ws.url) as repo:
        checkout(repo, repo.resolve(rev), dest)
    return dest


def errno_of(fn) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return 0


# --- every operation, against a plain directory ----------------------------------------
def _edits(root):
    """The same edits, applied to the workspace and to a plain directory."""
    f = root / "fixed"
    # create, write at an offset (a hole before it), append, truncate up and down
    with open(root / "new.bin", "wb") as out:
        out.write(b"head")
        out.seek(100_000)
        out.write(b"tail")
    with open(f / "big.bin", "r+b") as out:  # a write into the middle of a large base file
        out.seek(500_000)
        out.write(b"X" * 70_000)
    with open(f / "run.sh", "ab") as out:
        out.write(b"echo appended\n")
    os.truncate(f / "copy-of-big.bin", 1234)
    os.truncate(f / "empty", 10)
    # directories: mkdir, rename across directories, rename over an existing empty one, rmdir
    os.makedirs(root / "made" / "deeper")
    (root / "made" / "deeper" / "x.txt").write_bytes(b"x\n")
    os.rename(f / "n1", root / "made" / "n1-moved")
    os.mkdir(root / "made" / "target")
    os.rename(root / "made" / "deeper", root / "made" / "target")
    os.rmdir(f / "empty-dir")
    # files: rename over an existing file, unlink, symlinks, chmod, utime
    os.rename(f / "run.sh", f / "big.bin")
    os.unlink(f / "copy-of-big.bin")
    os.symlink("made/target/x.txt", root / "link-new")
    os.unlink(f / "link-to-big")
    os.chmod(root / "new.bin", 0o755)
    os.chmod(f / "empty", 0o600)
    os.utime(root / "new.bin", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    # a directory with a Unicode name renamed to the root
    os.rename(f / "données", root / "données-moved")
    fd = os.open(root / "synced", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"synced bytes")
    os.fsync(fd)
    os.close(fd)


def test_every_operation_matches_a_plain_directory(ws):
    mnt = ws.mount()
    ref = ws.reference()
    _edits(ref)
    _edits(mnt)
    compare_trees(mnt, ref)
    assert os.stat(mnt / "new.bin").st_mtime_ns == 1_500_000_000_000_000_000
    # What is not supported fails with a clear errno.
    assert errno_of(lambda: os.link(mnt / "made", mnt / "hard")) == errno.EPERM  # a directory, as on ext4
    assert errno_of(lambda: os.setxattr(mnt / "new.bin", "user.x", b"1")) == errno.EOPNOTSUPP
    # Errors of a real file system.
    assert errno_of(lambda: os.rmdir(mnt / "made")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rename(mnt / "made", mnt / "made" / "target" / "sub")) == errno.EINVAL
    assert errno_of(lambda: os.rename(mnt / "new.bin", mnt / "made")) == errno.EISDIR
    assert errno_of(lambda: os.rename(mnt / "made", mnt / "new.bin")) == errno.ENOTDIR
    assert errno_of(lambda: os.mkdir(mnt / "made")) == errno.EEXIST
    assert errno_of(lambda: os.unlink(mnt / "made")) in (errno.EISDIR, errno.EPERM)
    assert errno_of(lambda: os.unlink(mnt / "nope")) == errno.ENOENT
    compare_trees(mnt, ref)


# --- status, commit, reset ------------------------------------------------------------
def test_status_commit_and_reset(ws):
    mnt = ws.mount()
    (mnt / "added.txt").write_bytes(b"a" * 10)
    with open(mnt / "fixed" / "run.sh", "ab") as f:
        f.write(b"echo 2\n")
    os.unlink(mnt / "fixed" / "big.bin")
    os.rename(mnt / "fixed" / "n1", mnt / "n1-moved")
    proc = ws.cli("status", str(mnt), "--json")
    assert proc.returncode == 0, proc.stderr
    got = {(c["status"], c["path"], c["size"]) for c in json.loads(proc.stdout)["changes"]}
    assert got == {("added", "added.txt", 10), ("modified", "fixed/run.sh", 25),
                   ("deleted", "fixed/big.bin", 1 << 20), ("deleted", "fixed/n1", len("feuille ✓\n".encode())),
                   ("added", "n1-moved", len("feuille ✓\n".encode()))}
    text = ws.cli("status", str(mnt)).stdout
    assert "added" in text and "fixed/big.bin" in text

    # Reset of one path brings back the base version; reset of a new file removes it.
    ws.cli("reset", str(mnt), "fixed/run.sh", "added.txt").check_returncode()
    assert (mnt / "fixed" / "run.sh").read_bytes() == (ws.src / "fixed" / "run.sh").read_bytes()
    assert not (mnt / "added.txt").exists()
    ws.cli("reset", str(mnt), "fixed/big.bin").check_returncode()
    assert (mnt / "fixed" / "big.bin").read_bytes() == (ws.src / "fixed" / "big.bin").read_bytes()

    # Commit: the branch gets exactly the workspace; the workspace has nothing pending.
    (mnt / "added.txt").write_bytes(b"again\n")
    proc = ws.cli("commit", str(mnt), "-m", "from the workspace", "--meta", "k=v", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["created"] and out["parent"] == ws.base.hex() and not out["rebased"]
    head = ws.head()
    assert head.hex() == out["id"]
    with Repository.open(ws.url) as repo:
        c = repo.load_commit(head)
        assert c.message == "from the workspace" and c.metadata == {"k": "v"}
        # Untouched subtrees keep their ids; the moved directory is the same tree.
        for path in ("fixed/données", "fixed/empty-dir"):
            assert lookup_path(repo, head, path).id == lookup_path(repo, ws.base, path).id
        assert lookup_path(repo, head, "n1-moved").id == lookup_path(repo, ws.base, "fixed/n1").id
    co = checkout_of(ws, "main", "co1")
    compare_trees(co, mnt)
    assert json.loads(ws.cli("status", str(mnt), "--json").stdout)["changes"] == []
    assert os.getxattr(mnt, "user.commitfs.commit") == head.hex().encode()
    # Nothing to commit: exit 0, the head's id.
    proc = ws.cli("commit", str(mnt), "-m", "nothing")
    assert proc.returncode == 0 and proc.stdout.strip() == head.hex()

    # Reset of everything.
    (mnt / "junk").write_bytes(b"junk")
    os.unlink(mnt / "n1-moved" / "n2" / "n3" / "n4" / "leaf.txt")
    ws.cli("reset", str(mnt)).check_returncode()
    compare_trees(mnt, co)


def test_verbs_on_what_is_not_a_workspace(ws, tmp_path):
    proc = ws.cli("commit", str(tmp_path / "missing"), "-m", "x")
    assert "neither a writable workspace mount nor a directory" in assert_one_line_error(
        proc.returncode, proc.stderr)
    (tmp_path / "file").write_bytes(b"x")
    proc = ws.cli("-r", ws.url, "commit", str(tmp_path / "file"), "-m", "x")
    assert "is not a directory" in assert_one_line_error(proc.returncode, proc.stderr)
    proc = ws.cli("status", str(tmp_path))
    assert "not a writable workspace mount" in assert_one_line_error(proc.returncode, proc.stderr)
    mnt = ws.mounts.mountpoint("ro")
    ws.mounts.mount(ws.url, mnt, rev="main")
    assert errno_of(lambda: (mnt / "x").write_bytes(b"x")) == errno.EROFS
    proc = ws.cli("reset", str(mnt))
    assert "not a writable workspace mount" in assert_one_line_error(proc.returncode, proc.stderr)
    proc = run_commitfs("-r", ws.url, "mount", "--writable", "v9", str(ws.mounts.mountpoint("bad")))
    assert "not a branch" in assert_one_line_error(proc.returncode, proc.stderr)


# --- persistence -------------------------------------------------------------------------
def test_edits_survive_unmount_and_a_killed_daemon(ws):
    mnt = ws.mount()
    ref = ws.reference()
    _edits(mnt)
    _edits(ref)
    ws.umount(mnt)
    ws.mount()
    compare_trees(mnt, ref)
    # fsync'd edits survive SIGKILL of the daemon.
    fd = os.open(mnt / "after-remount", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.close(fd)
    os.rename(mnt / "made", mnt / "made-renamed")
    dfd = os.open(mnt, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    (ref / "after-remount").write_bytes(b"durable")
    os.rename(ref / "made", ref / "made-renamed")
    ws.kill(mnt)
    ws.mount()
    compare_trees(mnt, ref)


def test_a_second_mount_of_a_mounted_workspace_is_refused_in_one_line(ws):
    """Two daemons on one overlay would each keep their own tree and lose the other's
    edits: the overlay is locked while open, a second mount gets a one-line error, and
    the first one goes on; once it is gone (even killed) the workspace mounts again."""
    mnt = ws.mount()
    (mnt / "kept").write_bytes(b"first mount")
    second = ws.mounts.mountpoint("second")
    proc = ws.mounts.mount(ws.url, second, "--writable", "--workspace", str(ws.tmp / "ws"), rev="main",
                           check=False)
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "in use by another commitfs" in line and str(ws.tmp / "ws") in line, line
    assert (mnt / "kept").read_bytes() == b"first mount"
    ws.kill(mnt)  # the kernel drops the lock with the process
    mnt = ws.mount()
    assert (mnt / "kept").read_bytes() == b"first mount"


def test_daemon_killed_during_writes(ws):
    """A writer fsyncs every record; whatever it fsync'd is there after SIGKILL + remount."""
    mnt = ws.mount()
    script = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)\n"
        "i = 0\n"
        "while True:\n"
        "    os.write(fd, b'%08d' % i + b'x' * 4088)\n"
        "    os.fsync(fd)\n"
        "    print(i, flush=True)\n"
        "    i += 1\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(mnt / "log.bin")], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    acked = -1
    try:
        while acked < 50:
            acked = int(writer.stdout.readline())
        ws.kill(mnt)
    finally:
        writer.kill()
        for line in writer.communicate()[0].split():
            acked = max(acked, int(line))
    ws.mount()
    data = (mnt / "log.bin").read_bytes()
    records = len(data) // 4096
    assert records >= acked + 1
    for i in range(records):
        assert data[i * 4096:i * 4096 + 8] == b"%08d" % i


def _daemon_reads(mnt) -> int:
    """How many read system calls the mount's daemon has made (one per FUSE request it takes)."""
    from commitfs.fuse.lifecycle import lookup_daemon_pid

    with open(f"/proc/{lookup_daemon_pid(mnt)}/io") as f:
        return int(next(line for line in f if line.startswith("syscr:")).split()[1])


def test_a_write_only_descriptor_writes_direct_and_readers_see_its_bytes(ws):
    """A write-only open of a workspace file is direct (FOPEN_DIRECT_IO): each write is
    one request to the daemon, not two (the kernel asks no security.capability first,
    and copies the bytes once), and a descriptor reading the file meanwhile sees what
    it wrote, through read and through a mapping; an open for reading and writing
    stays cached (its writes still cost the kernel's extra request)."""
    mnt = ws.mount()
    n = 32
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned: a direct write of it is one request
    buf.write(os.urandom(1 << 20))
    data = bytes(buf)
    for name, flags, direct in (("wronly.bin", os.O_WRONLY, True), ("rdwr.bin", os.O_RDWR, False)):
        p = mnt / name
        p.write_bytes(b"")
        r = os.open(p, os.O_RDONLY)
        try:
            w = os.open(p, flags)
            try:
                before = _daemon_reads(mnt)
                for i in range(n):
                    assert os.pwrite(w, buf, i << 20) == len(data)
                requests = _daemon_reads(mnt) - before
                assert (requests < 1.5 * n) == direct, (name, requests)
                assert os.pread(r, len(data), (n - 1) << 20) == data
                with mmap.mmap(r, len(data), access=mmap.ACCESS_READ) as m:
                    assert m[:4096] == data[:4096]
                    os.pwrite(w, b"new bytes", 10)
                    assert m[:20] == data[:10] + b"new bytes" + data[19:20]  # the mapping sees the write
            finally:
                os.close(w)
        finally:
            os.close(r)
        with open(p, "rb") as f:
            assert f.read(1 << 20) == data[:10] + b"new bytes" + data[19:]
            assert os.fstat(f.fileno()).st_size == n << 20
    buf.close()


def _writes_in_c(ws) -> int:
    """The daemon's count of WRITEs pwritten in C (logged at unmount: one mount per test)."""
    counts = [int(line.rsplit(": ", 1)[1]) for log in (ws.mounts.cache_dir / "logs").glob("mount-*.log")
              for line in log.read_text().splitlines() if "WRITEs pwritten in C: " in line]
    assert len(counts) == 1, counts
    return counts[0]


@pytest.mark.timeout(180)
def test_writes_answered_in_c_keep_sizes_times_and_commits_exact(ws):
    """WRITEs are pwritten into the overlay by the C module (fuse/fastpath.py, engage_writes),
    the workspace told of each by a plain call: a new file written direct in unaligned
    1 MiB buffers (two requests each), an in-place edit and an extension of a committed
    file through a cached read-write descriptor, appends.  After each write stat shows the
    plain directory's size and an mtime that moved; the commit is the plain directory."""
    mnt = ws.mount()
    ref = ws.reference()
    rng = random.Random(18)
    big = max((p for p in ws.src.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: p.stat().st_size)
    rel = big.relative_to(ws.src)
    assert big.stat().st_size >= 1 << 20
    blocks = [rng.randbytes(1 << 20) for _ in range(3)] + [rng.randbytes(777)]
    steps = [("new.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, None, b) for b in blocks]
    steps += [(str(rel), os.O_RDWR, off, rng.randbytes(n)) for off, n in ((1000, 5000), (300_000, 1 << 20))]
    steps += [(str(rel), os.O_WRONLY | os.O_APPEND, None, rng.randbytes(4096)) for _ in range(3)]
    fds: dict[tuple[Path, str, int], int] = {}
    try:
        for name, flags, off, data in steps:
            sizes, mtimes = [], []
            for root in (mnt, ref):
                key = (root, name, flags)
                if key not in fds:
                    fds[key] = os.open(root / name, flags, 0o644)
                fd = fds[key]
                before = os.stat(root / name).st_mtime_ns
                time.sleep(0.002)
                n = os.pwrite(fd, data, off) if off is not None else os.write(fd, data)
                assert n == len(data)
                st = os.stat(root / name)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime_ns > before)
            assert sizes[0] == sizes[1] and mtimes == [True, True], (name, sizes, mtimes)
    finally:
        for fd in fds.values():
            os.close(fd)
    compare_trees(mnt, ref)
    ws.cli("commit", str(mnt), "-m", "written in C").check_returncode()
    normalize_modes(ref)
    compare_trees(checkout_of(ws, "main", "co"), ref)
    ws.umount(mnt)
    assert _writes_in_c(ws) >= len(steps)


def test_full_overlay_disk_is_enospc_and_loses_nothing(ws, small_tmpfs):
    mnt = ws.mounts.mountpoint()
    try:
        _full_disk(ws, mnt, small_tmpfs)
    finally:  # before the tmpfs goes
        ws.mounts.cleanup()


def _full_disk(ws, mnt, small_tmpfs):
    ws.mounts.mount(ws.url, mnt, "--writable", "--workspace", str(small_tmpfs / "ws"), rev="main")
    (mnt / "saved.txt").write_bytes(b"saved\n")
    with pytest.raises(OSError) as exc:
        with open(mnt / "huge.bin", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(64 * 1024))
                f.flush()
    assert exc.value.errno == errno.ENOSPC
    assert (mnt / "saved.txt").read_bytes() == b"saved\n"
    os.unlink(mnt / "huge.bin")
    (mnt / "after.txt").write_bytes(b"space again\n")
    ws.umount(mnt)
    ws.mounts.mount(ws.url, mnt, "--writable", "--workspace", str(small_tmpfs / "ws"), rev="main")
    assert (mnt / "saved.txt").read_bytes() == b"saved\n"
    assert (mnt / "after.txt").read_bytes() == b"space again\n"


# --- crash during commit ----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_daemon_killed_during_commit(ws, seed):
    rng = random.Random(seed)
    mnt = ws.mount()
    ref = ws.reference()
    for root in (mnt, ref):
        os.makedirs(root / "many", exist_ok=True)
        for i in range(60):
            (root / "many" / f"f{i:03d}").write_bytes(random.Random(i).randbytes(40_000))
        os.unlink(root / "fixed" / "run.sh")
    proc = subprocess.Popen([sys.executable, "-m", "commitfs", "commit", str(mnt), "-m", "killed"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(rng.uniform(0.0, 0.6))
    ws.kill(mnt)
    proc.communicate(timeout=60)
    ws.mount()
    head = ws.head()
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)["changes"]
    if head == ws.base:
        assert status, "the branch did not move, so the edits must still be pending"
        compare_trees(mnt, ref)
    else:
        assert status == [], "the branch moved, so nothing may be pending"
        with Repository.open(ws.url) as repo:
            assert repo.load_commit(head).parents == (ws.base,)
        compare_trees(checkout_of(ws, "main", "co"), ref, modes=False)
        compare_trees(mnt, ref, modes=False)
    # Either way a commit now leaves the branch equal to the reference.
    ws.cli("commit", str(mnt), "-m", "again").check_returncode()
    compare_trees(checkout_of(ws, "main", "co2"), ref, modes=False)


# --- concurrent commits -------------------------------------------------------------------
def test_concurrent_commits_from_two_workspaces(ws):
    a = ws.mount("a", workspace="wa")
    b = ws.mount("b", workspace="wb")
    (a / "from-a.txt").write_bytes(b"a\n")
    (b / "fixed" / "from-b.txt").write_bytes(b"b\n")
    procs = [subprocess.Popen([sys.executable, "-m", "commitfs", "commit", str(m), "-m", f"commit {m.name}",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in (a, b)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o[0]) for o in outs]
    assert sorted(r["rebased"] for r in results) == [False, True]
    co = checkout_of(ws, "main", "co")
    assert (co / "from-a.txt").read_bytes() == b"a\n"
    assert (co / "fixed" / "from-b.txt").read_bytes() == b"b\n"
    # The rebased workspace shows the other's change too.
    rebased = a if results[0]["rebased"] else b
    compare_trees(rebased, co)

    # Overlapping paths: the second commit fails, listing the paths, and changes nothing.
    fresh = a if rebased is b else b  # its base is now behind the head
    (rebased / "clash.txt").write_bytes(b"first\n")
    ws.cli("commit", str(rebased), "-m", "first").check_returncode()
    head = ws.head()
    (fresh / "clash.txt").write_bytes(b"second\n")
    before = picture(fresh)
    proc = ws.cli("commit", str(fresh), "-m", "second")
    msg = assert_one_line_error(proc.returncode, proc.stderr)
    assert "clash.txt" in msg and "changed the same paths" in msg
    assert ws.head() == head
    assert picture(fresh) == before
    assert json.loads(ws.cli("status", str(fresh), "--json").stdout)["changes"]


# --- fsx: random operations against a plain directory -----------------------------------------
class Fsx:
    """Random file-system operations applied to two roots; outcomes must agree."""

    def __init__(self, rng: random.Random, roots):
        self.rng = rng
        self.roots = roots
        self.log: list[str] = []

    def _paths(self, kind=None):
        root = self.roots[1]  # the plain directory
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                k = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
                if kind is None or k == kind:
                    out.append(os.path.relpath(full, root))
        return sorted(out)

    def _pick(self, kind=None, new_ok=False):
        paths = self._paths(kind)
        if new_ok and (not paths or self.rng.random() < 0.3):
            dirs = [""] + self._paths("dir")
            return os.path.join(self.rng.choice(dirs), f"n{self.rng.randrange(10_000)}")
        return self.rng.choice(paths) if paths else None

    def both(self, what: str, fn) -> None:
        results = []
        for root in self.roots:
            try:
                results.append(("ok", fn(root)))
            except OSError as exc:
                results.append(("err", exc.errno))
        self.log.append(what)
        assert results[0] == results[1], (what, results, self.log[-20:])

    def step(self) -> None:
        r = self.rng
        op = r.choice(["create", "write", "append", "truncate", "rename", "rename", "unlink", "mkdir",
                       "rmdir", "symlink", "chmod", "utime", "read", "open-unlink"])
        if op == "create":
            p, data = self._pick(new_ok=True), r.randbytes(r.choice([0, 10, 5000, 100_000]))

            def f(root):
                with open(root / p, "wb") as out:
                    out.write(data)
            self.both(f"create {p} {len(data)}", f)
        elif op in ("write", "append"):
            p = self._pick("file")
            if p is None:
                return
            off, data = r.randrange(300_000), r.randbytes(r.choice([1, 100, 4096, 70_000]))

            def f(root):
                with open(root / p, "ab" if op == "append" else "r+b") as out:
                    if op == "write":
                        out.seek(off)
                    out.write(data)
            self.both(f"{op} {p} {off} {len(data)}", f)
        elif op == "truncate":
            p, size = self._pick("file"), r.choice([0, 1, 1000, 70_000, 400_000])
            if p:
                self.both(f"truncate {p} {size}", lambda root: os.truncate(root / p, size))
        elif op == "rename":
            src = self._pick()
            dst = self._pick(new_ok=True)
            if src and dst:
                self.both(f"rename {src} {dst}", lambda root: os.rename(root / src, root / dst))
        elif op == "unlink":
            p = self._pick(r.choice(["file", "link"]))
            if p:
                self.both(f"unlink {p}", lambda root: os.unlink(root / p))
        elif op == "mkdir":
            p = self._pick(new_ok=True)
            self.both(f"mkdir {p}", lambda root: os.mkdir(root / p))
        elif op == "rmdir":
            p = self._pick("dir")
            if p:
                self.both(f"rmdir {p}", lambda root: os.rmdir(root / p))
        elif op == "symlink":
            p, target = self._pick(new_ok=True), r.choice(["a", "../x", "fixed/big.bin", "日本"])
            self.both(f"symlink {p}", lambda root: os.symlink(target, root / p))
        elif op == "chmod":
            p, mode = self._pick("file"), r.choice([0o644, 0o755, 0o600, 0o700])
            if p:
                self.both(f"chmod {p} {mode:o}", lambda root: os.chmod(root / p, mode))
        elif op == "utime":
            p, t = self._pick("file"), r.randrange(10**18)
            if p:
                self.both(f"utime {p}", lambda root: (os.utime(root / p, ns=(t, t)), os.stat(root / p).st_mtime_ns)[1])
        elif op == "read":
            p = self._pick("file")
            if p:
                off, n = r.randrange(200_000), r.choice([1, 4096, 200_000])

                def f(root):
                    with open(root / p, "rb") as fh:
                        fh.seek(off)
                        return fh.read(n)
                self.both(f"read {p} {off} {n}", f)
        elif op == "open-unlink":
            p = self._pick("file")
            if p:
                def f(root):
                    with open(root / p, "rb") as fh:
                        os.unlink(root / p)
                        return fh.read()
                self.both(f"open-unlink {p}", f)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2])
def test_fsx_random_operations_match_a_plain_directory(ws, seed):
    mnt = ws.mount()
    ref = ws.reference()
    fsx = Fsx(random.Random(seed), [mnt, ref])
    for batch in range(15):
        for _ in range(100):
            fsx.step()
        compare_trees(mnt, ref)
    # Commit, remount, compare: the branch is the plain directory (modes as a commit records them).
    ws.cli("commit", str(mnt), "-m", f"fsx {seed}").check_returncode()
    normalize_modes(ref)
    compare_trees(checkout_of(ws, "main", "co"), ref)
    ws.umount(mnt)
    ws.mount()
    compare_trees(mnt, ref)
    for _ in range(300):  # and carry on from the new commit
        fsx.step()
    compare_trees(mnt, ref)
    ws.umount(mnt)
    ws.mount()
    compare_trees(mnt, ref)
