"""The command line: parsing, printing, exit codes.

Exit codes: 0 success, 1 a user-facing error (one line on stderr, never a
traceback), 2 bad usage, 130 interrupted.  Each group of verbs lives in its own
module with ``register(subparsers, common)``; handlers return an int exit code.
"""

from __future__ import annotations

import errno
import os
import sys

from commitfs.errors import CommitfsError, OutputError, UsageError

# Modules defining verbs, in the order --help lists them.
VERB_MODULES = ["commitfs.cli.core", "commitfs.cli.inspect", "commitfs.cli.mount", "commitfs.cli.workspace",
                "commitfs.cli.remote", "commitfs.cli.lineage", "commitfs.cli.alias", "commitfs.cli.ui",
                "commitfs.cli.find", "commitfs.cli.mounts", "commitfs.cli.shell", "commitfs.cli.merge",
                "commitfs.cli.gc"]


#: Each verb's module: when the command line names a verb, only its module is
#: imported to build the parser (a verb module imports its operations in its
#: handlers), so `commitfs commit` does not pay for diff's, merge's or the
#: mount's imports, and `commitfs mount` is quick on the way to a mount's first
#: `ls`.  Help, --version and an unknown verb build the parser from every module
#: (tests/test_cli.py checks this table against what the modules register).
VERBS = {
    **dict.fromkeys(("init", "commit", "log", "show", "ls", "cat", "branch", "tag", "checkout", "fsck"),
                    "commitfs.cli.core"),
    "diff": "commitfs.cli.inspect", "stats": "commitfs.cli.inspect",
    "mount": "commitfs.cli.mount", "umount": "commitfs.cli.mount",
    "status": "commitfs.cli.workspace", "reset": "commitfs.cli.workspace",
    **dict.fromkeys(("clone", "remote", "push", "pull"), "commitfs.cli.remote"),
    "run": "commitfs.cli.lineage", "lineage": "commitfs.cli.lineage",
    "alias": "commitfs.cli.alias", "ui": "commitfs.cli.ui", "find": "commitfs.cli.find",
    "mounts": "commitfs.cli.mounts", "completion": "commitfs.cli.shell", "merge": "commitfs.cli.merge",
    "gc": "commitfs.cli.gc",
}
_GLOBAL_OPTIONS_WITH_VALUE = ("-r", "--repo", "--endpoint-url")


def verb_modules(argv: list[str]) -> list[str]:
    """The verb modules to build the parser from: the named verb's alone, else
    all (any help before the verb, the version, an unknown verb)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
        elif arg.startswith("-"):
            if arg in ("-h", "--help", "--version"):
                break
            i += 1
        else:
            module = VERBS.get(arg)
            return [module] if module is not None else VERB_MODULES
    return VERB_MODULES


class _GuardedOutput:
    """sys.stdout (and its .buffer) whose failed writes raise OutputError.

    A print to a full disk (``commitfs log > /dev/full``) or a closed
    descriptor fails with an OSError from deep inside a handler; turned into
    an OutputError it becomes the one-line error of every other failure.
    A broken pipe passes through unchanged (main treats it as success)."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write the output: {exc.strerror or exc}") from None

    def write(self, data):
        return self._guard(self._stream.write, data)

    def writelines(self, lines):
        return self._guard(self._stream.writelines, lines)

    def flush(self):
        return self._guard(self._stream.flush)

    @property
    def buffer(self):
        return _GuardedOutput(self._stream.buffer)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Point the stdout descriptor at /dev/null, so that the interpreter's
    final flush of what is still buffered neither fails nor prints."""
    try:
        fd = sys.__stdout__.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def early_mountpoint(argv: list[str]) -> str | None:
    """The MOUNTPOINT of a `commitfs mount` command line, read without argparse (which
    decides: this only lets ``main`` start the daemon first); None for any other
    command line, --help and --foreground, or one it cannot read for sure."""
    i, verb, operands = 0, None, []
    while i < len(argv):
        arg = argv[i]
        i += 1
        if verb is None:
            if arg in _GLOBAL_OPTIONS_WITH_VALUE:
                i += 1
            elif arg in ("-h", "--help", "--version"):
                return None
            elif not arg.startswith("-"):
                if arg != "mount":
                    return None
                verb = arg
        elif arg == "--":
            operands += argv[i:]
            break
        elif arg in _GLOBAL_OPTIONS_WITH_VALUE or arg in _MOUNT_OPTIONS_WITH_VALUE:
            i += 1
        elif arg.startswith("--"):
            if arg in ("--help", "--foreground"):
                return None
        elif arg.startswith("-") and len(arg) > 1:
            if not arg.startswith("-r") and ("h" in arg or "f" in arg):
                return None  # -h, -f, -wf
        else:
            operands.append(arg)
    return operands[-1] if verb and 1 <= len(operands) <= 2 else None


#: `commitfs mount`'s options that take a value (cli/mount.py; tests/test_cli.py
#: checks this against its parser).
_MOUNT_OPTIONS_WITH_VALUE = ("--cache-dir", "--cache-size", "--refresh", "--io-timeout", "--log-file",
                             "--record-reads", "--workspace")


def __getattr__(name: str):
    if name == "build_parser":  # argparse is imported when a command line is parsed (parser.py)
        from commitfs.cli.parser import build_parser

        return build_parser
    raise AttributeError(f"module 'commitfs.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        return _run(argv)
    # The command line of this process (the console script).  `commitfs mount` starts
    # its daemon now, before the parser's imports: the daemon's own imports are most
    # of a mount's start-up (issue 19: mount to first ls).
    argv = sys.argv[1:]
    mountpoint = early_mountpoint(argv)
    if mountpoint is not None:
        from commitfs.fuse.spawn import spawn_early

        spawn_early(mountpoint)
    code = _run(argv)
    if mountpoint is not None and code == 0:
        # The mount is live and this process has nothing left to do: it ends without
        # the interpreter's finalization (30-40 ms of freeing modules, on the way to
        # the first ls), once what it printed is out.  Its repository is closed and
        # it holds no file open for writing.
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            return code
        os._exit(code)
    return code


def _run(argv: list[str]) -> int:
    from commitfs.cli.parser import build_parser

    parser = build_parser(verb_modules(argv))
    args = parser.parse_args(argv)
    real_stdout = sys.stdout
    sys.stdout = _GuardedOutput(real_stdout)
    try:
        _apply_settings(args)
        code = args.handler(args)
        sys.stdout.flush()
        return code or 0
    except UsageError as exc:
        print(f"commitfs: {_one_line(exc)} (see --help)", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"commitfs: {_one_line(exc)}", file=sys.stderr)
        if real_stdout is sys.__stdout__:
            _silence_stdout()
        return 1
    except CommitfsError as exc:
        print(f"commitfs: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("commitfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (commitfs log | head): not an error.
        _silence_stdout()
        return 0
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            _silence_stdout()
            return 0
        raise
    finally:
        sys.stdout = real_stdout


def _apply_settings(args) -> None:
    """Fill what the command line left out: flag > environment > configuration files
    (cli/config.py) > built-in default."""
    from commitfs.cli import config

    settings = config.load()
    if not hasattr(args, "repo"):
        args.repo = config.from_environment_or_file(settings, "repo")
    if not hasattr(args, "endpoint_url"):
        args.endpoint_url = config.value(settings, "endpoint_url")  # None: storage reads the environment
    for key in ("author", "cache_size", "cache_dir"):
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, config.from_environment_or_file(settings, key))


def _one_line(exc: BaseException) -> str:
    """The promise is one line: a message from below (a storage library's) may hold more."""
    return " ".join(str(exc).split()) if "\n" in str(exc) else str(exc)


if __name__ == "__main__":
    sys.exit(main())
