"""Chunk-level copy-on-write of a committed file in a workspace: a base file plus written ranges.

Design
------
The first write into a committed file does not copy it.  The file gets a
data file in the overlay (``data/<id>``, vfs/overlay.py) of the file's
logical size, sparse: it holds only the bytes written since, at their own
offsets.  A ``Cow`` says where the rest comes from:

* ``base``: the committed file's id (its bytes are read through the read-only
  mount's read engine, verified, lazily: the loader and the prefetcher);
* ``until``: the base shows through only below this offset.  It starts at the
  base's size; a truncate below it lowers it (a truncate never raises it:
  bytes past a truncation read as zeros, as on any file system);
* ``ranges``: the written ranges below ``until``, sorted, disjoint and not
  touching (neighbours merge), as two parallel lists of starts and ends.

A byte at offset ``p`` of the file (``p`` below its size) is the data file's
when ``p`` is in a range or at or above ``until`` (appended bytes, the zeros
of an extension: the data file's holes read as zeros), else the base's.  So
truncate and append copy nothing, and the overlay holds about what was
written.

Persistence: ``base`` and ``until`` are columns of the node's row, the ranges
rows of the overlay's ``ranges`` table (vfs/overlay.py, docs/FORMAT.md).  A
write changes only the in-memory ranges (``dirty``), and remembers the starts
of the ranges it made or merged away (``touched``); the workspace writes the
rows of those starts only (``changes``: the ranges to write, the starts to
delete), so a flush costs what changed since the last one, not the file's
whole list of ranges.  It writes them at flush, release and fsync (in a
worker thread), always after an fdatasync of the data file, so no row is
durable before its bytes; a truncate deletes the rows it cut at once (after
the data file's ftruncate) and leaves the rows it clipped to the next flush.
A range whose row was
not written yet when the daemon died reads as the base again: fsync'd ranges
are never lost (tests/test_workspace_cow.py).

The commit (ops/rechunk.py) re-chunks only around the ranges and reuses the
base's other chunks.
"""

from __future__ import annotations

import bisect


class Cow:
    """Where a partially written committed file's bytes come from (see the module doc)."""

    __slots__ = ("base", "until", "starts", "ends", "dirty", "touched")

    def __init__(self, base: bytes, until: int, ranges=()):
        """``ranges``: as stored (the ranges table's rows); a row this makes
        differently (clamped to ``until``, merged) is written again at the next flush."""
        self.base = base
        self.until = until
        self.starts: list[int] = []
        self.ends: list[int] = []
        #: Starts whose rows differ from what is stored (written or deleted at the next flush).
        self.touched: set[int] = set()
        ranges = list(ranges)
        for a, b in ranges:
            self.add(a, b)
        now = dict(zip(self.starts, self.ends))
        self.touched = {a for a, b in ranges if now.get(a) != b}
        self.dirty = bool(self.touched)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))

    def changes(self) -> tuple[list[tuple[int, int]], list[int]]:
        """What to store since the last ``stored``: (ranges to write, starts to delete)."""
        put: list[tuple[int, int]] = []
        gone: list[int] = []
        starts, ends = self.starts, self.ends
        for a in sorted(self.touched):
            i = bisect.bisect_left(starts, a)
            if i < len(starts) and starts[i] == a:
                put.append((a, ends[i]))
            else:
                gone.append(a)
        return put, gone

    def stored(self) -> None:
        """The rows ``changes`` named are stored."""
        self.touched = set()
        self.dirty = False

    def add(self, a: int, b: int) -> None:
        """Bytes [a, b) were written into the data file."""
        b = min(b, self.until)
        if a >= b:
            return
        starts, ends = self.starts, self.ends
        if ends and ends[-1] == a:  # the common case: a sequential writer
            ends[-1] = b
            self.touched.add(starts[-1])
            self.dirty = True
            return
        i = bisect.bisect_left(ends, a)  # the first range ending at or after a
        j = bisect.bisect_right(starts, b)  # ranges [i, j) touch [a, b)
        if i < j:
            a = min(a, starts[i])
            b = max(b, ends[j - 1])
            self.touched.update(starts[i:j])
        starts[i:j] = [a]
        ends[i:j] = [b]
        self.touched.add(a)
        self.dirty = True

    def truncate(self, size: int) -> None:
        """The file was truncated to ``size`` bytes: the base shows through below it only."""
        if size >= self.until:
            return
        self.until = size
        i = bisect.bisect_left(self.starts, size)
        self.touched.update(self.starts[i:])
        del self.starts[i:], self.ends[i:]
        if self.ends and self.ends[-1] > size:
            self.ends[-1] = size
            self.touched.add(self.starts[-1])
        self.dirty = True

    def copy(self) -> Cow:
        """The same ranges, with what is not stored yet (a change tried on the copy first)."""
        c = Cow(self.base, self.until)
        c.starts, c.ends = list(self.starts), list(self.ends)
        c.touched, c.dirty = set(self.touched), self.dirty
        return c

    def segments(self, a: int, b: int) -> list[tuple[int, int, bool]]:
        """[a, b) as (start, end, from the data file) pieces, in order."""
        out: list[tuple[int, int, bool]] = []
        starts, ends, until = self.starts, self.ends, self.until
        i = bisect.bisect_right(ends, a)  # the first range ending after a
        p = a
        while p < b:
            if p >= until:
                out.append((p, b, True))
                break
            if i < len(starts) and starts[i] <= p:
                e = min(ends[i], b)
                out.append((p, e, True))
                i += 1
            else:
                e = min(b, until, starts[i] if i < len(starts) else b)
                out.append((p, e, False))
            p = e
        return out
