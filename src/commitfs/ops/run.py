"""``commitfs run``: a command on mounted inputs, its output committed with lineage.

``run`` resolves the inputs now (full commit ids), mounts each read-only at
its commit (through the front end's mount factory: ops/ knows no FUSE), runs
the command with the mount paths and commit ids in its environment, and
commits the output directory with lineage metadata only if the command
succeeded.  Whatever happens, the mounts are unmounted and their directories
removed.  The CLI (cli/lineage.py) and the Python API (``commitfs.run``)
both call it; it prints nothing and returns a RunResult.

Signals: while the command runs, SIGINT and SIGTERM are blocked and taken
with sigtimedwait, which tells where a SIGINT came from.  One sent by the
terminal (si_code SI_KERNEL) already reached the command, which is in our
process group, so it is not sent twice; one sent to commitfs alone (kill) is
forwarded.  If the command is still alive GRACE seconds later, or on a second
signal, it gets SIGTERM, then SIGKILL.  Outside that window (while mounting,
while unmounting) signals are only recorded and acted on at the next safe
point, so a mount is never left half made.  Signal handlers can only be set
in the main thread: call ``run`` from there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from commitfs.errors import InputError, UsageError
from commitfs.ops import lineage, readset, runcache, trackers
from commitfs.ops.snapshot import Progress, check_commit_text, commit_directory
from commitfs.repo.refs import check_ref_name

# Seconds the command has to exit after an interrupt before it gets SIGTERM,
# then SIGKILL: long enough for a training loop to finish a step and exit.
GRACE = 10.0
KILL_GRACE = 5.0
_SI_KERNEL = 0x80  # si_code of signals the kernel sends (a terminal's Ctrl-C)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    def __init__(self, signo: int):
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


class DeferredSignals:
    """SIGINT/SIGTERM recorded instead of raising, inside the ``with``."""

    def __init__(self):
        self.received: list[int] = []
        self._old: dict = {}
        self._depth = 0

    def __enter__(self) -> DeferredSignals:
        if not self._old:  # re-entering an active one keeps its handlers
            self._depth = 0
            for s in _STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._record)
        self._depth += 1
        return self

    def _record(self, signo, frame) -> None:
        self.received.append(signo)

    def take(self) -> list[int]:
        out, self.received = self.received, []
        return out

    def check(self) -> None:
        if self.received:
            raise Interrupted(self.received[0])

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for s, h in self._old.items():
                signal.signal(s, h)
            self._old = {}


class MountSet(Protocol):
    """What ``run`` needs of the front end's mounts (fuse/runmounts.py implements it)."""

    def mount(self, url: str, commit: bytes, name: str, shown: str, record_reads: str | None = None) -> str: ...

    def cleanup(self) -> list[str]: ...


# --- the command ---------------------------------------------------------------------
def check_command(command: list[str], env: Mapping[str, str]) -> None:
    exe = command[0]
    if os.sep in exe:
        if not os.path.isfile(exe):
            raise InputError(f"command not found: {exe}")
        if not os.access(exe, os.X_OK):
            raise InputError(f"command is not executable: {exe}")
    elif shutil.which(exe, path=env.get("PATH", os.defpath)) is None:
        raise InputError(f"command not found: {exe} (not on PATH)")


def _send(child: subprocess.Popen, signo: int) -> None:
    try:
        child.send_signal(signo)
    except ProcessLookupError:
        pass


def wait_child(child: subprocess.Popen, deferred: DeferredSignals) -> tuple[int, int | None]:
    """Wait for the command; (its return code, the first stop signal received or None)."""
    mask = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    first: int | None = None
    stage = 0
    deadline: float | None = None
    ladder = [signal.SIGTERM, signal.SIGKILL]

    def escalate() -> None:
        nonlocal stage, deadline
        if stage < len(ladder):
            _send(child, ladder[stage])
            stage += 1
            deadline = time.monotonic() + KILL_GRACE

    try:
        for signo in deferred.take():  # arrived while starting the command
            first = signo
            _send(child, signo)
            deadline = time.monotonic() + GRACE
        while True:
            rc = child.poll()
            if rc is not None:
                return rc, first
            info = signal.sigtimedwait(mask, 0.25)
            events = [(info.si_signo, info.si_code)] if info and info.si_signo != signal.SIGCHLD else []
            events += [(s, None) for s in deferred.take()]
            for signo, code in events:
                if first is None:
                    first = signo
                    from_terminal = code == _SI_KERNEL and signo == signal.SIGINT
                    if not from_terminal:
                        _send(child, signo)
                    deadline = time.monotonic() + GRACE
                else:
                    escalate()
            if deadline is not None and time.monotonic() > deadline and child.poll() is None:
                escalate()
    finally:
        while True:  # drain what arrived meanwhile, so unblocking raises nothing
            try:
                info = signal.sigtimedwait(mask, 0)
            except InterruptedError:
                continue
            if info is None:
                break
            if info.si_signo != signal.SIGCHLD and first is None:
                first = info.si_signo
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_code(rc: int) -> int:
    """A child's return code as a shell reports it (128 + N when killed by signal N)."""
    return 128 - rc if rc < 0 else rc


# --- the run -------------------------------------------------------------------------
@dataclass
class RunSpec:
    """What to run: as ``commitfs run`` takes it on its command line."""

    command: list[str]
    output: str                       # the directory to commit after the command
    to: str                           # [REPO_URL@]BRANCH
    inputs: list[str] = field(default_factory=list)  # NAME=[REPO_URL@]REV
    repo: str | None = None           # the repository a spec without URL names
    message: str | None = None
    commit_on_failure: bool = False
    cwd: str | None = None            # where the command runs (default: the current directory)
    environ: Mapping[str, str] | None = None  # its base environment (default: os.environ)
    record_reads: bool = False        # store the files the command read (ops/readset.py)
    env_names: list[str] = field(default_factory=list)  # variables whose values key the run cache
    use_cache: bool = True            # look the run up in the run cache (ops/runcache.py)
    cache_from: list[str] = field(default_factory=list)  # more repositories to look it up in
    log_to: list[str] = field(default_factory=list)  # experiment trackers (ops/trackers.py)


@dataclass
class RunResult:
    """How a run ended.  ``status``: committed, failed (the command exited non-zero,
    nothing committed), interrupted (by ``signal``, nothing committed) or cached
    (an earlier run with the same key: ``commit_id``; the command did not run)."""

    status: str
    exit_code: int                    # what `commitfs run` exits with
    repo: str
    branch: str
    inputs: list[lineage.Input]
    commit_id: bytes | None = None
    signal: int | None = None
    files: int = 0
    bytes_stored: int = 0
    warnings: list[str] = field(default_factory=list)
    readset: bytes | None = None      # the read set's id (with record_reads)
    files_read: int | None = None
    #: The run cache: "hit" (status "cached": the command did not run), "miss",
    #: "disabled" (--no-cache), or "off: <why>" (no key: no clean git work tree).
    cache: str = "miss"
    cached_by: str | None = None      # on a hit: "key" or "readset"
    cached_repo: str | None = None
    logged_to: dict[str, str] = field(default_factory=dict)  # tracker -> its run id

    def to_json(self) -> dict:
        return {"id": self.commit_id.hex() if self.commit_id else None, "repo": self.repo, "branch": self.branch,
                "status": self.status, "exit_code": self.exit_code, "inputs": [i.to_json() for i in self.inputs],
                "files": self.files, "bytes_stored": self.bytes_stored,
                "readset": self.readset.hex() if self.readset else None, "files_read": self.files_read,
                "cache": self.cache, "cached_by": self.cached_by, "cached_repo": self.cached_repo,
                "logged_to": self.logged_to}


def run(
    spec: RunSpec,
    mounts: Callable[[], MountSet],
    *,
    store_options: Mapping | None = None,
    progress: Callable[[Progress], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunResult:
    """Run ``spec``; bad input raises InputError (or another CommitfsError) before
    anything is mounted.  ``mounts`` makes the run's MountSet; ``warn`` is told
    each problem as it happens (it is also in the result's warnings)."""
    warnings: list[str] = []

    def note(problem: str) -> None:
        warnings.append(problem)
        if warn is not None:
            warn(problem)

    command = list(spec.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run needs a command after --")
    specs = [lineage.parse_input_spec(s, named=True) for s in spec.inputs]
    lineage.check_unique_names(specs)
    to = lineage.parse_input_spec(spec.to)  # [REPO_URL@]BRANCH
    check_ref_name(to.rev)
    cwd = os.path.abspath(spec.cwd or os.getcwd())
    output = os.path.join(cwd, spec.output)
    if spec.message is not None:
        check_commit_text(spec.message)
    # Undecodable bytes of the command line become U+FFFD in the default message.
    message = spec.message or f"commitfs run: {shlex.join(command)}"[:1000].encode(
        "utf-8", "surrogateescape").decode("utf-8", "replace")

    with lineage.RepositoryOpener(store_options) as opener:
        default = opener.open(spec.repo) if spec.repo else None
        if to.url is None and default is None:
            raise InputError("--to names no repository: write --to REPO_URL@BRANCH or use -r/--repo")
        target = opener.open(to.url) if to.url else default
        inputs = lineage.resolve_inputs(specs, default, opener)
        env = dict(os.environ if spec.environ is None else spec.environ)
        check_command(command, env)
        code_commit, code_dirty = lineage.git_state(cwd)
        for name in spec.log_to:
            if name not in trackers.TRACKERS:
                raise UsageError(f"--log-to takes {' or '.join(trackers.TRACKERS)}, got {name!r}")
        for name in spec.env_names:
            if not name or "=" in name:
                raise UsageError(f"--env takes a variable name, got {name!r}")
        keys = runcache.run_keys(inputs, command, code_commit, code_dirty, spec.env_names, env)
        cache_state = "disabled" if not spec.use_cache else ("miss" if keys.key else f"off: {keys.why}")
        if spec.use_cache and keys.key:
            search = []
            head = target.refs.lookup_branch(to.rev)
            if head is not None:
                search.append((target, [head]))
            for url in spec.cache_from:
                r = opener.open(url)
                search.append((r, list(r.refs.branches().values())))
            hit = runcache.lookup(keys, search, inputs=inputs, by_readset=spec.record_reads,
                                  input_repos={i.url: opener.open(i.url) for i in inputs})
            if hit is not None:
                cached = RunResult(status="cached", exit_code=0, repo=target.url, branch=to.rev, inputs=inputs,
                                   commit_id=hit.commit, warnings=warnings, cache="hit", cached_by=hit.by,
                                   cached_repo=hit.repo)
                cached.logged_to = trackers.log_to(spec.log_to, cached, note, env)
                return cached

        logs: dict[str, str] = {}
        reads_dir = tempfile.mkdtemp(prefix="commitfs-reads-") if spec.record_reads else None
        try:
            result = RunResult(status="failed", exit_code=1, repo=target.url, branch=to.rev, inputs=inputs,
                               warnings=warnings, cache=cache_state)
            stopped: int | None = None
            rc: int | None = None
            with DeferredSignals() as deferred:
                mset = mounts()
                try:
                    paths = {}
                    for inp in inputs:
                        if reads_dir is not None:
                            logs[inp.name] = os.path.join(reads_dir, f"{len(logs)}.log")
                        paths[inp.name] = mset.mount(inp.url, inp.commit, inp.name, inp.value,
                                                     record_reads=logs.get(inp.name))
                        deferred.check()
                    env.update(lineage.run_environment(inputs, paths, output))
                    started = time.time()
                    try:
                        child = subprocess.Popen(command, env=env, cwd=cwd)
                    except FileNotFoundError:
                        raise InputError(f"command not found: {command[0]}") from None
                    except PermissionError:
                        raise InputError(f"command is not executable: {command[0]}") from None
                    except OSError as exc:
                        raise InputError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
                    rc, stopped = wait_child(child, deferred)
                    finished = time.time()
                except Interrupted as exc:
                    stopped, rc = exc.signo, None
                finally:
                    for problem in mset.cleanup():  # signals meanwhile are only recorded
                        note(problem)
                stopped = stopped or (deferred.received[0] if deferred.received else None)

            if stopped is not None:
                result.status, result.signal, result.exit_code = "interrupted", stopped, 128 + stopped
                return result
            code = exit_code(rc)
            result.exit_code = code
            if code != 0 and not spec.commit_on_failure:
                return result
            if not os.path.isdir(output):
                raise InputError(f"output directory {spec.output} does not exist after the command; "
                                 "nothing committed")
            metadata = lineage.input_metadata(inputs)
            metadata.update(lineage.run_metadata(command, started, finished, code, git_commit=code_commit,
                                                 git_dirty=code_dirty, environ=env))
            if keys.key:
                metadata[runcache.KEY] = keys.key
                if spec.record_reads:
                    metadata[runcache.BASE_KEY] = keys.base
            if reads_dir is not None:
                built = readset.build(logs, reads_dir)
                for name in built.incomplete:
                    note(f"the read log of input {name} did not end cleanly (its mount was not closed in "
                         "order): the read set may lack files")
                result.readset = readset.store(target, built.path)
                result.files_read = built.files
                metadata[readset.META_KEY] = result.readset.hex()
                metadata[readset.COUNT_KEY] = str(built.files)
                if built.incomplete:
                    metadata[readset.INCOMPLETE_KEY] = ",".join(built.incomplete)
            made = commit_directory(target, output, branch=to.rev, message=message, metadata=metadata,
                                    allow_empty=True, progress=progress)
            for w in made.warnings:
                note(w)
            result.status, result.commit_id = "committed", made.commit_id
            result.files, result.bytes_stored = made.files, made.write.bytes_stored
            result.logged_to = trackers.log_to(spec.log_to, result, note, env)
            return result
        finally:
            if reads_dir is not None:
                shutil.rmtree(reads_dir, ignore_errors=True)
