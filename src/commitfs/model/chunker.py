"""Content-defined chunking (FastCDC) of file contents.

Parameters (part of the format: changing them changes file manifests, never
file ids, since a file id is the BLAKE3 of its whole content):

* minimum 16 KiB, average 64 KiB, maximum 256 KiB.

Why these: an in-place edit of a large weights file re-stores about the edited
bytes plus one chunk on each side (64 KiB granularity: a 4 MiB edit stores
~4.1 MiB); images of 20-250 KB become one to four chunks, so a read of one
image is one ranged read of a pack; and a 100 TB repository holds about 1.6
billion chunks, which the sharded index (repo/index.py) looks up without
loading.  Larger chunks (restic's 1 MiB) waste more per small edit; smaller
ones (git's packfiles, 8 KiB CDC) multiply per-chunk overhead in Python and
index size.  XetHub settled on the same 64 KiB for ML data.

The chunker streams: files are read in windows and cut points are identical to
chunking the whole file in one go.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from fastcdc import fastcdc

MIN_SIZE = 16 * 1024
AVG_SIZE = 64 * 1024
MAX_SIZE = 256 * 1024

# Bytes read per window; many chunks per read keeps syscall and call overhead low.
_WINDOW = 8 * 1024 * 1024


def _cuts(data: bytes) -> list[tuple[int, int]]:
    if len(data) <= MIN_SIZE:
        return [(0, len(data))] if data else []
    return [(c.offset, c.length) for c in fastcdc(data, MIN_SIZE, AVG_SIZE, MAX_SIZE, fat=False, hf=None)]


def iter_chunks(stream: BinaryIO, window: int = _WINDOW) -> Iterator[bytes]:
    """Yield the content-defined chunks of a binary stream, in order."""
    carry = b""
    while True:
        block = stream.read(window)
        data = carry + block if carry else block
        if not block:
            for off, length in _cuts(data):
                yield data[off:off + length]
            return
        cuts = _cuts(data)
        # The last cut of a window is where the data ended, not a content-defined
        # boundary: carry it into the next window.  FastCDC's cuts depend only
        # on the bytes since the previous cut, so this reproduces whole-file cuts.
        for off, length in cuts[:-1]:
            yield data[off:off + length]
        off, _ = cuts[-1]
        carry = data[off:]


def chunk_bytes(data: bytes) -> list[bytes]:
    """Chunk an in-memory buffer (same cut points as iter_chunks)."""
    return [data[o:o + n] for o, n in _cuts(data)]
