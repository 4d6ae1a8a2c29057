"""The command line: parsing, printing, exit codes.

Exit codes: 0 success, 1 a user-facing error (one line on stderr, never a
traceback), 2 bad usage, 130 interrupted.  Each group of verbs lives in its own
module with ``register(subparsers, common)``; handlers return an int exit code.
"""

from __future__ import annotations

import argparse
import os
import sys

from commitfs.errors import CommitfsError

# Modules defining verbs, in the order --help lists them.
VERB_MODULES = ["commitfs.cli.core", "commitfs.cli.mount", "commitfs.cli.workspace", "commitfs.cli.remote", "commitfs.cli.lineage",
                "commitfs.cli.gc"]


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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-r", "--repo", default=argparse.SUPPRESS,
                        help="repository URL: a path or s3://BUCKET/PREFIX (default: $COMMITFS_REPO)")
    common.add_argument("--endpoint-url", default=argparse.SUPPRESS,
                        help="S3 endpoint URL (default: the AWS configuration)")
    parser = _Parser(prog="commitfs", parents=[common],
                     description="Version ML datasets and model weights as content-addressed commits.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    import importlib

    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name == name:
                continue  # verb group not built yet
            raise
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "repo"):
        args.repo = os.environ.get("COMMITFS_REPO")
    if not hasattr(args, "endpoint_url"):
        args.endpoint_url = None
    try:
        code = args.handler(args)
        sys.stdout.flush()
        return code or 0
    except CommitfsError as exc:
        print(f"commitfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("commitfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (commitfs log | head): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
