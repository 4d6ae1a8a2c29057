"""The command line: parsing, printing, exit codes.

Exit codes: 0 success, 1 a user-facing error (one line on stderr, never a
traceback), 2 bad usage, 130 interrupted.  Each group of verbs lives in its own
module with ``register(subparsers, common)``; handlers return an int exit code.
"""

from __future__ import annotations

import argparse
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


class _Parser(argparse.ArgumentParser):
    _intermixing = False

    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"commitfs: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # A verb's own parser takes options anywhere between its operands
        # (`mount REV --cache-dir DIR MOUNTPOINT`): plain argparse gives up on
        # an optional operand followed by a required one once an option sits
        # between them.  The top-level parser (with subcommands) cannot
        # intermix, and intermixed parsing calls back into this method.
        if (self._subparsers is not None or self._intermixing
                or any(a.nargs in (argparse.REMAINDER, argparse.PARSER) for a in self._actions)):
            return super().parse_known_args(args, namespace)  # `run ... -- COMMAND` too
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(modules: list[str] = VERB_MODULES) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-r", "--repo", default=argparse.SUPPRESS,
                        help="repository URL: a path or s3://BUCKET/PREFIX (default: $COMMITFS_REPO)")
    common.add_argument("--endpoint-url", default=argparse.SUPPRESS,
                        help="S3 endpoint URL (default: the AWS configuration)")
    parser = _Parser(prog="commitfs", parents=[common],
                     description="Version ML datasets and model weights as content-addressed commits.")
    from commitfs import __version__

    parser.add_argument("--version", action="version", version=f"commitfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    import importlib

    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name == name:
                continue  # verb group not built yet
            raise
        module.register(sub, common)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
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
