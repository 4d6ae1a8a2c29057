"""fsx and fsstress equivalents on a real workspace mount (tests/fsxlike.py), with the
commit, a checkout and a remount compared after (docs/SEMANTICS.md, "Writable workspaces").

Each run is bounded (a few hundred operations, a few seconds of stress); the seeds
are parameters and in every failure message.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fsxlike import Fsx
from workspace_fixtures import picture

pytestmark = pytest.mark.timeout(300)

FSX_OPS = int(os.environ.get("FSX_OPS", "300"))
STRESS_SECONDS = float(os.environ.get("STRESS_SECONDS", "6"))
STRESS_PROCS = 3


def _checkout(ws, dest: Path) -> Path:
    proc = ws.cli("-r", ws.url, "checkout", "main", str(dest))
    assert proc.returncode == 0, proc.stderr
    return dest


def _commit(ws, mnt: Path, message: str) -> None:
    proc = ws.cli("commit", str(mnt), "-m", message)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("seed,which", [(1, "fixed/big.bin"), (2, "new.bin"), (3, "fixed/big.bin")])
def test_fsx_with_mmap_on_one_file_then_commit_checkout_and_remount(ws, tmp_path, seed, which):
    """fsx: writes, truncates, reads, mmap reads, mmap writes + msync, fsync and reopen
    on one file (a committed 1 MiB file: chunk-level copy-on-write; or a new one),
    compared with a shadow copy on local disk after every operation; then the commit,
    a checkout of it and a remount must hold the same bytes."""
    mnt = ws.mount()
    shadow = tmp_path / "shadow"
    if which == "new.bin":
        (mnt / which).write_bytes(b"")
        shadow.write_bytes(b"")
    else:
        shutil.copyfile(ws.src / which, shadow)
    fsx = Fsx(mnt / which, shadow, seed)
    try:
        for _ in range(FSX_OPS):
            fsx.step()
        fsx.check()
    finally:
        fsx.close()
    want = shadow.read_bytes()
    _commit(ws, mnt, f"fsx {seed}")
    co = _checkout(ws, tmp_path / "co")
    assert (co / which).read_bytes() == want, f"the checkout differs; {fsx.where()}"
    assert (mnt / which).read_bytes() == want, f"the mount after the commit differs; {fsx.where()}"
    ws.umount(mnt)
    mnt = ws.mount()
    assert (mnt / which).read_bytes() == want, f"the mount after a remount differs; {fsx.where()}"
    # And once more from the new commit, then a remount without a commit between.
    fsx = Fsx(mnt / which, shadow, seed + 1000)
    try:
        for _ in range(FSX_OPS // 4):
            fsx.step()
        fsx.check()
    finally:
        fsx.close()
    ws.umount(mnt)
    mnt = ws.mount()
    assert (mnt / which).read_bytes() == shadow.read_bytes(), f"after the second remount; {fsx.where()}"


def _view(root: Path) -> dict[str, tuple]:
    """What a commit of ``root`` records: kinds, bytes, targets, a file's executable bit
    (not a directory's mode)."""
    return {p: ("dir",) if v[0] == "dir" else v for p, v in picture(root, modes=False).items()}


def _regular_tree(root: Path) -> None:
    """Only files and symlinks besides directories (stress makes no special file, which a commit would skip)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode), name


@pytest.mark.parametrize("seed", [11, 12])
def test_fsstress_processes_then_commit_checkout_and_remount(ws, tmp_path, seed):
    """fsstress: a few processes race random namespace operations (create, mkdir,
    rename, unlink, rmdir, link, symlink, write, truncate, chmod) over one tree in a
    workspace for a few seconds, with no error a race does not explain; then the
    commit's checkout is what the mount shows, and so is the mount after a remount."""
    mnt = ws.mount()
    root = mnt / "stress"
    root.mkdir()
    (root / "seed.txt").write_bytes(b"seed\n")
    script = Path(__file__).with_name("fsxlike.py")
    procs = [subprocess.Popen([sys.executable, str(script), "stress", str(root), str(seed * 10 + i),
                               str(STRESS_SECONDS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(STRESS_PROCS)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=STRESS_SECONDS + 120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert sum(int(o.split(": ")[1].split()[0]) for o in outs if ": " in o) > 100, outs
    _regular_tree(root)
    seen = _view(mnt)
    _commit(ws, mnt, f"fsstress {seed}")
    co = _checkout(ws, tmp_path / "co")
    assert sorted(_view(co)) == sorted(seen), f"seed {seed}: the checkout's paths differ"
    assert _view(co) == seen, f"seed {seed}: the checkout differs from what the mount showed"
    assert _view(mnt) == seen, f"seed {seed}: the mount changed with the commit"
    ws.umount(mnt)
    mnt = ws.mount()
    assert _view(mnt) == seen, f"seed {seed}: the mount after a remount differs"


def test_o_trunc_on_a_mount_truncates_in_any_access_mode_as_a_plain_directory(ws, tmp_path):
    """The kernel passes O_TRUNC to OPEN (atomic_o_trunc): O_RDONLY|O_TRUNC truncates a
    workspace file as it does a plain one (test_workspace_vfs.py has the core's half)."""
    mnt = ws.mount()
    plain = tmp_path / "plain"
    plain.mkdir()
    for root in (mnt, plain):
        (root / "f").write_bytes(b"some bytes")
        os.close(os.open(root / "f", os.O_RDONLY | os.O_TRUNC))
    assert (mnt / "f").read_bytes() == (plain / "f").read_bytes() == b""
    os.close(os.open(mnt / "fixed" / "run.sh", os.O_RDONLY | os.O_TRUNC))  # a committed file
    assert (mnt / "fixed" / "run.sh").read_bytes() == b""
