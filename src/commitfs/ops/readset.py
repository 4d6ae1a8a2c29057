"""Read sets: which files of its inputs a ``commitfs run --record-reads`` read.

Each input mount writes a read log (vfs/readlog.py: one line per first read
of a file, in read order, with repeats).  After the command, ``build``
merges the logs of all inputs into one read set, sorted by (input name,
path) and without repeats, by an external merge sort (runs of at most
``RUN_LINES`` lines sorted in memory, spilled to disk, merged): memory stays
bounded whatever the number of files.  The set is stored as a file object
(chunks and a manifest, like any file in a tree) in the output repository,
and its manifest id goes in the output commit's metadata under
``commitfs.object.readset`` (gc keeps every ``commitfs.object.*`` id
reachable), so a 10M-entry set does not bloat the commit.

The stored form (docs/LINEAGE.md), UTF-8 text::

    commitfs-readset 1\\n
    <input name>\\t<64 hex file id>\\t<path as a JSON string>\\n     (sorted, unique)

Since chunking is deterministic, equal read sets have equal ids: the run
cache uses the id as the read set's key.
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from commitfs.errors import CommitfsError, ReadSetError
from commitfs.model.ids import HEX_SIZE, is_hex
from commitfs.ops.snapshot import store_stream
from commitfs.repo.repository import Repository

HEADER = b"commitfs-readset 1\n"
META_KEY = "commitfs.object.readset"
COUNT_KEY = "lineage.readset.files"
INCOMPLETE_KEY = "lineage.readset.incomplete"
END = b"#end\n"
# Lines sorted in memory at once (about 200 bytes each).
RUN_LINES = 200_000
_LOAD_BATCH = 64  # chunks per load while reading a set


@dataclass(frozen=True, order=True)
class ReadEntry:
    input: str
    path: str
    file_id: bytes

    def to_json(self) -> dict:
        return {"input": self.input, "path": self.path, "id": self.file_id.hex()}


@dataclass
class Built:
    path: str          # the read set, in the stored form, in a temporary file
    files: int
    incomplete: list[str]  # inputs whose log did not end cleanly


def _line(name: str, fid_hex: str, path_json: str) -> bytes:
    return f"{name}\t{fid_hex}\t{path_json}\n".encode()


def _iter_log(path: str, name: str) -> Iterator[tuple[str, str, str]]:
    with open(path, "rb") as f:
        for raw in f:
            if raw == END or not raw.endswith(b"\n"):
                continue
            fid, _, rest = raw.rstrip(b"\n").partition(b" ")
            # (name, path, id): the sort key is the name, then the path (as its JSON text
            # decoded, so that the order is the paths' own)
            yield name, json.loads(rest), fid.decode()


def log_complete(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - len(END)))
            return f.read() == END
    except OSError:
        return False


def build(logs: Mapping[str, str], workdir: str) -> Built:
    """Merge the read logs {input name: log file} into one sorted, unique read set."""
    runs: list[str] = []
    buf: list[tuple[str, str, str]] = []

    def spill() -> None:
        buf.sort()
        fd, run = tempfile.mkstemp(dir=workdir, prefix="run-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for name, p, fid in buf:
                f.write(json.dumps([name, p, fid], ensure_ascii=False) + "\n")
        runs.append(run)
        buf.clear()

    incomplete = []
    for name, log in sorted(logs.items()):
        if not log_complete(log):
            incomplete.append(name)
        if not os.path.exists(log):
            continue
        for item in _iter_log(log, name):
            buf.append(item)
            if len(buf) >= RUN_LINES:
                spill()
    if buf or not runs:
        spill()
    fd, out = tempfile.mkstemp(dir=workdir, prefix="readset-")
    count = 0
    files = [open(r, encoding="utf-8") for r in runs]
    try:
        with os.fdopen(fd, "wb", buffering=1024 * 1024) as dst:
            dst.write(HEADER)
            last = None
            for item in heapq.merge(*(map(lambda ln: tuple(json.loads(ln)), f) for f in files)):
                if item == last:
                    continue
                last = item
                name, p, fid = item
                dst.write(_line(name, fid, json.dumps(p, ensure_ascii=False)))
                count += 1
    finally:
        for f in files:
            f.close()
        for r in runs:
            os.unlink(r)
    return Built(out, count, incomplete)


def store(repo: Repository, path: str) -> bytes:
    """Store the built read set as a file object; its manifest id."""
    with repo.writer() as writer, open(path, "rb") as f:
        fid, _ = store_stream(writer, f)
    return fid


def readset_id(metadata: Mapping[str, str]) -> bytes | None:
    """The read-set id a commit's metadata names, None if none; ReadSetError if malformed."""
    value = metadata.get(META_KEY)
    if value is None:
        return None
    if not (len(value) == HEX_SIZE and is_hex(value)):
        raise ReadSetError(f"{META_KEY} is not a 64 hex digit id: {value[:80]!r}")
    return bytes.fromhex(value.lower())


def _iter_lines(repo: Repository, fid: bytes) -> Iterator[bytes]:
    try:
        manifest = repo.load_manifest(fid, keep=False)
    except CommitfsError as exc:
        raise ReadSetError(f"read set {fid.hex()[:12]} is missing or unreadable: {exc}") from None
    rest = b""
    ids = list(manifest.chunk_ids)
    for start in range(0, len(ids), _LOAD_BATCH):
        try:
            chunks = repo.load_chunks(ids[start:start + _LOAD_BATCH])
        except CommitfsError as exc:
            raise ReadSetError(f"read set {fid.hex()[:12]} is missing or unreadable: {exc}") from None
        data = rest + b"".join(bytes(c) for c in chunks)
        lines = data.split(b"\n")
        rest = lines.pop()
        for ln in lines:
            yield ln
    if rest:
        raise ReadSetError(f"read set {fid.hex()[:12]} is malformed: its last line does not end")


def iter_readset(repo: Repository, fid: bytes) -> Iterator[ReadEntry]:
    """The entries of a stored read set, in order; ReadSetError if it is missing or malformed."""
    lines = _iter_lines(repo, fid)
    first = next(lines, None)
    if first is None or first + b"\n" != HEADER:
        raise ReadSetError(f"read set {fid.hex()[:12]} is malformed: it does not start with {HEADER!r}")
    for n, ln in enumerate(lines, 2):
        try:
            name, fid_hex, path = ln.decode("utf-8").split("\t")
            if not (len(fid_hex) == HEX_SIZE and is_hex(fid_hex)):
                raise ValueError("bad file id")
            p = json.loads(path)
            if not isinstance(p, str):
                raise ValueError("path is not a string")
        except ValueError as exc:
            raise ReadSetError(f"read set {fid.hex()[:12]} is malformed at line {n}: {exc}") from None
        yield ReadEntry(name, p, bytes.fromhex(fid_hex))


def commit_readset(repo: Repository, metadata: Mapping[str, str]) -> Iterator[ReadEntry] | None:
    fid = readset_id(metadata)
    return None if fid is None else iter_readset(repo, fid)


@dataclass
class CommitFiles:
    """The read set of one commit, with the inputs its entries name."""

    commit: bytes
    readset: bytes
    inputs: list
    entries: list[ReadEntry]
    complete: bool

    def to_json(self) -> dict:
        by_name = {i.name: i for i in self.inputs}
        out = []
        for e in self.entries:
            inp = by_name.get(e.input)
            out.append({"input": e.input, "repo": inp.url if inp else None,
                        "commit": inp.commit.hex() if inp else None, "path": e.path, "id": e.file_id.hex()})
        return {"id": self.commit.hex(), "readset": self.readset.hex(), "complete": self.complete, "files": out}


def commit_files(repo: Repository, cid: bytes) -> CommitFiles:
    """The read set a commit names; ReadSetError if it names none, or it is missing or malformed."""
    from commitfs.ops.lineage import parse_lineage

    commit = repo.load_commit(cid)
    fid = readset_id(commit.metadata)
    if fid is None:
        raise ReadSetError(f"commit {cid.hex()[:12]} has no read set (it was not made by `commitfs run "
                           "--record-reads`)")
    entries = list(iter_readset(repo, fid))
    return CommitFiles(cid, fid, parse_lineage(commit.metadata).inputs, entries,
                       INCOMPLETE_KEY not in commit.metadata)
