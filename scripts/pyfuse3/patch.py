#!/usr/bin/env python3
"""Patch an unpacked pyfuse3 source tree so that read() can serve a file opened
without an OPEN request:

    scripts/pyfuse3/patch.py PYFUSE3_SOURCE_DIR

Why: commitfs's read-only mounts answer the first OPEN with ENOSYS; the kernel
then opens every file itself (FUSE's no-open mode: no round trip per open(),
page cache kept), which is what lets a warm re-read run near the speed of a
local disk.  In that mode every READ carries file handle 0, and stock pyfuse3
passes read() only (fh, off, size), dropping the inode libfuse hands it, so the
file system could not tell which file is read.  The patch passes the inode as
the file handle when the kernel sent 0 (a handle pyfuse3 file systems never
see otherwise once they answer OPEN), and marks the module with
``READ_FH_ZERO_IS_INODE = True`` so commitfs can tell the builds apart.
Anything else is pyfuse3 as released.  Fails loudly if the source is not the
one this patch was written for.
"""

from __future__ import annotations

import sys
from pathlib import Path

OLD = """    c.off = off
    c.fh = fi.fh
    save_retval(fuse_read_async(c))
"""
NEW = """    c.off = off
    # commitfs patch: after open() answered ENOSYS the kernel opens files itself
    # and every READ carries file handle 0; pass the inode in its place.
    c.fh = fi.fh if fi.fh != 0 else ino
    save_retval(fuse_read_async(c))
"""
MARKER = "\n# commitfs patch: read() gets the inode as fh when the kernel sent fh 0.\nREAD_FH_ZERO_IS_INODE = True\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    path = Path(argv[0]) / "src" / "pyfuse3" / "handlers.pxi"
    try:
        text = path.read_text()
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    if "READ_FH_ZERO_IS_INODE" in text:
        return 0  # already patched
    if text.count(OLD) != 1:
        print(f"error: {path}: fuse_read is not the code this patch was written for (pyfuse3 3.5.0)",
              file=sys.stderr)
        return 1
    path.write_text(text.replace(OLD, NEW) + MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
