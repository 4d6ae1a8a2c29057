"""Mount lifecycle without pyfuse3: checks, starting the daemon, unmounting.

``commitfs mount`` validates what it can in its own process (the repository,
the revision, the mountpoint), then starts the daemon as a new process
(``python -m commitfs.fuse.daemon CONFIG``) in its own session, with its
output going to a log file and the write end of a pipe.  The daemon reports
``ok`` through the pipe once the mount answers ``stat`` (the kernel handshake
is done), or ``error: MESSAGE`` if it cannot start; the caller turns that into
exit 0 or a one-line error.  If the daemon dies without a word, the caller
says so and points at the log.

A running daemon records itself in ``<runtime dir>/mounts/<key>.json`` (pid,
mountpoint, log) and removes the record when it exits, so that ``umount`` can
wait for it to finish and tests can find it.

``umount`` is fusermount3 -u; a mount whose daemon died ("Transport endpoint
is not connected") that cannot be unmounted normally is detached with -z;
a busy live mount is an error unless ``--lazy``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from commitfs.errors import MountError
from commitfs.fuse import spawn
from commitfs.fuse.spawn import Spawned, canonical

FSTYPE = "fuse.commitfs"
#: How long ``commitfs mount`` waits for the daemon to report (opening an S3
#: repository may take a storage deadline or two).
START_TIMEOUT_S = 180.0
#: Daemon logs (mount-*.log) untouched for this long are deleted by the next mount.
LOG_KEEP_S = 14 * 86400
#: How long ``commitfs umount`` waits for the daemon to exit after the unmount.
EXIT_TIMEOUT_S = 15.0


@dataclass
class DaemonConfig:
    """Everything the daemon needs, passed to it as JSON."""

    repo: str
    mountpoint: str
    cache_dir: str
    log_file: str
    endpoint_url: str | None = None
    commit: str | None = None  # hex id of the commit shown at the root; None: branches/tags/commits
    rev: str | None = None  # what the user asked for, for the log
    cache_size: int = 0
    refresh_s: float = 5.0
    io_timeout_s: float = 60.0
    #: Worker threads for storage calls; None: as many as the repository's kind
    #: wants (vfs/loader.py, default_io_threads).
    io_threads: int | None = None
    max_tasks: int = 64
    allow_other: bool = False
    #: The kernel's read-ahead for the mount (KiB); 0 keeps the kernel's default (128).
    read_ahead_kb: int = 1024
    #: Read-only mounts: let the kernel open files without asking (fuse/adapter.py,
    #: Operations), when the fast path is there (fuse/fastpath.py); False: never.
    no_open: bool = True
    #: A writable workspace over the branch ``rev`` whose overlay lives in ``workspace``.
    writable: bool = False
    workspace: str | None = None
    #: ``mount REV:PATH``: the directory PATH of the commit is the root, its tree id (hex).
    path: str = ""
    tree: str | None = None
    #: False: chunks of a non-local repository are kept in memory only (--no-disk-cache).
    disk_cache: bool = True
    #: Read-only mounts: append the files read to this file (vfs/readlog.py).
    record_reads: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DaemonConfig:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    fstype: str
    source: str


# --- what is mounted where ------------------------------------------------------
def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    raw = field.encode()
    while i < len(raw):
        code = raw[i + 1:i + 4]
        if raw[i] == 0x5C and len(code) == 3 and code.isdigit():
            out.append(int(code, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def iter_mounts():
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().decode(errors="surrogateescape").splitlines():
            left, _, right = line.partition(" - ")
            fields, rest = left.split(" "), right.split(" ")
            if len(fields) >= 5 and len(rest) >= 2:
                yield MountInfo(_unescape(fields[4]), rest[0], _unescape(rest[1]))


def find_mount(path: str | os.PathLike) -> MountInfo | None:
    """What is mounted exactly at ``path`` (the last mount there), or None."""
    target = canonical(path)
    found = None
    for m in iter_mounts():
        if m.mountpoint == target:
            found = m
    return found


#: The file system type of every commitfs mount in /proc/self/mountinfo (daemon.py: subtype=commitfs).
FSTYPE = "fuse.commitfs"


def enclosing_mount(path: str | os.PathLike) -> MountInfo | None:
    """The innermost commitfs mount holding ``path`` (at it or anywhere below it), or None."""
    target = canonical(path)
    found = None
    for m in iter_mounts():
        if target == m.mountpoint or target.startswith(m.mountpoint.rstrip("/") + "/"):
            if found is None or len(m.mountpoint) >= len(found.mountpoint):
                found = m
    return found if found is not None and found.fstype == FSTYPE else None


def slow_open(why: str) -> str:
    """The warning of a read-only mount without the fast path (fuse/fastpath.py): it
    answers every open(), one round trip per file, a warm re-read at about a third of
    the speed.  ``why``: what fastpath.engage() said."""
    return (f"this mount runs without commitfs's fast path ({why}): every open() is a round trip "
            "to the daemon (warm re-reads about 3x slower)")


def list_mounts() -> list[dict]:
    """The commitfs mounts of this machine (in this mount namespace), each with what its
    daemon recorded: mountpoint, repo, rev, commit, path, writable, pid, cache, log,
    fast_open and fast_path_missing (why not, or None); ``stale`` when the daemon is gone (its record, if any, no longer matches a live one)."""
    out = []
    for m in iter_mounts():
        if m.fstype != FSTYPE:
            continue
        record = lookup_record(m.mountpoint) or {}
        stale = not record and is_stale(m.mountpoint)
        out.append({
            "mountpoint": m.mountpoint, "repo": record.get("repo"), "rev": record.get("rev"),
            "commit": record.get("commit"), "path": record.get("path") or "",
            "writable": bool(record.get("writable", False)), "pid": record.get("pid"),
            "cache": record.get("cache"), "cache_size": record.get("cache_size"), "log": record.get("log"),
            "stale": stale, "fast_open": bool(record.get("fast_open", True)),
            "fast_path_missing": record.get("fast_path_missing"),
        })
    return out


def is_stale(path: str | os.PathLike) -> bool:
    """True if ``path`` is a FUSE mount whose daemon is gone.

    statvfs, because the kernel answers stat from its attribute cache
    without asking the (dead) daemon, but always forwards statfs."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def validate_mountpoint(path: str | os.PathLike) -> str:
    """The canonical mountpoint, or MountError saying why it cannot be used."""
    mp = canonical(path)
    shown = os.fspath(path)
    info = find_mount(mp)
    if info is not None:
        if is_stale(mp):
            raise MountError(f"{shown} holds a stale mount whose daemon died (clean it up with: commitfs umount {shown})")
        raise MountError(f"{shown} is already a mount point ({info.fstype})")
    if not os.path.lexists(mp):
        raise MountError(f"mountpoint {shown} does not exist")
    if not os.path.isdir(mp):
        raise MountError(f"mountpoint {shown} is not a directory")
    try:
        with os.scandir(mp) as it:
            if next(it, None) is not None:
                raise MountError(f"mountpoint {shown} is not empty")
    except PermissionError:
        raise MountError(f"mountpoint {shown} is not accessible") from None
    if not os.access(mp, os.W_OK | os.X_OK):
        raise MountError(f"mountpoint {shown}: permission denied")
    return mp


# --- daemon records ----------------------------------------------------------------
def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "commitfs"
    return Path("/tmp") / f"commitfs-{os.getuid()}"


def _record_path(mountpoint: str) -> Path:
    key = hashlib.sha256(canonical(mountpoint).encode(errors="surrogateescape")).hexdigest()[:32]
    return runtime_dir() / "mounts" / f"{key}.json"


_SUN_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108 with the NUL)


def ensure_records_dir() -> Path:
    """``<runtime dir>/mounts``, made if missing (0700, as are the directories
    made for it); refused if it, or ``<runtime dir>`` itself, is not a real
    directory of this user's that only this user can enter (the /tmp fallback
    is a shared directory: another user could have made the name first)."""
    base = runtime_dir()
    records = base / "mounts"
    for d in (base, records):
        try:
            d.mkdir(mode=0o700, parents=d is base, exist_ok=True)
            st = os.lstat(d)
        except OSError as exc:
            raise MountError(f"cannot create the runtime directory {d}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise MountError(f"the runtime directory {d} is not a directory of yours "
                             "(remove it, or set XDG_RUNTIME_DIR)")
        if st.st_mode & 0o077:  # made by an older commitfs, or by hand: make it private
            try:
                os.chmod(d, 0o700)
            except OSError as exc:
                raise MountError(f"cannot make the runtime directory {d} private: {exc.strerror}") from None
    return records


def control_socket_path(mountpoint: str) -> str:
    """Where a workspace daemon listens (short: Unix socket paths are limited to 108 bytes);
    its directory is made if missing."""
    ensure_records_dir()
    path = str(_record_path(mountpoint).with_suffix(".sock"))
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise MountError(f"the runtime directory {runtime_dir()} is too long a path for a control socket "
                         f"(set XDG_RUNTIME_DIR to a shorter directory)")
    return path


def write_record(mountpoint: str, log_file: str, **extra) -> None:
    """Record this process as the daemon of ``mountpoint`` (``extra``: a workspace's
    ``control`` socket, ``workspace`` directory and ``branch``), and remove the
    records daemons that died left behind (prune_records)."""
    path = _record_path(mountpoint)
    records = ensure_records_dir()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "mountpoint": canonical(mountpoint), "log": log_file,
                               **extra}))
    os.replace(tmp, path)
    prune_records(records)


def prune_records(records: Path | None = None) -> int:
    """Remove the records of daemons that died without removing their own (a
    SIGKILL, a crash) where nothing is mounted at their mountpoint any more (a
    stale mount keeps its record until it is unmounted); how many.  A record
    that cannot be read is left alone."""
    records = records if records is not None else runtime_dir() / "mounts"
    try:
        paths = list(records.glob("*.json"))
    except OSError:
        return 0
    if not paths:
        return 0
    mounted = {m.mountpoint for m in iter_mounts()}
    removed = 0
    for f in paths:
        try:
            record = json.loads(f.read_text())
            pid, mp = int(record["pid"]), str(record["mountpoint"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if mp not in mounted and not _alive(pid):
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def lookup_record(mountpoint: str | os.PathLike) -> dict | None:
    """The record of the live daemon serving exactly ``mountpoint``, or None."""
    try:
        record = json.loads(_record_path(os.fspath(mountpoint)).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid) or find_mount(mountpoint) is None:
        return None
    return record


def lookup_workspace(path: str | os.PathLike) -> dict | None:
    """The record of the workspace mount at ``path`` (its mountpoint), or None."""
    if find_mount(path) is None:
        return None
    record = lookup_record(path)
    return record if record and record.get("control") else None


def workspace_request(record: dict, request: dict, timeout_s: float | None = None) -> dict:
    """Send one control request to a workspace daemon and return its answer."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(record["control"])
            sock.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                part = sock.recv(65536)
                if not part:
                    break
                buf += part
        except OSError as exc:
            raise MountError(f"cannot reach the workspace daemon of {record.get('mountpoint')}: "
                             f"{exc.strerror or exc} (log: {record.get('log')})") from None
    finally:
        sock.close()
    if b"\n" not in buf:
        raise MountError(f"the workspace daemon of {record.get('mountpoint')} died during the request "
                         f"(log: {record.get('log')})")
    return json.loads(buf.split(b"\n", 1)[0])


def remove_record(mountpoint: str) -> None:
    path = _record_path(mountpoint)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def lookup_daemon_pid(mountpoint: str | os.PathLike) -> int | None:
    """The pid of the live daemon serving ``mountpoint``, if it recorded itself."""
    try:
        pid = int(json.loads(_record_path(os.fspath(mountpoint)).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


# --- starting -------------------------------------------------------------------------
def _prune_logs(logs: Path, keep_s: float = LOG_KEEP_S) -> None:
    now = time.time()
    try:
        for f in logs.glob("mount-*.log"):
            try:
                if now - f.stat().st_mtime > keep_s:
                    f.unlink()
            except OSError:
                pass
    except OSError:
        pass


def start_daemon(config: DaemonConfig, timeout_s: float = START_TIMEOUT_S) -> int:
    """Start the daemon in the background; return its pid once the mount is live."""
    return spawn_daemon().start(config, timeout_s)


def spawn_daemon(mountpoint: str | None = None) -> PendingDaemon:
    """A daemon process started now, before its configuration is known: it imports
    what it serves with (pyfuse3, trio, the file system: most of a mount's start-up)
    while the caller still checks the command line and the repository, then waits
    for ``PendingDaemon.start`` (or exits at ``cancel``, doing nothing).
    ``mountpoint``: named on its command line (for ps, and scripts that look for
    a mount's daemon there); its configuration decides.  The one `commitfs mount`
    started first thing for this mountpoint (spawn.spawn_early), if any, is taken
    instead of a new one."""
    early = spawn.take_early(canonical(mountpoint)) if mountpoint else None
    return PendingDaemon(mountpoint, early)


class PendingDaemon:
    """A daemon process waiting for its configuration (``spawn_daemon``; started
    by fuse/spawn.py)."""

    def __init__(self, mountpoint: str | None = None, spawned: Spawned | None = None):
        self._done = False  # started or cancelled: its descriptors are closed
        # Until it has its configuration the daemon has no log: it writes to an
        # unnamed file (an import failure's traceback, say), which start() copies
        # into the mount log if the daemon dies before it is ready; it then sends its
        # stdout and stderr to the configured log (daemon.main).
        if spawned is None:
            try:
                spawned = Spawned(canonical(mountpoint) if mountpoint else None)
            except OSError as exc:
                raise MountError(f"cannot start the mount daemon: {exc}") from None
        self.proc = spawned.proc
        self._config_w, self._ready_r = spawned.config_w, spawned.ready_r
        self._early = open(spawned.early_fd, "w+b")

    def start(self, config: DaemonConfig, timeout_s: float = START_TIMEOUT_S) -> int:
        """Hand the daemon ``config``; return its pid once the mount is live."""
        try:
            Path(config.log_file).parent.mkdir(parents=True, exist_ok=True)
            open(config.log_file, "ab").close()
        except OSError as exc:
            self.cancel()
            raise MountError(f"cannot write the mount log {config.log_file}: {exc.strerror or exc}") from None
        _prune_logs(Path(config.log_file).parent)
        self._done = True
        proc, read_fd = self.proc, self._ready_r
        try:
            try:
                os.write(self._config_w, config.to_json().encode())
            except OSError:
                pass  # it died already: its report (none) says so below
            finally:
                os.close(self._config_w)
            message = _read_report(read_fd, timeout_s)
        finally:
            os.close(read_fd)
        if message == "ok":
            self._early.close()
            return proc.pid
        if message is None:
            proc.kill()
            proc.wait()
            self._keep_early_output(config.log_file)
            raise MountError(f"the mount daemon did not become ready within {timeout_s:g}s (log: {config.log_file})")
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            code = proc.wait()
        last = self._keep_early_output(config.log_file)
        if message.startswith("error: "):
            raise MountError(message[len("error: "):])
        raise MountError(f"the mount daemon exited with status {code} before the mount was ready"
                         f"{': ' + last if last else ''} (log: {config.log_file})")

    def _keep_early_output(self, log_file: str) -> str:
        """Copy what the daemon wrote before it had its log into the log; its last line."""
        try:
            self._early.seek(0)
            early = self._early.read()
            if early:
                with open(log_file, "ab") as log_out:
                    log_out.write(early)
        except OSError:
            early = b""
        finally:
            self._early.close()
        lines = early.decode(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else ""

    def cancel(self) -> None:
        """The mount is not going ahead: the daemon exits without doing anything."""
        if self._done:
            return
        self._done = True
        self._early.close()
        for fd in (self._config_w, self._ready_r):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=EXIT_TIMEOUT_S)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()


def _read_report(fd: int, timeout_s: float) -> str | None:
    """The daemon's one-line report; '' if it closed the pipe without one; None on timeout."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        part = os.read(fd, 4096)
        if not part:
            break
        buf += part
    return buf.split(b"\n", 1)[0].decode(errors="replace")


# --- unmounting -------------------------------------------------------------------------
def fuse_connection(path: str | os.PathLike) -> str | None:
    """The FUSE connection of the mount at ``path`` (its directory under
    /sys/fs/fuse/connections, named by the mount's device number), from
    /proc/self/mountinfo: no request to the mount.  None if nothing is mounted there."""
    target = canonical(path)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().decode(errors="surrogateescape").splitlines():
            fields = line.partition(" - ")[0].split(" ")
            if len(fields) >= 5 and _unescape(fields[4]) == target and ":" in fields[2]:
                major, _, minor = fields[2].partition(":")
                found = f"/sys/fs/fuse/connections/{os.makedev(int(major), int(minor))}"
    return found


def abort_connection(connection: str | None) -> str | None:
    """End every request of a FUSE connection (fuse_connection) with an error, as
    the kernel does when a daemon dies: what waits for one stops waiting.  None if
    done, else why not (needs root, or the fusectl file system)."""
    if connection is None:
        return "its FUSE connection is not known"
    try:
        with open(f"{connection}/abort", "w") as f:
            f.write("1\n")
    except OSError as exc:
        return f"cannot abort {connection}: {exc.strerror or exc}"
    return None


def detach(path: str | os.PathLike) -> None:
    """Lazily detach whatever is mounted at ``path`` (never raises, never waits for it)."""
    _detach(canonical(path), lazy=True)


def _fusermount() -> list[str]:
    for name in ("fusermount3", "fusermount"):
        path = shutil.which(name)
        if path:
            return [path]
    return []


def _detach(mp: str, lazy: bool) -> subprocess.CompletedProcess:
    tool = _fusermount()
    if tool:
        cmd = tool + ["-u"] + (["-z"] if lazy else []) + [mp]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mp]
    return subprocess.run(cmd, capture_output=True, text=True)


def unmount(path: str | os.PathLike, lazy: bool = False) -> None:
    """Unmount a commitfs mount (or a stale one) and wait for its daemon to exit."""
    mp = canonical(path)
    shown = os.fspath(path)
    info = find_mount(mp)
    if info is None:
        raise MountError(f"{shown} is not mounted")
    if info.fstype != FSTYPE:
        raise MountError(f"{shown} is not a commitfs mount ({info.fstype})")
    pid = lookup_daemon_pid(mp)
    stale = is_stale(mp)
    proc = _detach(mp, lazy)
    if proc.returncode != 0 and find_mount(mp) is not None:
        detail = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        if stale and not lazy:
            # Nobody can read from a dead mount anyway: detach it.
            proc = _detach(mp, lazy=True)
            if proc.returncode != 0 and find_mount(mp) is not None:
                raise MountError(f"cannot unmount {shown}: {detail}")
        elif "busy" in detail.lower():
            raise MountError(f"{shown} is busy (files or directories in it are in use); "
                             f"close them, or detach it with: commitfs umount --lazy {shown}")
        else:
            raise MountError(f"cannot unmount {shown}: {detail}")
    if pid is not None and not lazy:
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if stale:
        prune_records()  # its daemon died without removing its record: the mount is gone now
