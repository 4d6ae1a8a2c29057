"""The argument parser of the command line (``build_parser``), built from the verb
modules (``commitfs.cli.VERB_MODULES``).  Imported when a command line is parsed, not
with ``commitfs.cli``: `commitfs mount` starts its daemon before it imports argparse
(``commitfs.cli.main``)."""

from __future__ import annotations

import argparse

from commitfs.cli import VERB_MODULES


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
