"""Chunk-level copy-on-write in a writable workspace (issue 18): a write into a large
committed file keeps only the written ranges in the overlay, reads merge them with
the base, truncate and append copy nothing, fsync'd ranges survive SIGKILL, and the
commit re-chunks only around the edits yet gives the id a plain directory commit of
the same bytes gives (docs/SEMANTICS.md, "Writable workspaces").

The extent logic (vfs/wscow.py) and the re-chunking (ops/rechunk.py) are tested
without a kernel against a model; the rest on real mounts.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import random
from pathlib import Path

import pytest

from mount_fixtures import run_commitfs
from workspace_fixtures import WS, compare_trees, normalize_modes
from commitfs.model.draft import EditedFile
from commitfs.model.chunker import MAX_SIZE
from commitfs.ops.browse import lookup_path
from commitfs.ops.rechunk import RechunkStats, read_edited_file, store_edited_file
from commitfs.ops.snapshot import commit_directory, store_stream
from commitfs.repo.repository import Repository
from commitfs.vfs.wscow import Cow

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
BIG = 24 * MiB  # the committed file the mounted tests write into


# --- the extents, against a model (no kernel) ------------------------------------------
def _apply(model: bytearray, data: bytearray, cow: Cow, rng: random.Random, size: int) -> int:
    """One random write or truncate, to the model (the file's bytes), the data file's
    bytes and the Cow alike; returns the new size."""
    if rng.random() < 0.75:
        off = rng.randrange(0, size + 3 * MAX_SIZE)
        n = rng.choice([1, 17, 4096, 70_000, 300_000, 2 * MiB])
        buf = rng.randbytes(n)
        for b in (model, data):
            if len(b) < off + n:
                b += bytes(off + n - len(b))
            b[off:off + n] = buf
        cow.add(off, off + n)
        return max(size, off + n)
    s = rng.randrange(0, size + 2 * MAX_SIZE)
    for b in (model, data):
        if s < len(b):
            del b[s:]
        else:
            b += bytes(s - len(b))
    cow.truncate(s)
    return s


def test_incremental_changes_keep_the_stored_rows_equal_to_the_ranges():
    """What a flush stores (``changes``: rows to write, starts to delete) keeps the
    ranges table equal to the ranges after any writes and truncations; a Cow made from stored rows it must clamp stores them again."""
    rng = random.Random(11)
    for _ in range(300):
        until = rng.randrange(1, 5000)
        cow = Cow(b"x", until)
        stored: dict[int, int] = {}
        for _ in range(rng.randrange(1, 40)):
            if rng.random() < 0.85:
                a = rng.randrange(0, 5200)
                cow.add(a, a + rng.randrange(1, 300))
            else:
                cow.truncate(rng.randrange(0, 5200))
            if rng.random() < 0.3:
                put, gone = cow.changes()
                for a in gone:
                    stored.pop(a, None)
                stored.update(put)
                cow.stored()
                assert stored == dict(cow.ranges())
                assert cow.changes() == ([], []) and not cow.dirty
        put, gone = cow.changes()
        for a in gone:
            stored.pop(a, None)
        stored.update(put)
        assert stored == dict(cow.ranges())
    rows = [(0, 10), (20, 40), (50, 60)]
    clamped = Cow(b"x", 30, rows)  # a truncation to 30 reached the data file, not the rows
    assert clamped.ranges() == [(0, 10), (20, 30)] and clamped.dirty
    assert clamped.changes() == ([(20, 30)], [50])
    assert not Cow(b"x", 100, rows).dirty


def test_extents_merge_and_segments_match_a_model():
    rng = random.Random(7)
    for _ in range(300):
        until = rng.randrange(1, 1000)
        cow = Cow(b"x", until)
        written = bytearray(until)  # 1 where a write landed below until
        for _ in range(rng.randrange(0, 12)):
            if rng.random() < 0.85:
                a = rng.randrange(0, 1100)
                b = a + rng.randrange(1, 200)
                cow.add(a, b)
                for p in range(a, min(b, until)):
                    written[p] = 1
            else:
                s = rng.randrange(0, 1100)
                cow.truncate(s)
                if s < until:
                    until = s
                    del written[s:]
        assert cow.until == until
        # Ranges: sorted, disjoint, not touching, exactly the written bytes.
        rs = cow.ranges()
        assert all(a < b for a, b in rs) and all(rs[i][1] < rs[i + 1][0] for i in range(len(rs) - 1))
        assert [p for a, b in rs for p in range(a, b)] == [p for p in range(until) if written[p]]
        a = rng.randrange(0, 1200)
        b = a + rng.randrange(0, 500)
        segs = cow.segments(a, b)
        pos = a
        for s, e, mine in segs:
            assert s == pos and e > s
            for p in range(s, e):
                assert mine == (p >= until or bool(written[p]))
            pos = e
        assert pos == max(a, b) or (a == b and not segs)


# --- re-chunking, against chunking from scratch (no kernel) ----------------------------
@pytest.fixture
def big_repo(tmp_path):
    rng = random.Random(18)
    base = rng.randbytes(8 * MiB)
    with Repository.init(str(tmp_path / "repo")) as repo:
        with repo.writer() as w:
            fid, _ = store_stream(w, io.BytesIO(base))
        yield repo, base, fid


@pytest.mark.parametrize("seed", range(6))
def test_rechunk_gives_the_id_of_chunking_from_scratch(big_repo, tmp_path, seed):
    repo, base, fid = big_repo
    rng = random.Random(seed)
    for trial in range(12):
        model, data, cow = bytearray(base), bytearray(len(base)), Cow(fid, len(base))
        size = len(base)
        for _ in range(rng.randrange(0, 5)):
            size = _apply(model, data, cow, rng, size)
        path = tmp_path / f"data-{seed}-{trial}"
        path.write_bytes(bytes(data))
        f = EditedFile(source=str(path), size=size, base=fid, base_until=cow.until, ranges=tuple(cow.ranges()))
        assert read_edited_file(repo, f) == bytes(model)
        with repo.writer() as w:
            got = store_edited_file(repo, w, f)
            want = store_stream(w, io.BytesIO(bytes(model)))
        assert got == want, (cow.ranges(), cow.until, size)


def test_rechunk_cost_follows_the_edit(tmp_path):
    """A 1 MiB edit in the middle of a 64 MiB file reads and hashes about the edit plus a
    chunk or two on each side, not the file; the other chunks are the base's."""
    rng = random.Random(3)
    base = rng.randbytes(64 * MiB)
    with Repository.init(str(tmp_path / "repo")) as repo:
        with repo.writer() as w:
            fid, _ = store_stream(w, io.BytesIO(base))
        nchunks = len(repo.load_manifest(fid).chunk_ids)
        off, n = 32 * MiB + 12345, MiB
        edited = bytearray(base)
        edited[off:off + n] = rng.randbytes(n)
        data = bytearray(len(base))
        data[off:off + n] = edited[off:off + n]
        (tmp_path / "data").write_bytes(bytes(data))
        f = EditedFile(source=str(tmp_path / "data"), size=len(base), base=fid, base_until=len(base),
                       ranges=((off, off + n),))
        calls = []
        load_chunks = repo.load_chunks

        def counting(ids, *args, **kwargs):
            calls.append(len(ids))
            return load_chunks(ids, *args, **kwargs)
        repo.load_chunks = counting
        stats = RechunkStats()
        with repo.writer() as w:
            got = store_edited_file(repo, w, f, stats)
        repo.load_chunks = load_chunks
        with repo.writer() as w:
            assert got == store_stream(w, io.BytesIO(bytes(edited)))
        # The edit overlaps ~13 chunks of ~80 KiB; the windows add a few on each side.
        assert stats.bytes_hashed <= n + 6 * MAX_SIZE
        assert sum(calls) == stats.base_chunks_read <= n // (16 * 1024) + 12
        assert stats.chunks_reused >= nchunks - 40
        # A file written but not changed in size or bytes outside the ranges: nothing read.
        f0 = EditedFile(source=str(tmp_path / "data"), size=len(base), base=fid, base_until=len(base))
        stats0 = RechunkStats()
        with repo.writer() as w:
            assert store_edited_file(repo, w, f0, stats0) == (fid, len(base))
        assert stats0.base_chunks_read == stats0.bytes_hashed == 0


# --- on a real mount --------------------------------------------------------------------
@pytest.fixture
def cws(tmp_path, mounts) -> WS:
    """A repository whose main holds a BIG-byte random file and a few small ones."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "big.bin").write_bytes(random.Random(1).randbytes(BIG))
    (src / "small.txt").write_bytes(b"small\n" * 100)
    (src / "d" / "other.bin").write_bytes(random.Random(2).randbytes(300_000))
    normalize_modes(src)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        base = commit_directory(repo, src, message="base").commit_id
    return WS(url, src, base, tmp_path, mounts)


def _data_bytes(ws_dir: Path) -> int:
    """Bytes the overlay's data files really hold (allocated blocks)."""
    return sum(e.stat().st_blocks * 512 for e in os.scandir(ws_dir / "data"))


def _commit(cws: WS, mnt: Path, message: str = "edit") -> bytes:
    proc = cws.cli("commit", str(mnt), "-m", message, "--json")
    assert proc.returncode == 0, proc.stderr
    return bytes.fromhex(json.loads(proc.stdout)["id"])


def _plain_id(cws: WS, tree: Path, name: str) -> bytes:
    """The file id of ``tree/name`` committed as a plain directory (another repository)."""
    url = str(cws.tmp / f"plain-{random.random()}")
    with Repository.init(url) as repo:
        cid = commit_directory(repo, tree, message="plain").commit_id
        return lookup_path(repo, cid, name).id


def test_an_edit_in_a_big_file_keeps_only_the_written_ranges(cws):
    mnt = cws.mount()
    ref = cws.reference()
    edits = [(BIG // 2 + 777, MiB), (100, 5000), (BIG - 3000, 3000)]
    rng = random.Random(9)
    for root in (mnt, ref):
        with open(root / "big.bin", "r+b") as f:
            for off, n in edits:
                f.seek(off)
                f.write(random.Random(off).randbytes(n))
    assert (mnt / "big.bin").stat().st_size == BIG
    compare_trees(mnt, ref)
    written = sum(n for _, n in edits)
    held = _data_bytes(cws.tmp / "ws")
    assert held <= 3 * written + 64 * 1024, held  # not the file's 24 MiB
    # st_blocks of the file shows what the overlay holds.
    assert (mnt / "big.bin").stat().st_blocks * 512 <= 3 * written + 64 * 1024
    # Random reads across edit boundaries merge the ranges with the base.
    want = (ref / "big.bin").read_bytes()
    with open(mnt / "big.bin", "rb") as f:
        for _ in range(200):
            off = rng.randrange(0, BIG)
            n = rng.choice([1, 4096, 100_000, 2 * MiB])
            f.seek(off)
            assert f.read(n) == want[off:off + n]
    # The commit is what a plain directory commit of the same bytes is.
    head = _commit(cws, mnt)
    with Repository.open(cws.url) as repo:
        got = lookup_path(repo, head, "big.bin")
        assert got.size == BIG
        assert lookup_path(repo, head, "d").id == lookup_path(repo, cws.base, "d").id
    assert got.id == _plain_id(cws, ref, "big.bin")
    compare_trees(mnt, ref)
    assert _data_bytes(cws.tmp / "ws") == 0  # settled: the overlay holds nothing


def test_truncate_and_append_copy_nothing(cws):
    mnt = cws.mount()
    ref = cws.reference()
    for root in (mnt, ref):
        os.truncate(root / "big.bin", BIG // 3 + 5)
        with open(root / "big.bin", "ab") as f:
            f.write(b"appended" * 1000)
        os.truncate(root / "big.bin", BIG // 3 + 5 + 8000 + 50_000)  # extended: zeros
        with open(root / "big.bin", "r+b") as f:
            f.seek(1000)
            f.write(b"front")
        with open(root / "d" / "other.bin", "ab") as f:  # a plain append to a small file
            f.write(b"tail")
    compare_trees(mnt, ref)
    assert _data_bytes(cws.tmp / "ws") <= 256 * 1024
    cws.umount(mnt)
    mnt = cws.mount()  # the truncations and ranges are in the overlay
    compare_trees(mnt, ref)
    head = _commit(cws, mnt)
    with Repository.open(cws.url) as repo:
        assert lookup_path(repo, head, "big.bin").id == _plain_id(cws, ref, "big.bin")
        assert lookup_path(repo, head, "d/other.bin").id == _plain_id(cws, ref, "d/other.bin")
    compare_trees(mnt, ref)
    # Truncated to zero, then written: no base left.
    for root in (mnt, ref):
        with open(root / "big.bin", "r+b") as f:
            f.truncate(0)
            f.write(b"new content")
    compare_trees(mnt, ref)
    head = _commit(cws, mnt, "zero")
    with Repository.open(cws.url) as repo:
        assert bytes(repo.load_file(lookup_path(repo, head, "big.bin").id)) == b"new content"


def test_fsynced_ranges_survive_a_killed_daemon(cws):
    mnt = cws.mount()
    expected = bytearray(cws.src.joinpath("big.bin").read_bytes())
    rng = random.Random(4)
    fd = os.open(mnt / "big.bin", os.O_RDWR)
    try:
        for i in range(40):
            off = rng.randrange(0, BIG + 100_000)
            buf = rng.randbytes(rng.choice([10, 4096, 65_536, 300_000]))
            os.pwrite(fd, buf, off)
            if len(expected) < off + len(buf):
                expected += bytes(off + len(buf) - len(expected))
            expected[off:off + len(buf)] = buf
            if i % 3 == 0:
                os.fsync(fd)
        os.ftruncate(fd, BIG - 1000)
        del expected[BIG - 1000:]
        os.fsync(fd)
        cws.kill(mnt)  # with the file still open: no flush, no release
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    mnt = cws.mount()
    assert (mnt / "big.bin").read_bytes() == bytes(expected)
    tree = cws.tmp / "expected"
    tree.mkdir()
    (tree / "big.bin").write_bytes(bytes(expected))
    head = _commit(cws, mnt)
    with Repository.open(cws.url) as repo:
        assert lookup_path(repo, head, "big.bin").id == _plain_id(cws, tree, "big.bin")


def test_a_partial_file_is_rebased_onto_a_moved_branch(cws):
    mnt = cws.mount()
    with open(mnt / "big.bin", "r+b") as f:
        f.seek(BIG // 2)
        f.write(b"edited in the workspace")
    # The branch moves meanwhile (another writer changes another file).
    other = cws.tmp / "other"
    import shutil
    shutil.copytree(cws.src, other)
    (other / "small.txt").write_bytes(b"changed elsewhere\n")
    with Repository.open(cws.url) as repo:
        commit_directory(repo, other, message="elsewhere")
    proc = cws.cli("commit", str(mnt), "-m", "rebased", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rebased"]
    expected = bytearray(cws.src.joinpath("big.bin").read_bytes())
    expected[BIG // 2:BIG // 2 + 23] = b"edited in the workspace"
    (other / "big.bin").write_bytes(bytes(expected))
    assert (mnt / "big.bin").read_bytes() == bytes(expected)
    assert (mnt / "small.txt").read_bytes() == b"changed elsewhere\n"
    with Repository.open(cws.url) as repo:
        assert lookup_path(repo, bytes.fromhex(out["id"]), "big.bin").id == _plain_id(cws, other, "big.bin")


def test_an_unlinked_open_partial_file_keeps_its_bytes(cws):
    mnt = cws.mount()
    want = bytearray(cws.src.joinpath("big.bin").read_bytes())
    with open(mnt / "big.bin", "r+b") as f:
        f.seek(5000)
        f.write(b"x" * 10_000)
        want[5000:15000] = b"x" * 10_000
        os.unlink(mnt / "big.bin")
        f.seek(BIG - 10)
        f.write(b"after unlink")
        want[BIG - 10:] = b"after unlink"
        f.seek(0)
        assert f.read() == bytes(want)
    assert not (mnt / "big.bin").exists()


def test_fallocate_answers(cws):
    """pyfuse3 3.5.0 has no fallocate handler: fallocate(2) fails with EOPNOTSUPP (the
    kernel's answer once libfuse says ENOSYS) whatever the mode, and posix_fallocate
    works through glibc's fallback (it writes), as docs/SEMANTICS.md says."""
    mnt = cws.mount()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(mnt / "big.bin", os.O_RDWR)
    try:
        for mode in (0, 1, 3):  # 0; FALLOC_FL_KEEP_SIZE; | FALLOC_FL_PUNCH_HOLE
            assert libc.fallocate(fd, mode, 0, 4096) == -1
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        os.posix_fallocate(fd, BIG, 100_000)
        assert os.fstat(fd).st_size == BIG + 100_000
        assert os.pread(fd, 100_000, BIG) == bytes(100_000)
    finally:
        os.close(fd)


def test_enospc_while_writing_into_a_big_file_loses_nothing_saved(cws, small_tmpfs):
    """The overlay (a 1 MiB tmpfs) is much smaller than the 24 MiB file: in-place writes
    fit (nothing is copied up) until the disk is full, which the writer sees as ENOSPC;
    what was saved is there after a remount."""
    mnt = cws.mounts.mountpoint()
    try:
        _enospc(cws, mnt, small_tmpfs)
    finally:  # before the tmpfs goes
        cws.mounts.cleanup()


def _enospc(cws, mnt, small_tmpfs):
    opts = ("--writable", "--workspace", str(small_tmpfs / "ws"))
    cws.mounts.mount(cws.url, mnt, *opts, rev="main")
    want = bytearray(cws.src.joinpath("big.bin").read_bytes())
    with open(mnt / "big.bin", "r+b") as f:
        f.seek(BIG // 2)
        f.write(b"saved" * 20_000)
        f.flush()
        os.fsync(f.fileno())
    want[BIG // 2:BIG // 2 + 100_000] = b"saved" * 20_000
    fd = os.open(mnt / "big.bin", os.O_RDWR)
    try:
        full = None
        for i in range(64):
            buf = random.Random(i).randbytes(64 * 1024)
            try:
                n = os.pwrite(fd, buf, i * 256 * 1024)
            except OSError as exc:
                full = exc.errno
                break
            want[i * 256 * 1024:i * 256 * 1024 + n] = buf[:n]
        assert full == errno.ENOSPC
        os.fsync(fd)  # what was written is kept (flushing ranges needs no data space)
        assert os.pread(fd, 100_000, BIG // 2) == b"saved" * 20_000
    finally:
        os.close(fd)
    assert (mnt / "big.bin").read_bytes() == bytes(want)
    cws.umount(mnt)
    cws.mounts.mount(cws.url, mnt, *opts, rev="main")
    assert (mnt / "big.bin").read_bytes() == bytes(want)


@pytest.mark.parametrize("seed", range(2))
def test_daemon_killed_while_committing_a_partial_file(cws, seed):
    """Crash recovery understands partial files: killed during the commit, the branch is
    at the old commit with the ranges still pending, or at the new one with none."""
    import subprocess
    import sys
    import time

    rng = random.Random(seed)
    mnt = cws.mount()
    ref = cws.reference()
    for root in (mnt, ref):
        with open(root / "big.bin", "r+b") as f:
            for off in (BIG // 4, BIG // 2, BIG - 100):
                f.seek(off)
                f.write(random.Random(off).randbytes(200_000))
        (root / "small.txt").write_bytes(b"edited\n")
    proc = subprocess.Popen([sys.executable, "-m", "commitfs", "commit", str(mnt), "-m", "killed"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(rng.uniform(0.0, 0.5))
    cws.kill(mnt)
    proc.communicate(timeout=60)
    mnt = cws.mount()
    status = json.loads(cws.cli("status", str(mnt), "--json").stdout)["changes"]
    assert bool(status) == (cws.head() == cws.base)
    compare_trees(mnt, ref)
    if status:
        head = _commit(cws, mnt, "again")
    else:
        head = cws.head()
    with Repository.open(cws.url) as repo:
        assert lookup_path(repo, head, "big.bin").id == _plain_id(cws, ref, "big.bin")
    compare_trees(mnt, ref)
