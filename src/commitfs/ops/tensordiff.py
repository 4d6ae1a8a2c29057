"""Tensor diffs of .safetensors files, from their headers and chunk ids.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
"__metadata__"}), then the tensors' bytes, offsets relative to byte 8 + N.

``diff_safetensors`` reads only the two headers (the first chunk or two of
each version, through the manifests) and decides for each tensor on both
sides whether its bytes changed by comparing the chunk ids covering its byte
range: the same ids, with the tensor starting at the same place in its first
chunk and of the same length, mean the same bytes; no tensor data is read.
Ids are content hashes, so there is no false "unchanged".  A tensor's end
chunks may also hold other bytes (a neighbour that changed, a header that
grew and shifted everything): when the chunks wholly inside the tensor agree
on both sides but the partial chunks at its ends differ, only those ends
(under a chunk each) are read and compared; a tensor under 512 KiB lying in
no whole chunk is compared by its bytes in that case.  So the bytes read are
the headers plus at most two chunks per tensor next to a real change.

``values=True`` reads the changed tensors of unchanged dtype and shape from
both sides and reports the maximum absolute difference and the relative L2
norm ||new - old|| / ||old|| (numpy, the optional extra ``tensors``), in
8 MiB slices so that a multi-GB tensor is never held whole.

A file whose header does not parse is reported as a plain binary change
(``binary=True``) with the reason.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, TensorHeaderError
from commitfs.model.objects import EMPTY_MANIFEST, TreeEntry
from commitfs.repo.repository import Repository

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# A header larger than this is not a real one (the format's own limit is 100 MB).
MAX_HEADER = 100 * 1000 * 1000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int   # absolute byte range in the file
    end: int


@dataclass
class TensorChange:
    name: str
    status: str                      # "added", "removed", "changed"
    old: TensorInfo | None
    new: TensorInfo | None
    dtype_changed: bool = False
    shape_changed: bool = False
    bytes_changed: bool = False
    #: values=True, same dtype and shape:
    max_abs_diff: float | None = None
    rel_l2: float | None = None
    bytes_equal: bool | None = None

    def to_json(self) -> dict:
        def side(t):
            return None if t is None else {"dtype": t.dtype, "shape": list(t.shape), "bytes": t.end - t.start}

        out = {"name": self.name, "status": self.status, "old": side(self.old), "new": side(self.new),
               "dtype_changed": self.dtype_changed, "shape_changed": self.shape_changed,
               "bytes_changed": self.bytes_changed}
        if self.bytes_equal is not None or self.max_abs_diff is not None:
            out.update(max_abs_diff=self.max_abs_diff, rel_l2=self.rel_l2, bytes_equal=self.bytes_equal)
        return out


@dataclass
class TensorDiff:
    changes: list[TensorChange] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    metadata_changed: bool = False
    #: The header did not parse on a side: a plain binary change, ``reason`` says why.
    binary: bool = False
    reason: str | None = None
    #: Chunk bytes read (headers, and with values=True the changed tensors).
    bytes_read: int = 0

    @property
    def counts(self) -> dict[str, int]:
        out = {"added": 0, "removed": 0, "changed": 0, "unchanged": len(self.unchanged)}
        for c in self.changes:
            out[c.status] += 1
        return out

    def to_json(self) -> dict:
        return {"binary": self.binary, "reason": self.reason, "counts": self.counts,
                "metadata_changed": self.metadata_changed, "changes": [c.to_json() for c in self.changes],
                "unchanged": self.unchanged, "bytes_read": self.bytes_read}


class _File:
    def __init__(self, repo: Repository, entry: TreeEntry | None, stats: list):
        self.repo = repo
        m = repo.load_manifest(entry.id) if entry is not None else EMPTY_MANIFEST
        self.manifest = m
        self.ids = m.chunk_ids
        self.size = m.size
        self._stats = stats

    def chunk_span(self, start: int, end: int) -> tuple[int, int]:
        return self.manifest.chunk_range(start, end - start)

    def chunk_start(self, i: int) -> int:
        return self.manifest.chunk_start(i)

    def read(self, start: int, end: int) -> bytes:
        i1, i2 = self.chunk_span(start, min(end, self.size))
        if i1 == i2:
            return b""
        data = self.repo.load_chunks(list(self.ids[i1:i2]))
        self._stats[0] += sum(len(d) for d in data)
        joined = b"".join(data)
        base = self.chunk_start(i1)
        return joined[start - base:end - base]

    def header(self) -> tuple[dict[str, TensorInfo], dict]:
        if self.size < 8:
            raise TensorHeaderError(f"{self.size} bytes: too short for a safetensors header")
        # The first chunk holds the length and usually the whole header.
        first = self.repo.load_chunks([self.ids[0]])[0]
        self._stats[0] += len(first)
        (n,) = struct.unpack("<Q", bytes(first[:8]))
        if n > MAX_HEADER or 8 + n > self.size:
            raise TensorHeaderError(f"header length {n} does not fit the file ({self.size} bytes)")
        raw = bytes(first[8:8 + n])
        if len(raw) < n:
            raw += self.read(len(first), 8 + n)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise TensorHeaderError(f"header is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise TensorHeaderError("header is not a JSON object")
        base, data_size = 8 + n, self.size - 8 - n
        tensors: dict[str, TensorInfo] = {}
        meta = doc.get("__metadata__") or {}
        for name, t in doc.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, e) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
            except (TypeError, KeyError, ValueError) as exc:
                raise TensorHeaderError(f"tensor {name!r}: malformed entry ({exc})") from None
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, b, e)) or not 0 <= b <= e <= data_size:
                raise TensorHeaderError(f"tensor {name!r}: offsets [{b}, {e}] or shape {list(shape)} are invalid")
            width = DTYPE_SIZES.get(dtype)
            count = 1
            for d in shape:
                count *= d
            if width is not None and count * width != e - b:
                raise TensorHeaderError(f"tensor {name!r}: {dtype}{list(shape)} needs {count * width} bytes, "
                                        f"its offsets give {e - b}")
            tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e)
        return tensors, meta

    def covering(self, t: TensorInfo) -> tuple:
        """What decides a tensor's bytes: covering chunk ids, offset in the first, length."""
        i1, i2 = self.chunk_span(t.start, t.end)
        return tuple(self.ids[i1:i2]), t.start - self.chunk_start(i1) if i1 < i2 else 0, t.end - t.start

    def interior(self, t: TensorInfo) -> tuple[tuple, int, int]:
        """The chunks wholly inside a tensor as (id, offset from the tensor's
        start), and the byte range [head_end, tail_start) they span."""
        i1, i2 = self.chunk_span(t.start, t.end)
        inner = [i for i in range(i1, i2) if self.chunk_start(i) >= t.start and self.manifest.ends[i] <= t.end]
        if not inner:
            return (), t.end, t.end
        return (tuple((self.ids[i], self.chunk_start(i) - t.start) for i in inner),
                self.chunk_start(inner[0]), self.manifest.ends[inner[-1]])


# A tensor within no whole chunk, but this small, is compared by its bytes
# when its covering chunks differ (it shares them with changed bytes).
_SMALL = 512 * 1024


def _same_bytes(old: _File, a: TensorInfo, new: _File, b: TensorInfo) -> bool:
    """Whether two tensors' bytes are equal, by chunk ids; only where the
    chunks wholly inside both agree but the partial chunks at the ends differ
    (shared with a changed neighbour or header) are those ends read."""
    if a.end - a.start != b.end - b.start:
        return False
    if old.covering(a) == new.covering(b):
        return True
    ia, ha, ta = old.interior(a)
    ib, hb, tb = new.interior(b)
    if ia != ib:
        return False
    if not ia:
        return a.end - a.start <= _SMALL and old.read(a.start, a.end) == new.read(b.start, b.end)
    return (old.read(a.start, ha) == new.read(b.start, hb)
            and old.read(ta, a.end) == new.read(tb, b.end))


def diff_safetensors(repo: Repository, old_entry: TreeEntry | None, new_entry: TreeEntry | None, *,
                     values: bool = False) -> TensorDiff:
    """Tensors added, removed and changed (dtype, shape, bytes) between two
    versions of a safetensors file (see the module's docstring)."""
    stats = [0]
    out = TensorDiff()
    old, new = _File(repo, old_entry, stats), _File(repo, new_entry, stats)
    try:
        try:
            ta, ma = old.header() if old_entry is not None else ({}, {})
        except TensorHeaderError as exc:
            out.binary, out.reason = True, f"old side: {exc}"
            return out
        try:
            tb, mb = new.header() if new_entry is not None else ({}, {})
        except TensorHeaderError as exc:
            out.binary, out.reason = True, f"new side: {exc}"
            return out
        out.metadata_changed = ma != mb
        for name in sorted(ta.keys() | tb.keys()):
            a, b = ta.get(name), tb.get(name)
            if a is None:
                out.changes.append(TensorChange(name, "added", None, b))
                continue
            if b is None:
                out.changes.append(TensorChange(name, "removed", a, None))
                continue
            c = TensorChange(name, "changed", a, b, dtype_changed=a.dtype != b.dtype, shape_changed=a.shape != b.shape,
                             bytes_changed=not _same_bytes(old, a, new, b))
            if not (c.dtype_changed or c.shape_changed or c.bytes_changed):
                out.unchanged.append(name)
                continue
            if values and not (c.dtype_changed or c.shape_changed):
                _compare_values(c, old, new)
            out.changes.append(c)
        return out
    finally:
        out.bytes_read = stats[0]


# --values reads a tensor in slices of this many bytes: memory stays bounded
# for a multi-GB tensor (each slice is also held as float64, 2-8x its size).
_VALUE_SLICE = 8 * 1024 * 1024


def _compare_values(c: TensorChange, old: _File, new: _File) -> None:
    """Max abs difference and relative L2 of a changed tensor (same dtype and
    shape), read slice by slice."""
    try:
        import numpy as np
    except ImportError:
        raise CommitfsError("comparing tensor values needs numpy (pip install 'commitfs[tensors]')") from None
    kinds = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
             "BOOL": np.bool_}
    dtype = c.old.dtype
    width = DTYPE_SIZES.get(dtype, 1)
    step = max(width, _VALUE_SLICE - _VALUE_SLICE % width)
    a, b = c.old, c.new
    equal, max_abs, sq_diff, sq_old = True, 0.0, 0.0, 0.0
    numeric = dtype == "BF16" or dtype in kinds
    for off in range(0, a.end - a.start, step):
        n = min(step, a.end - a.start - off)
        xa, xb = old.read(a.start + off, a.start + off + n), new.read(b.start + off, b.start + off + n)
        if xa == xb:
            if numeric:
                sq_old += float(np.sum(np.square(_as_float(np, xa, dtype, kinds))))
            continue
        equal = False
        if not numeric:
            continue
        x, y = _as_float(np, xa, dtype, kinds), _as_float(np, xb, dtype, kinds)
        d = y - x
        max_abs = max(max_abs, float(np.max(np.abs(d))) if d.size else 0.0)
        sq_diff += float(np.sum(np.square(d)))
        sq_old += float(np.sum(np.square(x)))
    c.bytes_equal = equal
    if not numeric:
        return  # FP8 and unknown dtypes: bytes_equal only
    c.max_abs_diff = max_abs
    norm = sq_old ** 0.5
    c.rel_l2 = (sq_diff ** 0.5) / norm if norm else (0.0 if not sq_diff else float("inf"))


def _as_float(np, raw: bytes, dtype: str, kinds: dict):
    if dtype == "BF16":  # bfloat16: the high half of a float32
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(raw, np.dtype(kinds[dtype]).newbyteorder("<")).astype(np.float64)
