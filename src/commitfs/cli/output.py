"""Printing helpers shared by verb modules: JSON, sizes, progress on a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def warn(message: str) -> None:
    print(f"commitfs: warning: {message}", file=sys.stderr)


class ProgressBar:
    """A one-line progress display on stderr, only when stderr is a terminal.

    Drawn by tqdm (a small pure-Python library with no dependencies of its
    own): bytes with binary units, the rate, the elapsed time and the ETA,
    and the item count beside them.  Callers report absolute figures; the
    bar is made on the first report, so the total can change (a scan that
    finds more)."""

    def __init__(self, label: str, enabled: bool | None = None, unit: str = "files"):
        self.label = label
        self.unit = unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def _make(self, **kw):
        from tqdm import tqdm

        try:
            size = os.get_terminal_size(sys.stderr.fileno())
            known = size.columns > 0 and size.lines > 0
        except (OSError, ValueError):
            known = False
        # A terminal of unknown size (a pty nobody sized) would get nothing: tqdm
        # hides bars below the last of zero rows.
        shape = {"dynamic_ncols": True} if known else {"ncols": 80, "nrows": 24}
        return tqdm(desc=self.label, file=sys.stderr, leave=False, mininterval=0.1, **shape, **kw)

    def update(self, done_bytes: int, total_bytes: int, done_items: int = 0, total_items: int = 0) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = self._make(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024)
        bar = self._bar
        if bar.total != total_bytes:
            bar.total = total_bytes
        if total_items:
            bar.set_postfix_str(f"{done_items}/{total_items} {self.unit}", refresh=False)
        bar.update(done_bytes - bar.n)

    def count(self, done_items: int) -> None:
        """Show a running count, while the total is not known yet."""
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = self._make(unit=f" {self.unit}")
        self._bar.update(done_items - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def count_of(what: str):
    """An argparse ``type`` for a count of ``what`` (0 or more): anything else is a
    usage error (exit 2) naming what was expected."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            raise argparse.ArgumentTypeError(f"expected a number of {what} (0 or more), got {text!r}")
        return n
    return parse
