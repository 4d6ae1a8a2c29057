"""The file-system core without a kernel: its methods called directly under trio."""

from __future__ import annotations

import os
import random
import stat

import pytest
import trio
import trio.testing

from core_fixtures import faulty_repository, write_file
from mount_fixtures import fs_of, vfs_listdir, vfs_read_all, vfs_walk
from commitfs.errors import (
    CorruptObjectError,
    IsADirectoryError_,
    NotADirectoryError_,
    PathNotFoundError,
    StorageError,
    StorageTimeoutError,
)
from commitfs.model.objects import EMPTY_MANIFEST, Commit, Kind, Tree, TreeEntry
from commitfs.ops.browse import lookup_path
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.pack import pack_key
from commitfs.repo.repository import Repository
from commitfs.vfs import ROOT_INODE, XATTR_COMMIT, XATTR_ID, XATTR_REPO
from commitfs.vfs import core as vfs_core
from commitfs.vfs.errors import NoSuchAttributeError, ReadOnlyError
from commitfs.vfs.inode import ChildBlock, RootDir, TreeInodeTable


async def lookup_path_ino(fs, path: str) -> int:
    ino = ROOT_INODE
    for part in [p for p in path.split("/") if p]:
        ino = (await fs.lookup(ino, part.encode())).ino
    return ino


def test_walk_of_a_commit_equals_its_source(dataset):
    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                assert await vfs_walk(fs) == dataset.picture
    trio.run(main)


def test_attributes_modes_and_times(dataset):
    async def main():
        with Repository.open(dataset.url) as repo:
            commit = repo.load_commit(dataset.commit)
            async with fs_of(repo, dataset.commit) as fs:
                root = await fs.getattr(ROOT_INODE)
                assert stat.S_IMODE(root.mode) == 0o555 and stat.S_ISDIR(root.mode)
                run = await fs.getattr(await lookup_path_ino(fs, "fixed/run.sh"))
                assert run.mode == stat.S_IFREG | 0o555
                big = await fs.getattr(await lookup_path_ino(fs, "fixed/big.bin"))
                assert big.mode == stat.S_IFREG | 0o444 and big.size == 3 << 20
                link = await fs.getattr(await lookup_path_ino(fs, "fixed/link-to-big"))
                assert stat.S_ISLNK(link.mode) and link.size == len("big.bin")
                assert {root.mtime_ns, run.mtime_ns, link.mtime_ns} == {commit.time * 10**9}
                assert big.entry_timeout >= 3600 and big.attr_timeout >= 3600
    trio.run(main)


def test_lookup_errors(dataset):
    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                with pytest.raises(PathNotFoundError):
                    await fs.lookup(ROOT_INODE, b"no-such-name")
                with pytest.raises(PathNotFoundError):
                    await fs.lookup(ROOT_INODE, b"\xff\xfe")  # not UTF-8: cannot be in a tree
                fixed = await lookup_path_ino(fs, "fixed")
                assert (await fs.lookup(fixed, b".")).ino == fixed
                assert (await fs.lookup(fixed, b"..")).ino == ROOT_INODE
                big = await lookup_path_ino(fs, "fixed/big.bin")
                with pytest.raises(NotADirectoryError_):
                    await fs.lookup(big, b"x")
                with pytest.raises(NotADirectoryError_):
                    await fs.opendir(big)
                with pytest.raises(IsADirectoryError_):
                    await fs.open(ROOT_INODE, os.O_RDONLY)
    trio.run(main)


def test_inode_numbers_are_stable_and_the_table_shrinks(dataset):
    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                assert len(fs.table) == 1
                fixed = await fs.lookup(ROOT_INODE, b"fixed")
                again = await fs.lookup(ROOT_INODE, b"fixed")
                assert fixed.ino == again.ino
                listed = dict(await vfs_listdir(fs, fixed.ino))  # counts one reference per entry
                big = await fs.lookup(fixed.ino, b"big.bin")
                assert listed["big.bin"].ino == big.ino
                assert listed["copy-of-big.bin"].ino != big.ino  # same content, another path: another inode
                assert len(fs.table) == 1 + 1 + len(listed)
                # The kernel forgets: 2 lookups of fixed, 1 readdir + 1 lookup of big.bin, 1 of the others.
                fs.forget([(fixed.ino, 2), (big.ino, 2)])
                fs.forget([(a.ino, 1) for name, a in listed.items() if name != "big.bin"])
                assert len(fs.table) == 1
                fs.forget([(12345, 1), (ROOT_INODE, 5)])  # unknown and root: ignored, never raises
                assert len(fs.table) == 1
                # A new lookup gives a new number: the old ones are never reused.
                assert (await fs.lookup(ROOT_INODE, b"fixed")).ino > max(a.ino for a in listed.values())
    trio.run(main)


def test_the_blocks_of_inode_numbers_stay_right_through_a_forget_storm():
    """The blocks of numbers of commit directories' files (vfs/inode.py), driven
    against a model: many blocks reserved, their entries counted and forgotten in
    random order, new ones reserved meanwhile (a forget storm after ``ls -R``
    while another listing runs).  Every number the kernel holds is located in
    its block at its position, every other one is unknown, the table's length
    is what the kernel holds, and a dropped block's slots do not pile up."""
    rng = random.Random(7)
    table = TreeInodeTable(RootDir(1.0, 1.0))
    held: dict[int, tuple[ChildBlock, int, int]] = {}  # ino -> (block, pos, count)
    gone: list[int] = []
    dirs = []

    def reserve(k: int) -> None:
        for _ in range(k):
            d = table.ensure(table.root, f"d{len(dirs)}", ("d",), lambda: RootDir(1.0, 1.0))
            table.remember(d)
            dirs.append(d)
            count = rng.randint(0, 600)
            b = table.block(d, count)
            for pos in rng.sample(range(count), min(count, rng.randint(1, 3))):
                n = rng.randint(1, 3)
                b.remember(pos, 1, pos * 10, n)
                held[b.base + pos] = (b, pos, n)
            table.discard_block(b)  # (a block none of whose numbers were handed out)

    def check() -> None:
        assert len(table) == 1 + len(dirs) + len(held)
        for ino, (b, pos, _) in rng.sample(sorted(held.items()), min(200, len(held))):
            assert table.locate(ino) == (b, pos) and ino in table and b.size(pos) == pos * 10
        for ino in rng.sample(gone, min(200, len(gone))):
            assert table.locate(ino) is None and ino not in table
        live = len({id(b) for b, _, _ in held.values()})
        assert len(table._block_list) <= 2 * live + 17

    reserve(3000)
    check()
    while held:
        for ino in rng.sample(sorted(held), min(len(held), rng.randint(1, 400))):
            b, pos, n = held[ino]
            m = rng.randint(1, n)
            table.forget(ino, m)
            if m == n:
                del held[ino]
                gone.append(ino)
            else:
                held[ino] = (b, pos, n - m)
        if rng.random() < 0.3 and len(dirs) < 4000:
            reserve(rng.randint(1, 50))
        check()
    assert not table._blocks and not table._block_list and len(table) == 1 + len(dirs)


def test_readdir_counts_only_accepted_entries(dataset):
    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                fixed = (await fs.lookup(ROOT_INODE, b"fixed")).ino
                fh = await fs.opendir(fixed)
                offered = []

                def reply(name, attr, next_id):
                    offered.append((name, attr.ino, next_id))
                    return len(offered) <= 2  # the third entry does not fit

                await fs.readdir(fh, 0, reply)
                assert len(offered) == 3 and [o[2] for o in offered] == [1, 2, 3]
                assert offered[0][1] in fs.table and offered[1][1] in fs.table
                assert offered[2][1] not in fs.table  # refused: not counted, dropped
                rest = []
                await fs.readdir(fh, 2, lambda n, a, i: rest.append(n) or True)
                await fs.releasedir(fh)
                tree = repo.load_tree(lookup_path(repo, dataset.commit, "fixed").id)
                names = [e.name.encode() for e in tree.entries]
                assert [o[0] for o in offered[:2]] + rest == names
    trio.run(main)


def test_reads_at_random_offsets_and_read_ahead(dataset):
    data = (dataset.src / "fixed" / "big.bin").read_bytes()

    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                ino = await lookup_path_ino(fs, "fixed/big.bin")
                fh = await fs.open(ino, os.O_RDONLY)
                rng = random.Random(7)
                for _ in range(50):
                    off = rng.randrange(len(data) + 10)
                    size = rng.choice([1, 100, 4096, 131072, 1 << 20])
                    assert await fs.read(fh, off, size) == data[off:off + size]
                reader = await fs.reader(fh)
                assert reader.random_reads > 0
                await fs.release(fh)
                # Sequential reads grow the window.
                fh = await fs.open(ino, os.O_RDONLY)
                reader = await fs.reader(fh)
                off = 0
                while off < len(data):
                    assert await fs.read(fh, off, 131072) == data[off:off + 131072]
                    off += 131072
                assert reader.random_reads == 0 and reader.window == reader.max_window
                # Fewer fetches than reads: read-ahead fetched parts of several chunks.
                assert reader.parts_started < len(data) // 131072
                await fs.release(fh)
    trio.run(main)


def test_lazy_loading_and_reads_fetch_only_what_they_need(dataset):
    """Mounting and listing the root load one commit and one tree; a first open starts
    the initial window from offset 0; a read loads its chunks only."""
    data = (dataset.src / "fixed" / "big.bin").read_bytes()

    async def main():
        repo = faulty_repository(dataset.url)  # nothing of a FaultyStore is in memory: every fetch is a call
        fetched: list[list[bytes]] = []
        load_chunks = repo.load_chunks

        def recording(ids):
            fetched.append(list(ids))
            return load_chunks(ids)

        repo.load_chunks = recording
        try:
            async with fs_of(repo, dataset.commit) as fs:
                assert repo.store.calls["load_range"] == 0  # the commit only (load_object)
                await vfs_listdir(fs, ROOT_INODE)
                assert repo.store.calls["load_range"] == 1  # + the root tree
                ino = await lookup_path_ino(fs, "fixed/big.bin")
                assert repo.store.calls["load_range"] == 2 and fetched == []  # + the tree of fixed/
                manifest = repo.load_manifest(lookup_path(repo, dataset.commit, "fixed/big.bin").id)
                ends = [sum(manifest.chunk_sizes[:i + 1]) for i in range(len(manifest.chunk_ids))]
                window = fs.options.initial_window
                starts = [0, *ends[:-1]]
                primed = [cid for cid, start in zip(manifest.chunk_ids, starts) if start < window]
                assert 1 < len(primed) < len(ends)
                # The first open fetches the initial window; the read from 0 uses it.
                fh = await fs.open(ino, os.O_RDONLY)
                assert await fs.read(fh, 0, 100) == data[:100]
                assert fetched == [primed]
                await fs.release(fh)
                # A later open starts nothing, not even a load of the manifest (the
                # kernel keeps what it read; the manifest is evicted here to see that);
                # a read in the middle loads it and fetches the one chunk it needs.
                fetched.clear()
                fs.loader._manifests.cache.clear()
                loads = fs.loader.inline + fs.loader.in_threads
                fh = await fs.open(ino, os.O_RDONLY)
                assert fs.loader.inline + fs.loader.in_threads == loads
                k = len(ends) // 2
                off = ends[k - 1] + 10  # inside chunk k
                assert await fs.read(fh, off, 100) == data[off:off + 100]
                assert fetched == [[manifest.chunk_ids[k]]]
                # A read across a chunk boundary: both chunks, in one call.
                fetched.clear()
                assert await fs.read(fh, ends[k + 5] - 50, 100) == data[ends[k + 5] - 50:ends[k + 5] + 50]
                assert fetched == [[manifest.chunk_ids[k + 5], manifest.chunk_ids[k + 6]]]
                await fs.release(fh)
        finally:
            repo.close()
    trio.run(main)


def test_bytes_in_memory_are_served_on_the_event_loop(dataset):
    """A local repository's pages in the page cache are read without a worker thread
    (reads from memory): the same bytes, and only a pack's first touch takes a thread."""
    src = dataset.src / "fixed" / "big.bin"

    async def main():
        with Repository.open(dataset.url) as repo:
            loads = []
            load_chunks = repo.load_chunks

            def recording(ids):  # the worker thread's load; memory is asked first
                loads.append(ids)
                return load_chunks(ids)

            repo.load_chunks = recording
            async with fs_of(repo, dataset.commit) as fs:
                ino = await lookup_path_ino(fs, "fixed/big.bin")
                assert await vfs_read_all(fs, ino) == src.read_bytes()  # the first reads open the pack
                loads.clear()
                fh = await fs.open(await lookup_path_ino(fs, "fixed/copy-of-big.bin"), os.O_RDONLY)
                assert await fs.read(fh, 0, 4096) == src.read_bytes()[:4096]
                assert (await fs.reader(fh)).parts_inline == 1 and loads == []
                await fs.release(fh)
    trio.run(main)


def test_concurrent_readers(dataset):
    files = ["fixed/big.bin", "fixed/copy-of-big.bin", "fixed/run.sh", "fixed/empty"]

    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                results = {}

                async def reader(i, path):
                    ino = await lookup_path_ino(fs, path)
                    results[i, path] = await vfs_read_all(fs, ino, block=65536 + i * 4096)

                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        for path in files:
                            nursery.start_soon(reader, i, path)
                for (i, path), got in results.items():
                    assert got == (dataset.src / path).read_bytes(), (i, path)
    trio.run(main)


def test_xattrs_and_read_only(dataset):
    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                ino = await lookup_path_ino(fs, "fixed/run.sh")
                entry = lookup_path(repo, dataset.commit, "fixed/run.sh")
                assert await fs.listxattr(ino) == sorted([XATTR_COMMIT.encode(), XATTR_ID.encode(),
                                                          XATTR_REPO.encode()])
                assert await fs.getxattr(ino, XATTR_COMMIT.encode()) == dataset.commit.hex().encode()
                assert await fs.getxattr(ino, XATTR_ID.encode()) == entry.id.hex().encode()
                assert await fs.getxattr(ino, XATTR_REPO.encode()) == repo.url.encode()
                with pytest.raises(NoSuchAttributeError):
                    await fs.getxattr(ino, b"user.other")
                for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
                    with pytest.raises(ReadOnlyError):
                        await fs.open(ino, flags)
                with pytest.raises(ReadOnlyError):
                    fs.refuse_write("unlink")
    trio.run(main)


def test_refs_layout_and_commit_prefixes(dataset):
    src = dataset.src
    with Repository.open(dataset.url) as repo:
        write_file(src / "fixed" / "second.txt", b"second\n")
        second = commit_directory(repo, src, message="two").commit_id
        repo.refs.set_branch_if_equals("team/exp", dataset.commit, None)

    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo) as fs:
                names = lambda listing: [n for n, _ in listing]  # noqa: E731
                assert names(await vfs_listdir(fs, ROOT_INODE)) == ["aliases", "branches", "commits", "tags"]
                branches = (await fs.lookup(ROOT_INODE, b"branches")).ino
                assert names(await vfs_listdir(fs, branches)) == ["main", "team"]
                team = (await fs.lookup(branches, b"team")).ino
                assert names(await vfs_listdir(fs, team)) == ["exp"]
                exp = (await fs.lookup(team, b"exp")).ino
                assert await fs.getxattr(exp, XATTR_COMMIT.encode()) == dataset.commit.hex().encode()
                main_ = (await fs.lookup(branches, b"main")).ino
                assert await fs.getxattr(main_, XATTR_COMMIT.encode()) == second.hex().encode()
                tags = (await fs.lookup(ROOT_INODE, b"tags")).ino
                v1 = (await fs.lookup(tags, b"v1")).ino
                assert "second.txt" not in names(await vfs_listdir(fs, (await fs.lookup(v1, b"fixed")).ino))
                commits = (await fs.lookup(ROOT_INODE, b"commits")).ino
                assert sorted(names(await vfs_listdir(fs, commits))) == sorted({dataset.commit.hex(), second.hex()})
                # Any unique prefix resolves, full ids too; other names do not.
                for name in (second.hex()[:6], second.hex(), second.hex()[:10].upper()):
                    ino = (await fs.lookup(commits, name.encode())).ino
                    assert await fs.getxattr(ino, XATTR_COMMIT.encode()) == second.hex().encode()
                for name in ("abc", "zzzzzz", "0" * 64, "main"):
                    with pytest.raises(PathNotFoundError):
                        await fs.lookup(commits, name.encode())
                with pytest.raises(PathNotFoundError):
                    await fs.lookup(branches, b"nope")
                with pytest.raises(PathNotFoundError):
                    await fs.lookup(ROOT_INODE, b"heads")
                # Ref views are trusted briefly by the kernel, commit views long.
                assert (await fs.lookup(branches, b"main")).entry_timeout <= 2.5
                assert (await fs.lookup(tags, b"v1")).entry_timeout >= 3600
    trio.run(main)


def test_branch_view_moves_but_open_files_keep_their_commit(dataset):
    src = dataset.src

    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, refresh_s=0.2) as fs:
                branches = (await fs.lookup(ROOT_INODE, b"branches")).ino
                old_root = (await fs.lookup(branches, b"main")).ino
                run = (await fs.lookup((await fs.lookup(old_root, b"fixed")).ino, b"run.sh")).ino
                fh = await fs.open(run, os.O_RDONLY)
                assert await fs.read(fh, 0, 100) == b"#!/bin/sh\necho hi\n"

                write_file(src / "fixed" / "run.sh", b"#!/bin/sh\necho moved\n", executable=True)
                new = await trio.to_thread.run_sync(
                    lambda: commit_directory(repo, src, message="moved").commit_id)
                await trio.sleep(0.3)  # past the refs snapshot's age
                new_root = (await fs.lookup(branches, b"main")).ino
                assert new_root != old_root
                assert await fs.getxattr(new_root, XATTR_COMMIT.encode()) == new.hex().encode()
                new_run = (await fs.lookup((await fs.lookup(new_root, b"fixed")).ino, b"run.sh")).ino
                assert await vfs_read_all(fs, new_run) == b"#!/bin/sh\necho moved\n"
                # The handle opened before the move, and the old tree, still show the old commit.
                assert await fs.read(fh, 0, 100) == b"#!/bin/sh\necho hi\n"
                assert await vfs_read_all(fs, run) == b"#!/bin/sh\necho hi\n"
                await fs.release(fh)
    trio.run(main)


def test_branch_list_survives_a_failed_refresh(dataset):
    async def main():
        repo = faulty_repository(dataset.url)
        try:
            async with fs_of(repo, refresh_s=0.1) as fs:
                branches = (await fs.lookup(ROOT_INODE, b"branches")).ino
                assert [n for n, _ in await vfs_listdir(fs, branches)] == ["main"]
                repo.store.fail_on = {"iter_refs"}
                await trio.sleep(0.1)
                assert [n for n, _ in await vfs_listdir(fs, branches)] == ["main"]
                assert repo.store.calls["iter_refs"] >= 3  # it did try (branches, then tags failed)
        finally:
            repo.close()
    trio.run(main)


def test_concurrent_requests_share_one_refs_refresh(dataset):
    async def main():
        repo = faulty_repository(dataset.url)
        try:
            async with fs_of(repo, refresh_s=0) as fs:  # every request wants fresh refs
                branches = (await fs.lookup(ROOT_INODE, b"branches")).ino
                before = repo.store.calls["iter_refs"]
                inos = []

                async def look():
                    inos.append((await fs.lookup(branches, b"main")).ino)

                async with trio.open_nursery() as nursery:
                    for _ in range(10):
                        nursery.start_soon(look)
                assert len(set(inos)) == 1 and len(inos) == 10
                assert repo.store.calls["iter_refs"] - before == 3  # one refresh: branches, tags, aliases
        finally:
            repo.close()
    trio.run(main)


def _flip_chunk_byte(url: str, chunk_id: bytes) -> None:
    with Repository.open(url) as repo:
        loc = repo.locate(chunk_id)
        path = repo.store.local_path(pack_key(loc.pack))
    with open(path, "r+b") as f:
        f.seek(loc.offset + loc.stored // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupt_chunk_fails_the_read_never_wrong_bytes(dataset):
    data = (dataset.src / "fixed" / "big.bin").read_bytes()
    with Repository.open(dataset.url) as repo:
        manifest = repo.load_manifest(lookup_path(repo, dataset.commit, "fixed/big.bin").id)
    bad = len(manifest.chunk_ids) // 2
    _flip_chunk_byte(dataset.url, manifest.chunk_ids[bad])
    bad_start = sum(manifest.chunk_sizes[:bad])

    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                ino = await lookup_path_ino(fs, "fixed/big.bin")
                fh = await fs.open(ino, os.O_RDONLY)
                assert await fs.read(fh, 0, 4096) == data[:4096]  # chunks before the bad one are fine
                with pytest.raises(CorruptObjectError):
                    await fs.read(fh, bad_start, 4096)
                with pytest.raises(CorruptObjectError):  # and again: never served from anywhere
                    await fs.read(fh, bad_start + 10, 10)
                await fs.release(fh)
    trio.run(main)


def test_small_files_are_read_whole_at_first_open_and_corruption_still_fails_the_read(tmp_path, cache_home):
    """An image-sized file whose bytes are in memory is read and verified whole at its
    first open, and its reads only slice it; a corrupt one opens, but its read fails."""
    rng = random.Random(21)
    files = {"a.png": rng.randbytes(200_000), "b.png": rng.randbytes(150_000)}
    for name, data in files.items():
        write_file(tmp_path / "src" / name, data)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit = commit_directory(repo, tmp_path / "src", message="m").commit_id
        bad = repo.load_manifest(lookup_path(repo, commit, "b.png").id).chunk_ids[0]
    _flip_chunk_byte(url, bad)

    async def main():
        with Repository.open(url) as repo:
            repo.load_chunks([repo.load_manifest(lookup_path(repo, commit, "a.png").id).chunk_ids[0]])  # opens the pack
            async with fs_of(repo, commit) as fs:
                ino = await lookup_path_ino(fs, "a.png")
                fh = await fs.open(ino, os.O_RDONLY)
                loads = fs.loader.inline + fs.loader.in_threads
                got = b"".join([bytes(await fs.read(fh, off, 65536)) for off in range(0, 200_000, 65536)])
                assert got == files["a.png"] and fs.loader.inline + fs.loader.in_threads == loads
                assert bytes(await fs.read(fh, 199_990, 100)) == files["a.png"][199_990:]
                assert await fs.read(fh, 300_000, 10) == b""
                await fs.release(fh)
                fh = await fs.open(await lookup_path_ino(fs, "b.png"), os.O_RDONLY)
                with pytest.raises(CorruptObjectError):
                    await fs.read(fh, 0, 4096)
                await fs.release(fh)
    trio.run(main)


def test_stalled_storage_times_out_and_failing_storage_errors(dataset):
    async def main():
        repo = faulty_repository(dataset.url)
        try:
            async with fs_of(repo, dataset.commit, io_timeout_s=0.5) as fs:
                ino = await lookup_path_ino(fs, "fixed/big.bin")
                fh = await fs.open(ino, os.O_RDONLY)
                repo.store.stall_s = 3600  # reads hang (released at the end)
                with pytest.raises(StorageTimeoutError):
                    await fs.read(fh, 0, 4096)
                repo.store.release()
                repo.store.fail_on = {"load_range"}
                with pytest.raises(StorageError):
                    await fs.read(fh, 1 << 20, 4096)
                repo.store.fail_on = set()
                assert len(await fs.read(fh, 1 << 20, 4096)) == 4096  # the next read tries again
                await fs.release(fh)
        finally:
            repo.store.release()
            repo.close()
    trio.run(main)


def test_large_directory_offsets(tmp_path, cache_home):
    n = 5000
    with Repository.init(str(tmp_path / "repo")) as repo:
        with repo.writer() as w:
            fid = w.add_manifest(EMPTY_MANIFEST)
            tree = Tree.build([TreeEntry(f"f{i:06d}", Kind.FILE, 0, fid) for i in range(n)])
            tid = w.add_tree(tree)
        cid = repo.save_commit(Commit(tid, (), "t", 0, "big dir"))

    async def main():
        with Repository.open(str(tmp_path / "repo")) as repo:
            async with fs_of(repo, cid) as fs:
                listing = await vfs_listdir(fs, ROOT_INODE)
                assert [n for n, _ in listing] == [e.name for e in tree.entries]
                assert len({a.ino for _, a in listing}) == n
                fh = await fs.opendir(ROOT_INODE)
                got = []
                await fs.readdir(fh, n - 3, lambda name, a, i: got.append((name, i)) or True)
                assert got == [(tree.entries[j].name.encode(), j + 1) for j in range(n - 3, n)]
                await fs.readdir(fh, n, lambda *a: pytest.fail("no entries past the end"))
                await fs.releasedir(fh)
    trio.run(main)


# --- reads by inode (files the kernel opened without asking: FileSystem.read_inode) ---------
async def read_inode_all(fs, ino: int, block: int = 128 * 1024) -> bytes:
    """A file's bytes through read_inode, in order, as a kernel reading it from the start
    does: requests of ``block`` bytes, none past the size it knows (getattr)."""
    size = (await fs.getattr(ino)).size
    parts, off = [], 0
    while off < size:
        data = bytes(await fs.read_inode(ino, off, min(block, size - off)))
        assert data, f"read_inode returned nothing at {off} of {size}"
        parts.append(data)
        off += len(data)
    return b"".join(parts)


def _files_repo(tmp_path, files: dict[str, bytes]) -> tuple[str, bytes]:
    for name, data in files.items():
        write_file(tmp_path / "src" / name, data)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        return url, commit_directory(repo, tmp_path / "src", message="m").commit_id


def test_read_inode_returns_the_files_bytes_like_open_and_read(dataset):
    """read_inode serves exactly the bytes open/read serve: a small file (read whole), a
    large multi-chunk one in kernel-sized pieces in order and at scattered offsets, an
    empty one, and past the end."""
    big = (dataset.src / "fixed" / "big.bin").read_bytes()
    run = (dataset.src / "fixed" / "run.sh").read_bytes()

    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                ino = await lookup_path_ino(fs, "fixed/big.bin")
                for block in (128 * 1024, 1 << 20, 4096 + 17):
                    assert await read_inode_all(fs, ino, block) == big, block
                rng = random.Random(11)
                fh = await fs.open(ino, os.O_RDONLY)
                for _ in range(60):
                    off = rng.randrange(len(big) + 10)
                    size = rng.choice([1, 100, 4096, 131072, 1 << 20])
                    got = bytes(await fs.read_inode(ino, off, size))
                    assert got == big[off:off + size] == bytes(await fs.read(fh, off, size)), (off, size)
                await fs.release(fh)
                assert inode_reader(fs, ino).random_reads > 0  # the scattered reads went through read-ahead
                small = await lookup_path_ino(fs, "fixed/run.sh")
                assert await read_inode_all(fs, small) == run == await vfs_read_all(fs, small)
                assert await fs.read_inode(small, 1000, 10) == b""
                empty = await lookup_path_ino(fs, "fixed/empty")
                assert await fs.read_inode(empty, 0, 4096) == b""
                # Every other file of the dataset too, read both ways.
                for path, desc in dataset.picture.items():
                    if desc[0] == "file":
                        fino = await lookup_path_ino(fs, path)
                        assert await read_inode_all(fs, fino) == desc[2] == await vfs_read_all(fs, fino), path
    trio.run(main)


def inode_reader(fs, ino: int):
    h = fs._by_inode[ino]
    assert h.reader is not None
    return h.reader


def test_a_small_files_read_state_is_dropped_once_all_its_bytes_are_returned(tmp_path, cache_home):
    rng = random.Random(5)
    files = {"a.png": rng.randbytes(200_000), "b.png": rng.randbytes(150_000)}
    url, commit = _files_repo(tmp_path, files)

    async def main():
        with Repository.open(url) as repo:
            repo.load_chunks([repo.load_manifest(lookup_path(repo, commit, "a.png").id).chunk_ids[0]])  # opens the pack
            async with fs_of(repo, commit) as fs:
                ino = await lookup_path_ino(fs, "a.png")
                assert bytes(await fs.read_inode(ino, 0, 65536)) == files["a.png"][:65536]
                h = fs._by_inode[ino]
                assert h.data is not None and h.reader is None  # read and verified whole
                loads = fs.loader.inline + fs.loader.in_threads
                rest = b"".join([bytes(await fs.read_inode(ino, off, 65536)) for off in range(65536, 200_000, 65536)])
                assert files["a.png"][:65536] + rest == files["a.png"]
                assert fs.loader.inline + fs.loader.in_threads == loads  # only slices of the bytes read whole
                assert ino not in fs._by_inode and h.released and h.data is None  # all returned: dropped
                # The kernel may still ask again (its pages were dropped): the right bytes, from a new state.
                assert bytes(await fs.read_inode(ino, 100_000, 100)) == files["a.png"][100_000:100_100]
                assert await read_inode_all(fs, ino, 4096) == files["a.png"]
                assert ino not in fs._by_inode
                # One request for the whole file: dropped at once.
                b = await lookup_path_ino(fs, "b.png")
                assert bytes(await fs.read_inode(b, 0, 1 << 20)) == files["b.png"]
                assert b not in fs._by_inode
                # A read at or past the end loads nothing and keeps no state.
                loads = fs.loader.inline + fs.loader.in_threads
                for off in (150_000, 150_001, 1 << 20):
                    assert bytes(await fs.read_inode(b, off, 4096)) == b""
                assert b not in fs._by_inode and fs.loader.inline + fs.loader.in_threads == loads
    trio.run(main)


def test_two_first_reads_of_a_file_at_once_share_one_read_state(tmp_path, cache_home, monkeypatch):
    """Two READs of a file nobody has read yet, arriving together while its
    entry is still being read from its directory's tree (FileSystem._full
    awaits), make one read state between them: a second would be dropped from
    the table unclosed, its read-ahead fetching on for nobody."""
    rng = random.Random(8)
    files = {"a.bin": rng.randbytes(3 << 20)}
    url, commit = _files_repo(tmp_path, files)
    made = []

    class Counted(vfs_core._FileHandle):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(vfs_core, "_FileHandle", Counted)

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                ino = await lookup_path_ino(fs, "a.bin")
                full, both_in = fs._full, trio.Event()
                waiting = []

                async def slow_full(node):  # (the two reads' first calls wait for each other)
                    if not both_in.is_set():
                        waiting.append(node)
                        if len(waiting) == 2:
                            both_in.set()
                        await both_in.wait()
                    return await full(node)
                fs._full = slow_full
                got = {}

                async def read(off):
                    got[off] = bytes(await fs.read_inode(ino, off, 65536))
                async with trio.open_nursery() as n:
                    n.start_soon(read, 0)
                    n.start_soon(read, 65536)
                assert got == {0: files["a.bin"][:65536], 65536: files["a.bin"][65536:131072]}
                assert len(waiting) == 2 and len(made) == 1 and fs._by_inode[ino] is made[0]
    trio.run(main)


def test_read_states_are_capped_and_evicted_ones_closed(tmp_path, cache_home):
    rng = random.Random(6)
    files = {f"w{i}.bin": rng.randbytes(1_200_000 + i) for i in range(5)}  # > whole_file_bytes: read-ahead
    url, commit = _files_repo(tmp_path, files)

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit, inode_readers=2) as fs:
                inos = {name: await lookup_path_ino(fs, name) for name in files}
                states = {}
                for name, ino in inos.items():
                    assert bytes(await fs.read_inode(ino, 0, 131072)) == files[name][:131072]
                    states[name] = fs._by_inode[ino]
                    assert states[name].reader is not None
                    assert len(fs._by_inode) <= 2
                # The two most recent are kept, the others closed.
                assert list(fs._by_inode) == [inos["w3.bin"], inos["w4.bin"]]
                for name, h in states.items():
                    kept = name in ("w3.bin", "w4.bin")
                    assert h.released != kept and h.reader._closed != kept, name
                # A read makes a state the most recent; an evicted file reads right from a new state.
                assert bytes(await fs.read_inode(inos["w3.bin"], 131072, 4096)) == files["w3.bin"][131072:135168]
                assert await read_inode_all(fs, inos["w0.bin"]) == files["w0.bin"]
                assert list(fs._by_inode) == [inos["w3.bin"], inos["w0.bin"]]
                assert states["w4.bin"].released and not states["w3.bin"].released
                for name, ino in inos.items():
                    assert await read_inode_all(fs, ino, 65536 + 4096) == files[name], name
                    assert len(fs._by_inode) <= 2
    trio.run(main)


def test_read_states_left_unread_are_closed(tmp_path, cache_home):
    # No RELEASE tells the daemon that a reader has gone: a state left unread for
    # inode_reader_idle_s gives up its read-ahead buffers when another file starts.
    rng = random.Random(7)
    files = {f"w{i}.bin": rng.randbytes(1_200_000 + i) for i in range(3)}
    url, commit = _files_repo(tmp_path, files)
    clock = trio.testing.MockClock()

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit, inode_reader_idle_s=10.0) as fs:
                inos = {name: await lookup_path_ino(fs, name) for name in files}
                assert bytes(await fs.read_inode(inos["w0.bin"], 0, 131072)) == files["w0.bin"][:131072]
                first = fs._by_inode[inos["w0.bin"]]
                clock.jump(5)
                assert bytes(await fs.read_inode(inos["w1.bin"], 0, 131072)) == files["w1.bin"][:131072]
                assert not first.released  # 5 s unread: kept
                clock.jump(6)
                assert bytes(await fs.read_inode(inos["w1.bin"], 131072, 4096)) == files["w1.bin"][131072:135168]
                assert not first.released  # only a new state sweeps
                assert bytes(await fs.read_inode(inos["w2.bin"], 0, 131072)) == files["w2.bin"][:131072]
                assert first.released and first.reader._closed  # 11 s unread: closed
                assert list(fs._by_inode) == [inos["w1.bin"], inos["w2.bin"]]  # read 6 s ago: kept
                assert await read_inode_all(fs, inos["w0.bin"]) == files["w0.bin"]  # and reads right again
    trio.run(main, clock=clock)


def test_forget_drops_the_read_state_of_an_inode_the_kernel_no_longer_holds(dataset):
    big = (dataset.src / "fixed" / "big.bin").read_bytes()

    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                fixed = await lookup_path_ino(fs, "fixed")
                ino = (await fs.lookup(fixed, b"big.bin")).ino
                assert (await fs.lookup(fixed, b"big.bin")).ino == ino  # two references
                assert bytes(await fs.read_inode(ino, 0, 4096)) == big[:4096]
                h = fs._by_inode[ino]
                fs.forget([(ino, 1)])  # one reference left: the state stays
                assert fs._by_inode.get(ino) is h and not h.released
                fs.forget([(ino, 1)])
                assert ino not in fs.table and ino not in fs._by_inode
                assert h.released and h.reader._closed
                fs.forget([(ino, 1)])  # forgotten twice: ignored
    trio.run(main)


def test_read_inode_of_a_corrupt_chunk_fails_like_read_never_wrong_bytes(tmp_path, cache_home):
    rng = random.Random(8)
    files = {"big.bin": rng.randbytes(3 << 20), "small.png": rng.randbytes(150_000)}
    url, commit = _files_repo(tmp_path, files)
    with Repository.open(url) as repo:
        manifest = repo.load_manifest(lookup_path(repo, commit, "big.bin").id)
        small_chunk = repo.load_manifest(lookup_path(repo, commit, "small.png").id).chunk_ids[0]
    bad = len(manifest.chunk_ids) // 2
    bad_start = sum(manifest.chunk_sizes[:bad])
    _flip_chunk_byte(url, manifest.chunk_ids[bad])
    _flip_chunk_byte(url, small_chunk)

    async def main():
        with Repository.open(url) as repo:
            repo.load_chunks([manifest.chunk_ids[0]])  # opens the pack: the small file is read whole
            async with fs_of(repo, commit) as fs:
                ino = await lookup_path_ino(fs, "big.bin")
                fh = await fs.open(ino, os.O_RDONLY)
                assert bytes(await fs.read_inode(ino, 0, 4096)) == files["big.bin"][:4096]
                for off in (bad_start, bad_start + 10, bad_start):  # and again: never served from anywhere
                    with pytest.raises(CorruptObjectError):
                        await fs.read(fh, off, 4096)
                    with pytest.raises(CorruptObjectError):
                        await fs.read_inode(ino, off, 4096)
                await fs.release(fh)
                # Reading from the start: whatever is served is right, and the bad chunk fails.
                off, failed = 0, False
                while off <= bad_start:
                    try:
                        got = bytes(await fs.read_inode(ino, off, 1 << 20))
                    except CorruptObjectError:
                        failed = True
                        break
                    assert got and got == files["big.bin"][off:off + len(got)]
                    off += len(got)
                assert failed
                small = await lookup_path_ino(fs, "small.png")
                for _ in range(2):
                    with pytest.raises(CorruptObjectError):
                        await fs.read_inode(small, 0, 4096)
    trio.run(main)


def test_read_inode_and_check_open_refuse_what_open_refuses(dataset):
    async def main():
        with Repository.open(dataset.url) as repo:
            async with fs_of(repo, dataset.commit) as fs:
                fixed = await lookup_path_ino(fs, "fixed")
                for ino in (ROOT_INODE, fixed):
                    with pytest.raises(IsADirectoryError_):
                        await fs.read_inode(ino, 0, 4096)
                    with pytest.raises(IsADirectoryError_):
                        fs.check_open(ino, os.O_RDONLY)
                assert not fs._by_inode
                run = await lookup_path_ino(fs, "fixed/run.sh")
                for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
                    with pytest.raises(ReadOnlyError):
                        fs.check_open(run, flags)
                assert fs.check_open(run, os.O_RDONLY).entry.size == len(b"#!/bin/sh\necho hi\n")
                link = await lookup_path_ino(fs, "fixed/link-to-big")
                with pytest.raises(PathNotFoundError):
                    await fs.read_inode(link, 0, 4096)
    trio.run(main)


@pytest.mark.timeout(60)
def test_two_readers_of_one_inode_keep_their_own_read_ahead(tmp_path, cache_home):
    """Reads by inode (no opens): two readers of one file, each sequential, their
    requests interleaved, are two read streams, each with its read-ahead growing as
    if it read alone (one read state would see every other request as a seek);
    the bytes are exact."""
    rng = random.Random(19)
    data = rng.randbytes(6_000_000)  # > whole_file_bytes: read-ahead, several chunks
    url, commit = _files_repo(tmp_path, {"w.bin": data})
    step = 128 * 1024

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, commit) as fs:
                ino = await lookup_path_ino(fs, "w.bin")
                a, b = 0, 3_000_000
                for _ in range(8):
                    assert bytes(await fs.read_inode(ino, a, step)) == data[a:a + step]
                    assert bytes(await fs.read_inode(ino, b, step)) == data[b:b + step]
                    a, b = a + step, b + step
                h = fs._by_inode[ino]
                assert len(h.streams) == 2
                for r in h.streams:
                    assert r.random_reads <= 1 and r.sequential_reads >= 7
                    assert r.window > r.initial_window  # grown: nobody reset it
                # Both go on undisturbed, whichever comes first.
                for r in h.streams:
                    r.random_reads = 0
                for off in (b, a, a + step, b + step):
                    assert bytes(await fs.read_inode(ino, off, step)) == data[off:off + step]
                assert [r.random_reads for r in h.streams] == [0, 0] and len(h.streams) == 2
    trio.run(main)
