"""fsx- and fsstress-equivalents for a real workspace mount (xfstests cannot be fetched here).

``Fsx(path, shadow, seed)``: one file, random operations in the manner of
fsx: write, truncate (up and down), read, mmap read, mmap write with msync,
fsync, close and reopen; each applied to the file on the mount and to a
shadow copy on local disk, and the file compared with its shadow after every
operation (the range the operation touched and the size; the whole file
every ``full_every`` operations).  The seed and the last operations are in
every failure message.

``stress(root, seed, seconds)``: one fsstress process: random namespace
operations (create, mkdir, rename, unlink, rmdir, link, symlink, write,
truncate, chmod) for ``seconds`` in a small shared tree, where other
processes race with it.  Errors a race explains (ENOENT, EEXIST, ENOTEMPTY,
ENOTDIR, EISDIR, EINVAL for a directory moved into its own subtree, EXDEV...)
are expected; any other one (EIO above all) is printed and makes the
process exit 1.  Run as ``python fsxlike.py stress ROOT SEED SECONDS``.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import sys
import time

PAGE = mmap.PAGESIZE


class Fsx:
    def __init__(self, path, shadow, seed: int, max_size: int = 2 << 20, full_every: int = 25):
        self.path, self.shadow = str(path), str(shadow)
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.full_every = full_every
        self.log: list[str] = []
        self.ops = 0
        self.fd = os.open(self.path, os.O_RDWR)
        self.sfd = os.open(self.shadow, os.O_RDWR)

    def close(self) -> None:
        for fd in (self.fd, self.sfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.sfd = None

    def where(self) -> str:
        return f"fsx seed {self.seed}, op {self.ops}; the last ones:\n  " + "\n  ".join(self.log[-20:])

    def size(self) -> int:
        return os.fstat(self.sfd).st_size

    def check(self, off: int = 0, length: int | None = None) -> None:
        size = self.size()
        got = os.fstat(self.fd).st_size
        assert got == size, f"size {got}, the shadow's {size}; {self.where()}"
        if length is None:
            off, length = 0, size
        want = os.pread(self.sfd, length, off)
        have = b""
        while len(have) < len(want):  # a FUSE read may return less than asked
            b = os.pread(self.fd, len(want) - len(have), off + len(have))
            if not b:
                break
            have += b
        if have != want:
            bad = next(i for i in range(min(len(have), len(want)) + 1)
                       if i >= len(have) or i >= len(want) or have[i] != want[i])
            raise AssertionError(f"bytes differ at offset {off + bad} (read {len(have)} of {len(want)} "
                                 f"at {off}); {self.where()}")

    def step(self) -> None:
        r = self.rng
        self.ops += 1
        size = self.size()
        op = r.choices(["write", "truncate", "read", "mapread", "mapwrite", "fsync", "reopen"],
                       weights=[10, 3, 5, 4, 4, 1, 1])[0]
        off = r.randrange(self.max_size) if r.random() < 0.7 or not size else r.randrange(size)
        n = r.choice([1, 7, 512, 4096, 65536, 200_000]) if r.random() < 0.9 else r.randrange(1, 300_000)
        if op == "write":
            data = r.randbytes(min(n, self.max_size - off) or 1)
            self.log.append(f"write {off} {len(data)}")
            for fd in (self.fd, self.sfd):
                assert os.pwrite(fd, data, off) == len(data)
            self.check(max(0, off - 16), len(data) + 32)
        elif op == "truncate":
            new = r.choice([0, r.randrange(self.max_size), size // 2, size + r.randrange(100_000)])
            self.log.append(f"truncate {size} -> {new}")
            for fd in (self.fd, self.sfd):
                os.ftruncate(fd, new)
            self.check(max(0, min(size, new) - 4096), 8192)
        elif op == "read":
            self.log.append(f"read {off} {n}")
            self.check(off, n)
        elif op in ("mapread", "mapwrite"):
            if size == 0:
                return
            off = r.randrange(size)
            n = min(n, size - off)
            start = off - off % PAGE  # mmap offsets are page-aligned
            length = off + n - start
            self.log.append(f"{op} {off} {n}")
            if op == "mapread":
                with mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=start) as m:
                    got = m[off - start:off - start + n]
                assert got == os.pread(self.sfd, n, off), f"mmap read at {off}+{n} differs; {self.where()}"
            else:
                data = r.randbytes(n)
                with mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=start) as m:
                    m[off - start:off - start + n] = data
                    m.flush()  # msync(MS_SYNC): the dirty pages are written back through the mount
                os.pwrite(self.sfd, data, off)
                self.check(max(0, off - 16), n + 32)
        elif op == "fsync":
            self.log.append("fsync")
            os.fsync(self.fd)
        else:
            self.log.append("close and reopen")
            os.close(self.fd)
            self.fd = None
            self.fd = os.open(self.path, os.O_RDWR)
            self.check(max(0, off - 4096), 65536)
        if self.ops % self.full_every == 0:
            self.check()


# --- fsstress ---------------------------------------------------------------------------
#: Errors two processes racing over one tree explain.
RACE_ERRORS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EINVAL,
               errno.EXDEV, errno.EPERM, errno.ENAMETOOLONG,
               errno.ELOOP}  # the symlinks it makes can point at themselves ("a" -> "a")
NAMES = ["a", "b", "c", "d", "e", "f"]


def _paths(root: str, depth: int = 3) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel != "." and rel.count("/") >= depth:
            dirnames[:] = []
        for name in dirnames + filenames:
            out.append(os.path.join(dirpath, name))
    return out


def stress(root: str, seed: int, seconds: float) -> int:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    done = 0
    failures = []
    while time.monotonic() < deadline:
        paths = _paths(root) or [root]
        p = rng.choice(paths)
        d = rng.choice([root] + [q for q in paths if os.path.isdir(q) and not os.path.islink(q)])
        new = os.path.join(d, rng.choice(NAMES))
        op = rng.choice(["create", "write", "write", "truncate", "mkdir", "rename", "rename", "unlink", "rmdir",
                         "link", "symlink", "chmod", "read"])
        try:
            if op == "create":
                with open(new, "xb") as f:
                    f.write(rng.randbytes(rng.choice([0, 10, 5000, 70_000])))
            elif op == "write":
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.pwrite(fd, rng.randbytes(rng.choice([1, 4096, 50_000])), rng.randrange(200_000))
                finally:
                    os.close(fd)
            elif op == "truncate":
                os.truncate(p, rng.randrange(100_000))
            elif op == "mkdir":
                os.mkdir(new)
            elif op == "rename":
                os.rename(p, new)
            elif op == "unlink":
                os.unlink(p)
            elif op == "rmdir":
                os.rmdir(p)
            elif op == "link":
                os.link(p, new, follow_symlinks=False)
            elif op == "symlink":
                os.symlink(rng.choice(["a", "../b", "x/y"]), new)
            elif op == "chmod":
                os.chmod(p, rng.choice([0o644, 0o755, 0o600]))
            elif op == "read":
                with open(p, "rb") as f:
                    f.read()
        except OSError as exc:
            if exc.errno not in RACE_ERRORS:
                failures.append(f"{op} {p} {new}: {exc!r}")
        done += 1
    print(f"stress seed {seed}: {done} operations", flush=True)
    for f in failures:
        print(f"stress seed {seed}: unexpected {f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1] == "stress":
        sys.exit(stress(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    raise SystemExit(f"unknown command {sys.argv[1]}")
