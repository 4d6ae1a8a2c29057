"""Lineage verbs: run (a command on mounted inputs, committing its output), lineage.

``commitfs run`` mounts each input read-only at its resolved commit through
``commitfs mount`` subprocesses (each in its own session, so a Ctrl-C on the
terminal reaches the command but not the mounts), runs the command with the
mount paths and commit ids in its environment, and commits the output
directory with lineage metadata only if the command succeeded.  Whatever
happens, the mounts are unmounted and their directories removed.

Signals: while the command runs, SIGINT and SIGTERM are blocked and taken
with sigtimedwait, which tells where a SIGINT came from.  One sent by the
terminal (si_code SI_KERNEL) already reached the command, which is in our
process group, so it is not sent twice; one sent to commitfs alone (kill) is
forwarded.  If the command is still alive GRACE seconds later, or on a second
signal, it gets SIGTERM, then SIGKILL.  Outside that window (while mounting,
while unmounting) signals are only recorded and acted on at the next safe
point, so a mount is never left half made.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from commitfs.cli.core import repo_url, store_options
from commitfs.cli.output import ProgressBar, print_json, warn
from commitfs.errors import InputError, MountError
from commitfs.fuse import lifecycle
from commitfs.ops import lineage
from commitfs.ops.lineage_index import LineageReport, query_lineage
from commitfs.ops.snapshot import check_commit_text, commit_directory
from commitfs.repo.refs import check_ref_name

# Seconds the command has to exit after an interrupt before it gets SIGTERM,
# then SIGKILL: long enough for a training loop to finish a step and exit.
GRACE = 10.0
KILL_GRACE = 5.0
# Seconds a `commitfs mount` may take to report its mount ready.
MOUNT_TIMEOUT = 120.0
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


# --- mounts ------------------------------------------------------------------------
def _mounted(path: str) -> bool:
    """Whether ``path`` is a mount point (also a dead FUSE mount, which stat cannot tell)."""
    return lifecycle.find_mount(path) is not None


class Mounts:
    """Input mounts of one run, made by ``commitfs mount`` subprocesses."""

    def __init__(self, endpoint_url: str | None):
        self.endpoint_url = endpoint_url
        try:
            self.base = tempfile.mkdtemp(prefix="commitfs-run-")
        except OSError as exc:
            raise MountError(f"cannot create a directory for the input mounts in {tempfile.gettempdir()}: "
                             f"{exc.strerror or exc}") from None
        self.points: list[str] = []

    def mount(self, inp: lineage.Input) -> str:
        point = os.path.join(self.base, inp.name or inp.commit.hex()[:12])
        os.mkdir(point)
        self.points.append(point)
        cmd = [sys.executable, "-m", "commitfs", "-r", inp.url]
        if self.endpoint_url:
            cmd += ["--endpoint-url", self.endpoint_url]
        cmd += ["mount", inp.commit.hex(), point]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True, timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise MountError(f"mounting input {inp.name} ({inp.value}) took over {MOUNT_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            detail = lines[-1].removeprefix("commitfs: ") if lines else f"exit code {proc.returncode}"
            raise MountError(f"cannot mount input {inp.name} ({inp.value}): {detail}")
        if not _mounted(point):
            raise MountError(f"cannot mount input {inp.name}: `commitfs mount` succeeded but {point} is not mounted")
        return point

    def cleanup(self, deferred: DeferredSignals | None = None) -> list[str]:
        """Unmount everything (lazily if busy) and remove the directories; return problems.

        Signals meanwhile are recorded in ``deferred`` (or dropped): an unmount is never cut short."""
        problems = []
        with deferred or DeferredSignals():
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


# --- the command ---------------------------------------------------------------------
def _check_command(command: list[str], env: dict[str, str]) -> None:
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


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def cmd_run(args) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InputError("run needs a command after --")
    specs = [lineage.parse_input_spec(s, named=True) for s in args.input or []]
    lineage.check_unique_names(specs)
    to = lineage.parse_input_spec(args.to)  # [REPO_URL@]BRANCH
    check_ref_name(to.rev)
    output = os.path.abspath(args.output)
    if args.message is not None:
        check_commit_text(args.message)
    # Undecodable bytes of the command line become U+FFFD in the default message.
    message = args.message or f"commitfs run: {shlex.join(command)}"[:1000].encode(
        "utf-8", "surrogateescape").decode("utf-8", "replace")

    with lineage.RepositoryOpener(store_options(args)) as opener:
        default = opener.open(repo_url(args)) if args.repo else None
        if to.url is None and default is None:
            raise InputError("--to names no repository: write --to REPO_URL@BRANCH or use -r/--repo")
        target = opener.open(to.url) if to.url else default
        inputs = lineage.resolve_inputs(specs, default, opener)
        env = dict(os.environ)
        _check_command(command, env)
        code_commit, code_dirty = lineage.git_state(os.getcwd())

        mounts = Mounts(args.endpoint_url)
        try:
            with DeferredSignals() as deferred:
                paths = {}
                for inp in inputs:
                    paths[inp.name] = mounts.mount(inp)
                    deferred.check()
                env.update(lineage.run_environment(inputs, paths, output))
                started = time.time()
                try:
                    child = subprocess.Popen(command, env=env)
                except FileNotFoundError:
                    raise InputError(f"command not found: {command[0]}") from None
                except PermissionError:
                    raise InputError(f"command is not executable: {command[0]}") from None
                except OSError as exc:
                    raise InputError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
                rc, stopped = wait_child(child, deferred)
                finished = time.time()
                for problem in mounts.cleanup(deferred):
                    warn(problem)
                stopped = stopped or (deferred.received[0] if deferred.received else None)
        except Interrupted as exc:
            stopped, rc = exc.signo, None
        finally:
            for problem in mounts.cleanup():
                warn(problem)

        if stopped is not None:
            print(f"commitfs: run interrupted ({signal.Signals(stopped).name}); nothing committed", file=sys.stderr)
            return 128 + stopped
        code = _exit_code(rc)
        if code != 0 and not args.commit_on_failure:
            print(f"commitfs: command exited with {code}; nothing committed", file=sys.stderr)
            return code
        if not os.path.isdir(output):
            raise InputError(f"output directory {args.output} does not exist after the command; nothing committed")
        metadata = lineage.input_metadata(inputs)
        metadata.update(lineage.run_metadata(command, started, finished, code,
                                             git_commit=code_commit, git_dirty=code_dirty))
        bar = ProgressBar("commit")
        try:
            result = commit_directory(
                target, output, branch=to.rev, message=message, metadata=metadata, allow_empty=True,
                progress=lambda p: bar.update(p.bytes_done, p.bytes_total, p.files_done, p.files_total),
            )
        finally:
            bar.close()
        for w in result.warnings:
            warn(w)
        if args.json:
            print_json({"id": result.commit_id.hex(), "repo": target.url, "branch": to.rev, "exit_code": code,
                        "inputs": [i.to_json() for i in inputs], "files": result.files,
                        "bytes_stored": result.write.bytes_new_stored})
        else:
            print(result.commit_id.hex())
        return code


# --- the query ---------------------------------------------------------------------
def cmd_lineage(args) -> int:
    spec = lineage.parse_input_spec(args.rev)
    with lineage.RepositoryOpener(store_options(args)) as opener:
        if spec.url is None:
            repo = opener.open(repo_url(args))
        else:
            repo = opener.open(spec.url)
        cid = repo.resolve(spec.rev)
        search = [opener.open(u) for u in args.search] if args.search else [repo]
        if args.depth is not None and args.depth < 1:
            raise InputError("--depth must be at least 1")
        report = query_lineage(repo, cid, opener, search, depth=args.depth,
                               up=not args.downstream, down=not args.upstream)
    if args.json:
        print_json(report.to_json())
    else:
        print_report(report, up=not args.downstream, down=not args.upstream)
    return 0


def _short(cid_hex: str) -> str:
    return cid_hex[:12]


def print_report(r: LineageReport, *, up: bool = True, down: bool = True) -> None:
    print(f"commit {r.commit.hex()}  {r.repo}")
    if r.summary:
        print(f"    {r.summary}")
    run = r.run
    if run.command is not None:
        status = f"exit {run.exit_code}" if run.exit_code is not None else ""
        when = f"{run.started} .. {run.finished}" if run.started else ""
        print(f"run:    {shlex.join(run.command)}" + (f"  ({', '.join(x for x in (status, when) if x)})"
                                                       if status or when else ""))
    if run.git_commit:
        print(f"code:   git {run.git_commit}" + (" (dirty work tree)" if run.git_dirty else ""))
    if run.mlflow_run_id:
        print(f"mlflow: {run.mlflow_run_id}")
    if run.wandb_run_id:
        print(f"wandb:  {run.wandb_run_id}")
    if up:
        print("upstream:" + ("" if r.upstream else " (none)"))
        _print_up(r.upstream, 1)
    if down:
        print(f"downstream (in {', '.join(r.searched)}):" + ("" if r.downstream else " (none)"))
        _print_down(r.downstream, 1)
    for p in r.problems:
        warn(p)


def _print_up(nodes, level: int) -> None:
    for n in nodes:
        pad = "  " * level
        name = f"{n.input.name} " if n.input.name else ""
        rev = f" ({n.input.rev})" if n.input.rev else ""
        text = f"  {n.summary}" if n.summary else ""
        print(f"{pad}{name}{n.input.url}@{_short(n.input.commit.hex())}{rev}{text}")
        if n.repo and n.repo != n.input.url:
            print(f"{pad}  found in {n.repo}")
        if n.error:
            print(f"{pad}  error: {n.error}")
        for p in n.problems:
            print(f"{pad}  problem: {p}")
        _print_up(n.inputs, level + 1)


def _print_down(nodes, level: int) -> None:
    for n in nodes:
        pad = "  " * level
        name = f" (as {n.name})" if n.name else ""
        text = f"  {n.summary}" if n.summary else ""
        print(f"{pad}{n.repo}@{_short(n.commit.hex())}{name}{text}")
        _print_down(n.downstream, level + 1)


def register(sub, common) -> None:
    p = sub.add_parser(
        "run", parents=[common], help="run a command on mounted inputs and commit its output with lineage",
        description="Mount each input read-only at its commit, run COMMAND, and if it succeeds commit DIR "
                    "to BRANCH with the inputs, command, code version and times as lineage.",
        usage="commitfs run [--input NAME=[REPO_URL@]REV]... --output DIR --to [REPO_URL@]BRANCH [-m MSG] "
              "[--commit-on-failure] [--json] -- COMMAND...")
    p.set_defaults(handler=cmd_run)
    p.add_argument("--input", action="append", metavar="NAME=[REPO_URL@]REV",
                   help="an input, mounted at $COMMITFS_INPUT_<NAME> (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR", help="the directory to commit after the command")
    p.add_argument("--to", required=True, metavar="[REPO_URL@]BRANCH", help="where to commit DIR")
    p.add_argument("-m", "--message", help="commit message (default: the command line)")
    p.add_argument("--commit-on-failure", action="store_true",
                   help="commit DIR even if the command fails (its exit code is recorded)")
    p.add_argument("--json", action="store_true")
    p.add_argument("command", nargs="...", metavar="-- COMMAND")

    p = sub.add_parser("lineage", parents=[common], help="show the inputs and the users of a commit",
                       description="Upstream: the commit's inputs, recursively, across repositories. "
                                   "Downstream: commits naming it as an input in the searched repositories.")
    p.set_defaults(handler=cmd_lineage)
    p.add_argument("rev", metavar="[REPO_URL@]REV")
    p.add_argument("--search", action="append", metavar="URL",
                   help="a repository to search for downstream commits (repeatable; default: the current one)")
    p.add_argument("--depth", type=int, metavar="N", help="follow at most N levels each way (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--upstream", action="store_true", help="only the upstream")
    g.add_argument("--downstream", action="store_true", help="only the downstream")
    p.add_argument("--json", action="store_true")
