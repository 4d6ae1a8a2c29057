"""The read log of a mount (``commitfs mount --record-reads FILE``): which files were read.

A read-only mount runs in "no-open" mode (docs/SEMANTICS.md): the kernel
opens files without asking the daemon, so the daemon cannot see opens.  It
sees the first READ of each inode (later reads are served from the page
cache), so that is what is recorded: a file is in the log once the command
read at least one byte of it.  A file opened and never read, a stat, a
listing are not reads.  Where the daemon does answer opens (a stock
pyfuse3), the open is recorded as well.

Memory stays bounded: each record is appended to FILE (buffered) as it
happens, with a bounded set of recent records to skip repeats; duplicates
that get past it (a file whose read state was evicted and read again) are
removed by whoever reads the log (ops/readset.py).  One line per record,
``<64 hex file id> <path as a JSON string>``; on a clean unmount the last
line is ``#end``, so a reader can tell a complete log from a cut one.
"""

from __future__ import annotations

import json

END = b"#end\n"
# Records remembered to skip repeats (a bounded set, cleared when full).
_RECENT = 65536


class ReadLog:
    def __init__(self, path: str):
        self._f = open(path, "wb", buffering=1024 * 1024)
        self._recent: set[tuple[bytes, str]] = set()

    def record(self, file_id: bytes, path: str) -> None:
        key = (file_id, path)
        if key in self._recent:
            return
        if len(self._recent) >= _RECENT:
            self._recent.clear()
        self._recent.add(key)
        self._f.write(b"%s %s\n" % (file_id.hex().encode(), json.dumps(path, ensure_ascii=False).encode()))

    def close(self) -> None:
        if not self._f.closed:
            self._f.write(END)
            self._f.close()
