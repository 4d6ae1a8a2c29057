"""Reading file contents: offsets to chunks through prefix sums, lazily.

A FileReader answers ``read(offset, size)`` through the manifest's prefix sums
(FileManifest.chunk_range), fetching only the chunks that overlap the range
through the read engine (repo/engine.py: neighbours in a pack coalesced into
one verified ranged read).  FileObject
wraps it as a seekable read-only binary file for the Python API.
"""

from __future__ import annotations

import io

from commitfs.model.objects import FileManifest
from commitfs.repo.repository import Repository


class FileReader:
    def __init__(self, repo: Repository, manifest: FileManifest):
        self.repo = repo
        self.manifest = manifest
        self.ends = manifest.ends
        self.size = manifest.size

    @classmethod
    def open(cls, repo: Repository, file_id: bytes) -> FileReader:
        return cls(repo, repo.load_manifest(file_id))

    def chunk_range(self, offset: int, size: int) -> tuple[int, int]:
        """Indices [first, last) of the chunks overlapping [offset, offset+size)."""
        return self.manifest.chunk_range(offset, size)

    def chunk_start(self, i: int) -> int:
        return self.manifest.chunk_start(i)

    def read(self, offset: int, size: int) -> bytes:
        first, last = self.chunk_range(offset, size)
        if first == last:
            return b""
        chunks = self.repo.load_chunks(list(self.manifest.chunk_ids[first:last]),
                                       sizes=self.manifest.chunk_sizes[first:last])
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        rel = offset - self.chunk_start(first)
        return data[rel:rel + size]

    def iter_chunks(self, batch: int = 64):
        """Every chunk in order, fetched ``batch`` at a time (for checkout, cat)."""
        ids, sizes = self.manifest.chunk_ids, self.manifest.chunk_sizes
        for i in range(0, len(ids), batch):
            yield from self.repo.load_chunks(list(ids[i:i + batch]), sizes=sizes[i:i + batch])


class FileObject(io.RawIOBase):
    """A seekable, read-only binary file over a FileReader."""

    def __init__(self, reader: FileReader, name: str = ""):
        super().__init__()
        self._reader = reader
        self._pos = 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._reader.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        data = self._reader.read(self._pos, len(buf))
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(self._reader.size - self._pos, 0)
        data = self._reader.read(self._pos, size)
        self._pos += len(data)
        return data

    readall = read

    @property
    def size(self) -> int:
        return self._reader.size
