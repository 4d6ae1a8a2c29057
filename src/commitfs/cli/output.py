"""Printing helpers shared by verb modules: JSON, sizes, progress on a terminal."""

from __future__ import annotations

import json
import sys
import time


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
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None, unit: str = "files"):
        self.label = label
        self.unit = unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done_bytes: int, total_bytes: int, done_items: int = 0, total_items: int = 0) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done_bytes < total_bytes:
            return
        self._last = now
        rate = done_bytes / max(now - self.start, 1e-6)
        frac = done_bytes / total_bytes if total_bytes else 1.0
        bar = "#" * int(frac * 24)
        items = f" {done_items}/{total_items} {self.unit}" if total_items else ""
        sys.stderr.write(f"\r{self.label} [{bar:<24}] {frac:4.0%} {human_size(done_bytes)}"
                         f"/{human_size(total_bytes)}{items} {human_size(int(rate))}/s\033[K")
        sys.stderr.flush()

    def count(self, done_items: int) -> None:
        """Show a running count, while the total is not known yet."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        sys.stderr.write(f"\r{self.label}: {done_items} {self.unit}\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
