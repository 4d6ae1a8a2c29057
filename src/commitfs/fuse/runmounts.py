"""The input mounts of one ``commitfs run``: made by ``commitfs mount`` subprocesses.

Each mount runs in its own session, so a Ctrl-C on the terminal reaches the
command but not the mounts.  ``cleanup`` is the unmount ladder: a plain
unmount, then a lazy one (a straggler of the command may hold a file), then
``fusermount3 -u -z``; the directories are removed after.  ops/run.py drives
this (through the small interface it declares) without importing fuse/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from commitfs.errors import MountError
from commitfs.fuse import lifecycle

# Seconds a `commitfs mount` may take to report its mount ready.
MOUNT_TIMEOUT = 120.0


def _mounted(path: str) -> bool:
    """Whether ``path`` is a mount point (also a dead FUSE mount, which stat cannot tell)."""
    return lifecycle.find_mount(path) is not None


class Mounts:
    """Input mounts of one run, made by ``commitfs mount`` subprocesses."""

    def __init__(self, endpoint_url: str | None = None):
        self.endpoint_url = endpoint_url
        try:
            self.base = tempfile.mkdtemp(prefix="commitfs-run-")
        except OSError as exc:
            raise MountError(f"cannot create a directory for the input mounts in {tempfile.gettempdir()}: "
                             f"{exc.strerror or exc}") from None
        self.points: list[str] = []

    def mount(self, url: str, commit: bytes, name: str, shown: str, record_reads: str | None = None) -> str:
        """Mount ``commit`` of ``url`` read-only; return the mount point.

        ``record_reads``: a file the daemon appends the files read to (see
        vfs/readlog.py)."""
        point = os.path.join(self.base, name or commit.hex()[:12])
        os.mkdir(point)
        self.points.append(point)
        cmd = [sys.executable, "-m", "commitfs", "-r", url]
        if self.endpoint_url:
            cmd += ["--endpoint-url", self.endpoint_url]
        cmd += ["mount", commit.hex(), point]
        if record_reads:
            cmd += ["--record-reads", record_reads]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True, timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise MountError(f"mounting input {name} ({shown}) took over {MOUNT_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            detail = lines[-1].removeprefix("commitfs: ") if lines else f"exit code {proc.returncode}"
            raise MountError(f"cannot mount input {name} ({shown}): {detail}")
        if not _mounted(point):
            raise MountError(f"cannot mount input {name}: `commitfs mount` succeeded but {point} is not mounted")
        return point

    def cleanup(self) -> list[str]:
        """Unmount everything (lazily if busy) and remove the directories; return problems.

        The caller keeps signals from cutting it short (ops.run.DeferredSignals)."""
        problems = []
        for point in reversed(self.points):
            if _mounted(point):
                problems.extend(self._unmount(point))
            try:
                os.rmdir(point)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cannot remove mount directory {point}: {exc.strerror}")
        self.points.clear()
        try:
            os.rmdir(self.base)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove {self.base}: {exc.strerror}")
        return problems

    def _unmount(self, point: str) -> list[str]:
        """Unmount; if busy (a straggler of the command holds a file), detach lazily."""
        errors = []
        for lazy in (False, True):
            try:
                lifecycle.unmount(point, lazy=lazy)
            except MountError as exc:
                errors.append(str(exc))
            if not _mounted(point):
                return []
        proc = subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True, text=True)
        if not _mounted(point):
            return []
        errors.append(proc.stderr.strip() or f"fusermount3 exited {proc.returncode}")
        return [f"cannot unmount {point}: {'; '.join(errors)}"]
