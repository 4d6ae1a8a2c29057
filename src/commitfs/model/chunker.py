"""Content-defined chunking (FastCDC 2020) of file contents.

Algorithm: FastCDC as published in 2020 (Xia et al., "The Design of Fast
Content-Defined Chunking for Data Deduplication Based Storage Systems"), with
normalised chunking level 1 and the reference gear table, as implemented by
the Rust crate fastcdc (module v2020) and its compiled Python port pyfastcdc.

Parameters (part of the format: changing them changes file manifests and so
file ids): minimum 16 KiB, average parameter 64 KiB, maximum 256 KiB (the
observed mean is about 80 KiB: FastCDC's cut-point skipping adds the minimum).

Why these: an in-place edit of a large weights file re-stores about the edited
bytes plus one chunk on each side (a 4 MiB edit stores ~4.2 MiB); images of
20-250 KB become one to four chunks, so reading one image is one ranged read
of a pack; a CSV append re-stores only its last chunk (compressed); and a
100 TB repository holds about 1.5 billion chunks, which the index
(repo/index.py) looks up without loading.  Larger chunks (restic's 1 MiB)
waste more per small edit; smaller ones multiply per-chunk overhead and index
size.  XetHub settled on the same 64 KiB for ML data.

Chunks are returned as memoryviews of buffers the chunker owns (no copies);
the cutting itself runs without the GIL, so several threads chunk in parallel.
Streams are read in windows and cut exactly as the whole content would be:
a FastCDC cut depends only on the bytes since the previous cut.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import BinaryIO

from pyfastcdc import FastCDC

MIN_SIZE = 16 * 1024
AVG_SIZE = 64 * 1024
MAX_SIZE = 256 * 1024
NORMALIZATION = 1

# Bytes read per window; many chunks per read keeps call overhead low.
_WINDOW = 8 * 1024 * 1024

_local = threading.local()  # FastCDC objects are not safe to share between threads


def _cdc() -> FastCDC:
    cdc = getattr(_local, "cdc", None)
    if cdc is None:
        cdc = _local.cdc = FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                   normalized_chunking=NORMALIZATION)
    return cdc


def cut(data: bytes | bytearray | memoryview) -> list[memoryview]:
    """The chunks of an in-memory buffer, as views into it."""
    view = memoryview(data)
    if len(view) <= MIN_SIZE:
        return [view] if len(view) else []
    return [view[c.offset:c.offset + c.length] for c in _cdc().cut_buf(view)]


def chunk_bytes(data: bytes) -> list[bytes]:
    """The chunks of a buffer as bytes (for tests and small inputs)."""
    return [bytes(c) for c in cut(data)]


def iter_chunk_batches(stream: BinaryIO, window: int = _WINDOW) -> Iterator[list[memoryview]]:
    """Yield the chunks of a binary stream in order, one list per window read."""
    carry = b""
    while True:
        block = stream.read(window)
        data = carry + block if carry else block
        if not block:
            last = cut(data)
            if last:
                yield last
            return
        chunks = cut(data)
        # The last cut of a window is where the data ended, not a content-defined
        # boundary: carry it over into the next window.
        if len(chunks) > 1:
            yield chunks[:-1]
        carry = bytes(chunks[-1])


def iter_chunks(stream: BinaryIO, window: int = _WINDOW) -> Iterator[memoryview]:
    """Yield the chunks of a binary stream in order (views valid while held)."""
    for batch in iter_chunk_batches(stream, window):
        yield from batch
