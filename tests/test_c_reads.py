"""READs answered as the C module reads them (issue 19: reads at the storage's speed;
fuse/fastpath.py's engage_reads, commitfs.fuse._noopen's read_answer, vfs/core.py's
FileSystem.read_now): a READ of a file whose bytes are in memory now (a read stream's
part already fetched, chunks in cached pack pages, a small file read whole) is answered
by a plain call from the C module, without pyfuse3's coroutine; anything else (bytes
not in memory, an error) goes to ``read_inode`` as before, which neither schedules the
read twice nor returns anything but verified bytes.

The mounts are ``commitfs mount`` daemons (the ``mounts`` fixture unmounts them); the
counts are the ones the daemon logs at unmount.  ``COMMITFS_C_READS=0`` turns the C
answers off, which the mount test compares against.
"""

from __future__ import annotations

import errno
import os
import random
import re

import pytest
import trio
import trio.testing

from core_fixtures import cli_env, write_file
from mount_fixtures import fs_of, run_commitfs
from test_randread import _committed_weights
from test_vfs import lookup_path_ino
from commitfs.errors import CorruptObjectError
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.pack import pack_key
from commitfs.repo.repository import Repository

pytestmark = pytest.mark.timeout(120)

SIZE = 6 * 1024 * 1024


def _committed(tmp_path, seed: int):
    """A repository with a random ``weights.bin`` and 20 small files: (url, commit, {name: bytes})."""
    rng = random.Random(seed)
    files = {"weights.bin": rng.randbytes(SIZE)}
    files.update({f"img/{i:02d}.jpg": rng.randbytes(rng.randrange(3000, 60000)) for i in range(20)})
    for name, data in files.items():
        write_file(tmp_path / "src" / name, data)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit = commit_directory(repo, tmp_path / "src", message="m").commit_id
    return url, commit, files


def _read_counts(log) -> tuple[int, int, int]:
    """(READs answered in C, offered, refused for an error) from a daemon's log."""
    (m,) = re.findall(r"READs answered from memory as read \(C\): (\d+) of (\d+) offered; "
                      r"refused for an error: (\d+)", log.read_text())
    return tuple(int(x) for x in m)


def _reads(root, files, seed: int) -> dict:
    """Random 4 KiB preads and a whole sequential read of the weights, and every small
    file read whole: what each returned."""
    rng = random.Random(seed)
    out = {}
    fd = os.open(root / "weights.bin", os.O_RDONLY)
    try:
        for _ in range(300):
            off = rng.randrange(SIZE - 4096)
            out["w", off] = os.pread(fd, 4096, off)
    finally:
        os.close(fd)
    out["whole"] = (root / "weights.bin").read_bytes()
    for name in files:
        if name.startswith("img/"):
            out[name] = (root / name).read_bytes()
    return out


def test_reads_answered_in_c_return_the_bytes_pyfuse3s_read_returns(tmp_path, cache_home, mounts):
    """Random reads, a sequential read and whole small files through a mount, with the C
    answers on and off: the same bytes (the files'), and with them on most READs are
    answered in C (none refused); off, none is offered and the daemon says why."""
    url, _, files = _committed(tmp_path, 71)
    expected = _reads(tmp_path / "src", files, 5)
    seen = {}
    for on in (True, False):
        mnt, log = mounts.mountpoint(), tmp_path / f"c{int(on)}.log"
        mounts.mount(url, mnt, "--log-file", str(log), rev="main",
                     env=cli_env(COMMITFS_C_READS="1" if on else "0"))
        seen[on] = _reads(mnt, files, 5)
        assert run_commitfs("umount", str(mnt)).returncode == 0
        answered, offered, refused = _read_counts(log)
        if on:
            # Most READs of the weights' random reads are answered by the page cache (published
            # neighbours, fuse/adapter.py); of those that come, most are answered in C.
            assert refused == 0 and answered > 0 and answered >= offered // 2, (answered, offered)
        else:
            assert (answered, offered, refused) == (0, 0, 0)
            assert "every READ goes through pyfuse3's coroutine (COMMITFS_C_READS=0 is set)" in log.read_text()
    assert seen[True] == expected
    assert seen[False] == expected


def _corrupt_middle_chunk(url: str, commit: bytes) -> tuple[list[int], int]:
    """Flip one byte of the middle chunk of ``weights.bin`` in its pack file: (every
    chunk's file offset and the file's size last, that chunk's index)."""
    with Repository.open(url) as repo:
        manifest = repo.load_manifest(repo.load_tree(repo.load_commit(commit).tree).get("weights.bin").id)
        k = len(manifest.chunk_ids) // 2
        loc = repo.reads.locate(manifest.chunk_ids[k])
        path = repo.store.local_path(pack_key(loc.pack))
    starts = [0]
    for size in manifest.chunk_sizes:
        starts.append(starts[-1] + size)
    with open(path, "r+b") as f:
        f.seek(loc.offset + loc.stored // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    return starts, k


def test_a_corrupt_chunk_is_never_answered_by_read_now_and_reads_as_eio(tmp_path, cache_home, mounts):
    """A chunk altered in its pack, read after the file's read state exists: read_now
    answers None (its part holds an error, not bytes), read_inode raises
    CorruptObjectError; through a mount with the C answers on, the read fails with EIO
    while reads of the intact chunks around it return the right bytes."""
    url, commit, files = _committed(tmp_path, 72)
    data = files["weights.bin"]
    starts, k = _corrupt_middle_chunk(url, commit)
    bad = starts[k] + 10

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                ino = await lookup_path_ino(fs, "weights.bin")
                assert await fs.read_inode(ino, 0, 8192) == data[:8192]
                assert fs.read_now(ino, bad, 4096) is None
                with pytest.raises(CorruptObjectError):
                    await fs.read_inode(ino, bad, 4096)
                good = starts[k + 1] + 100
                got = fs.read_now(ino, good, 4096)
                assert got is None or bytes(got) == data[good:good + 4096]
    trio.run(main)

    mnt, log = mounts.mountpoint(), tmp_path / "m.log"
    mounts.mount(url, mnt, "--log-file", str(log), rev="main", env=cli_env(COMMITFS_C_READS="1"))
    fd = os.open(mnt / "weights.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 8192, 0) == data[:8192]
        for off in (starts[k] - 600 * 1024, starts[k + 1] + 600 * 1024):  # beyond the kernel's read-ahead
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, bad)
        assert err.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert run_commitfs("umount", str(mnt)).returncode == 0
    answered, _, refused = _read_counts(log)
    assert answered > 0 and refused == 0


def test_a_read_read_now_could_not_answer_is_scheduled_once(tmp_path, cache_home):
    """With nothing in memory (every fetch a task), a jump far ahead is scheduled by
    read_now, which answers None, and the read_inode of it that follows waits for the
    same part without classifying the read again; once the first stream's read-ahead
    is fetched, read_now answers its next read.  Each read is counted once."""
    url, commit, files = _committed(tmp_path, 73)
    data = files["weights.bin"]

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                fs.loader.chunks_now = lambda ids: None  # nothing found in memory
                ino = await lookup_path_ino(fs, "weights.bin")
                assert await fs.read_inode(ino, 0, 65536) == data[:65536]
                far = SIZE - 65536
                assert fs.read_now(ino, far, 65536) is None  # its part is a task, not started yet
                assert await fs.read_inode(ino, far, 65536) == data[far:]
                streams = fs._by_inode[ino].streams
                assert len(streams) == 2
                for r in streams:  # every part fetched (a wait on the parts themselves)
                    for part in list(r._live):
                        await part.done.wait()
                got = fs.read_now(ino, 65536, 65536)  # the first stream's read-ahead
                assert got is not None and bytes(got) == data[65536:131072]
                assert sum(r.sequential_reads + r.random_reads for r in streams) == 3
    trio.run(main)


def test_small_files_are_answered_in_c_at_their_first_read(tmp_path, cache_home, mounts):
    """Each small file of a listed directory, read whole for the first time: its one READ
    is answered in C (the file's verified bytes from the packs' page cache), right."""
    url, _, files = _committed(tmp_path, 74)
    small = {n: d for n, d in files.items() if n.startswith("img/")}
    mnt, log = mounts.mountpoint(), tmp_path / "m.log"
    mounts.mount(url, mnt, "--log-file", str(log), rev="main", env=cli_env(COMMITFS_C_READS="1"))
    assert sorted(os.listdir(mnt / "img")) == sorted(n[4:] for n in small)
    for name, data in small.items():
        assert (mnt / name).read_bytes() == data
    assert run_commitfs("umount", str(mnt)).returncode == 0
    answered, offered, refused = _read_counts(log)
    assert answered >= len(small) and answered == offered and refused == 0, (answered, offered)


def test_a_first_read_read_now_missed_does_not_look_in_memory_twice(tmp_path, cache_home):
    """A small file's first read that read_now could not answer from memory (here:
    nothing is) goes to read_inode, which does not look there again: one attempt in
    all, and the right bytes through the read-ahead path."""
    url, commit, files = _committed(tmp_path, 75)
    name = "img/03.jpg"
    data = files[name]

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                attempts = []
                fs.loader.file_now = lambda fid: attempts.append(fid)  # None: not in memory
                ino = await lookup_path_ino(fs, name)
                assert fs.read_now(ino, 0, 1 << 20) is None
                assert bytes(await fs.read_inode(ino, 0, 1 << 20)) == data
                assert len(attempts) == 1
    trio.run(main)


# --- chunk maps: random READs of a large file answered in C alone ---------------------------
BIG = 20 * 1024 * 1024  # past VfsOptions.chunk_map_bytes (16 MiB)


def _map_counts(log) -> tuple[int, int]:
    """(READs answered from chunk maps, READs a map could not answer) from a daemon's log."""
    (m,) = re.findall(r"READs answered from chunk maps \(C\): (\d+); not answerable there: (\d+)", log.read_text())
    return tuple(int(x) for x in m)


def _random_preads(path, seed: int, count: int = 400, avoid=(0, 0)) -> list[tuple[int, bytes]]:
    """``count`` seeded random 4 KiB preads of ``path``, none within ``avoid`` (a range)."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        while len(out) < count:
            off = rng.randrange(BIG - 4096)
            if avoid[0] - 8192 < off < avoid[1] + 8192:
                continue
            out.append((off, os.pread(fd, 4096, off)))
        return out
    finally:
        os.close(fd)


def _first_read(path, data) -> None:
    """A read of the file's start: it makes the file's read state, and with it the chunk
    map (in a worker thread; random reads before it is there go to Python)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]
    finally:
        os.close(fd)


def test_random_reads_of_a_large_file_are_answered_from_its_chunk_map(tmp_path, cache_home, mounts):
    """Random 4 KiB reads of a 20 MiB file through a mount, then a sequential read of it:
    the right bytes, most random reads answered from the file's chunk map in C (none
    refused); with COMMITFS_C_READS=0 none is, and the bytes are the same."""
    url, _, data = _committed_weights(tmp_path, 81, BIG)
    for on in (True, False):
        mnt, log = mounts.mountpoint(), tmp_path / f"m{int(on)}.log"
        mounts.mount(url, mnt, "--log-file", str(log), rev="main", env=cli_env(COMMITFS_C_READS="1" if on else "0"))
        _first_read(mnt / "weights.bin", data)
        for off, got in _random_preads(mnt / "weights.bin", 9):
            assert got == data[off:off + 4096]
        assert (mnt / "weights.bin").read_bytes() == data  # and a sequential read after them
        assert run_commitfs("umount", str(mnt)).returncode == 0
        answered, missed = _map_counts(log)
        if on:
            assert answered > 100 and missed == 0, (answered, missed)
        else:
            assert (answered, missed) == (0, 0)


def test_a_corrupt_chunk_in_a_chunk_map_reads_as_eio(tmp_path, cache_home, mounts):
    """A chunk altered in its pack after the commit: a random read of it through the
    mount fails with EIO (the map's hash check refuses it; the file system's read reports
    it), never wrong bytes, and random reads elsewhere are answered from the map."""
    url, commit, data = _committed_weights(tmp_path, 82, BIG)
    starts, k = _corrupt_middle_chunk(url, commit)
    mnt, log = mounts.mountpoint(), tmp_path / "m.log"
    mounts.mount(url, mnt, "--log-file", str(log), rev="main", env=cli_env(COMMITFS_C_READS="1"))
    _first_read(mnt / "weights.bin", data)
    for off, got in _random_preads(mnt / "weights.bin", 10, count=200, avoid=(starts[k], starts[k + 1])):
        assert got == data[off:off + 4096]
    fd = os.open(mnt / "weights.bin", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, starts[k] + 100)
        assert err.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert run_commitfs("umount", str(mnt)).returncode == 0
    answered, missed = _map_counts(log)
    assert answered > 50 and missed >= 1, (answered, missed)


def test_a_files_chunk_map_is_worked_out_once(tmp_path, cache_home):
    """A large file's chunk map is handed over when its first read state is made, and not
    worked out again for a later read state of the same file while the map is held; what
    is handed over says where each chunk's bytes lie (checked against the pack files)."""
    url, commit, data = _committed_weights(tmp_path, 83, 3 * 1024 * 1024)

    class Maps:  # what fuse/fastpath.py's ChunkMaps offers the file system
        def __init__(self):
            self.held = {}

        def put(self, inode, size, paths, ends, ids, fd_index, offsets):
            self.held[inode] = (size, paths, list(ends), ids, list(fd_index), list(offsets))

        def __contains__(self, inode):
            return inode in self.held

    maps, puts = Maps(), []
    real_put = maps.put
    maps.put = lambda *a: (puts.append(a[0]), real_put(*a))

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit, chunk_map_bytes=1024 * 1024) as fs:
                fs.chunk_maps = maps
                started = []
                real_map_chunks = fs._map_chunks

                async def map_chunks(*args):
                    started.append(args[0])
                    await real_map_chunks(*args)
                fs._map_chunks = map_chunks
                ino = await lookup_path_ino(fs, "weights.bin")
                assert await fs.read_inode(ino, 0, 4096) == data[:4096]
                with trio.fail_after(30):  # a bound on the wait for the worker thread
                    while ino not in maps:
                        await trio.sleep(0.01)
                fs._close(fs._by_inode.pop(ino))  # the read state goes (evicted)
                assert await fs.read_inode(ino, 8192, 4096) == data[8192:12288]
                await trio.testing.wait_all_tasks_blocked()  # any task started by now has run
                assert started == [ino]  # no second map was started for the new read state
                return ino
    ino = trio.run(main)
    assert puts == [ino]
    size, paths, ends, ids, fd_index, offsets = maps.held[ino]
    assert size == len(data) and ends[-1] == len(data) and len(ids) == 32 * len(ends)
    start = 0
    for end, k, off in zip(ends, fd_index, offsets):
        with open(paths[k], "rb") as f:
            f.seek(off)
            assert f.read(end - start) == data[start:end]
        start = end


def test_chunk_maps_keep_to_their_caps(tmp_path):
    """The C module's chunk maps hold at most 256 pack files open (the oldest maps go
    first) and at most 32 MiB of maps (a map past that alone is not kept, and the older
    ones went to make room). In a subprocess: the module joins the global symbol scope of
    the process that loads it."""
    import subprocess
    import sys

    pytest.importorskip("commitfs.fuse._noopen")
    code = (
        "import array, os, sys\n"
        "from commitfs.fuse import _noopen\n"
        "from commitfs.model.ids import HASHER\n"
        "d = sys.argv[1]\n"
        "_noopen.chunk_maps(HASHER)\n"
        "def put(ino, path, n=1):\n"
        "    return _noopen.chunk_map(ino, n, (path,), array.array('Q', range(1, n + 1)), bytes(32 * n),\n"
        "                             array.array('I', [0] * n), array.array('Q', [0] * n))\n"
        "def open_here():\n"
        "    n = 0\n"
        "    for f in os.listdir('/proc/self/fd'):\n"
        "        try:\n"
        "            n += os.readlink('/proc/self/fd/' + f).startswith(d)\n"
        "        except FileNotFoundError:  # listdir's own descriptor, closed by now\n"
        "            pass\n"
        "    return n\n"
        "paths = []\n"
        "for i in range(300):\n"
        "    paths.append(os.path.join(d, 'p%d' % i))\n"
        "    open(paths[-1], 'wb').close()\n"
        "print(all(put(1000 + i, paths[i]) for i in range(300)), open_here(),\n"
        "      sum(_noopen.chunk_mapped(1000 + i) for i in range(300)),\n"
        "      _noopen.chunk_mapped(1000), _noopen.chunk_mapped(1299))\n"
        "print(put(5, paths[0], n=(33 << 20) // 52), _noopen.chunk_mapped(5), _noopen.chunk_mapped(1299), open_here())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env=cli_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["True 256 256 False True", "False False False 0"]
