"""Starting a mount's daemon process, with nothing but ``os``, ``sys`` and ``time`` imported.

`commitfs mount` starts its daemon before anything else (issue 19: mount to the
first ``ls``): the daemon's imports (pyfuse3, trio, the file system) are most of a
mount's start-up, and they run while the command line is parsed and the repository
checked.  So this module imports nothing the interpreter does not load at start-up or
have built in (not ``subprocess``, ``tempfile`` or ``argparse``, tens of milliseconds
between them), and the CLI calls :func:`spawn_early` first thing
(``commitfs.cli.main``).  ``fuse/lifecycle.py`` (``PendingDaemon``) hands the daemon
its configuration, or cancels it.

The daemon runs ``python -m commitfs.fuse.daemon --ready-fd W --config-fd R
[--mountpoint MP]`` in a new session, stdin from /dev/null, its stdout and stderr in an
unnamed file until it has its log (an import failure's traceback lands there), no other
descriptor of the caller open in it.  It reads its configuration from R (nothing: it
exits 0, doing nothing: the caller gave up, or died) and writes one line to W once
the mount is live (``ok``) or could not be made (``error: ...``).
"""

from __future__ import annotations

import os
import sys
import time


class DaemonProcess:
    """The started daemon: its pid, and what ``subprocess.Popen`` would say of it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code; TimeoutError if it is still running after ``timeout``."""
        if timeout is None:
            if self.returncode is None:
                try:
                    self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                except ChildProcessError:
                    pass
            return self.returncode
        deadline, pause = time.monotonic() + timeout, 0.0005
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process {self.pid} still running after {timeout:g}s")
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


class Spawned:
    """A daemon process waiting for its configuration: the descriptors to talk to it."""

    def __init__(self, mountpoint: str | None):
        self.mountpoint = mountpoint  # as named on its command line (canonical), or None
        fds: list[int] = []
        try:
            fds += os.pipe()
            fds += os.pipe()
            fds.append(_unnamed_file())
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        config_r, self.config_w, self.ready_r, ready_w, self.early_fd = fds
        # The daemon gets none of this process's other descriptors (a pipe its own
        # caller reads to the end, say), and the two pipe ends as copies made in the
        # child alone (dup2 onto descriptors closed there first: no window in which
        # another thread's child could inherit them).
        keep = {0, 1, 2, config_r, ready_w, self.early_fd}
        config_fd, ready_fd = [n for n in range(3, 3 + len(keep) + 2) if n not in keep][:2]
        argv = [sys.executable, "-m", "commitfs.fuse.daemon", "--ready-fd", str(ready_fd),
                "--config-fd", str(config_fd), *(["--mountpoint", mountpoint] if mountpoint else [])]
        actions = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _open_fds() if fd not in keep]
        # (the pipes first: a caller started without stdin may have got one as fd 0)
        actions += [(os.POSIX_SPAWN_DUP2, config_r, config_fd), (os.POSIX_SPAWN_DUP2, ready_w, ready_fd),
                    (os.POSIX_SPAWN_DUP2, self.early_fd, 1), (os.POSIX_SPAWN_DUP2, self.early_fd, 2),
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        try:
            pid = os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setsid=True)
        except OSError:
            for fd in (self.config_w, self.ready_r, self.early_fd):
                os.close(fd)
            raise
        finally:
            os.close(config_r)
            os.close(ready_w)
        self.proc = DaemonProcess(pid)

    def close(self) -> None:
        """Let it go: with its configuration pipe closed unwritten, it exits doing nothing."""
        for fd in (self.config_w, self.ready_r, self.early_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def canonical(path: str | os.PathLike) -> str:
    """An absolute path with the parent's symlinks resolved, without touching the
    last component (which may be a dead FUSE mount that stat cannot reach)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _unnamed_file() -> int:
    """A read-write file with no name (gone when its last descriptor closes)."""
    where = os.environ.get("TMPDIR") or "/tmp"
    try:
        return os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):  # a file system without O_TMPFILE
        path = os.path.join(where, f"commitfs-daemon-{os.getpid()}-{os.urandom(6).hex()}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.unlink(path)
        return fd


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


#: The daemon `commitfs mount` started first thing (spawn_early), until it is taken.
_early: Spawned | None = None


def spawn_early(mountpoint: str) -> None:
    """Start the daemon for ``mountpoint`` now, for ``take_early`` to find; any
    failure is left to the ordinary start, later, to report."""
    global _early
    try:
        _early = Spawned(canonical(mountpoint))
    except (OSError, ValueError):
        _early = None


def take_early(mountpoint: str) -> Spawned | None:
    """The early daemon if it was started for ``mountpoint`` (canonical), else None
    (one started for another path is let go)."""
    global _early
    spawned, _early = _early, None
    if spawned is not None and spawned.mountpoint != mountpoint:
        spawned.close()
        spawned.proc.kill()  # it has done nothing but import
        spawned.proc.wait()
        return None
    return spawned
