"""Sync between repositories: clone, remotes, push, pull (ops.sync, cli.remote).

Round trips local -> S3 -> local and S3 -> S3 through the command line; what
a push sends (only what the destination lacks, counted in bytes and objects);
fast-forward rules of push and pull; the index invariant that makes skipping
present trees sound, checked after an interruption at every write; resuming
an interrupted push and pull.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from core_fixtures import (
    age_tree,
    assert_fsck_clean,
    cli_fails,
    cli_ok,
    describe,
    make_random_tree,
    write_file,
)
from sync_fixtures import counting_repository

from commitfs.errors import CorruptObjectError, RefConflictError, RevisionError, StorageError
from commitfs.model.ids import ID_SIZE
from commitfs.model.objects import FileManifest, Kind, Tree
from commitfs.ops import sync
from commitfs.ops.checkout import checkout
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.index import ENTRY as INDEX_ENTRY
from commitfs.repo.index import HEADER as INDEX_HEADER
from commitfs.repo.pack import BlobKind, pack_key
from commitfs.repo.repository import Repository, commit_key


def commit(url: str, directory: Path, message: str, branch: str = "main") -> bytes:
    with Repository.open(url) as r:
        return commit_directory(r, directory, branch=branch, message=message).commit_id


def branch_of(url: str, name: str = "main") -> bytes | None:
    with Repository.open(url) as r:
        return r.refs.lookup_branch(name)


def checked_out(url: str, rev: str, dest: Path) -> dict:
    with Repository.open(url) as r:
        checkout(r, r.resolve(rev), dest)
    return describe(dest)


def random_files(root: Path, rng: random.Random, count: int, size: int) -> None:
    for i in range(count):
        write_file(root / f"d{i % 7}" / f"f{i:03d}.bin", rng.randbytes(size))


# --- round trips -------------------------------------------------------------------
def test_round_trip_local_to_s3_to_local(tmp_path, s3_url, cache_home):
    rng = random.Random(7)
    data = tmp_path / "data"
    want_v1 = make_random_tree(data, rng, big=600_000)
    local = str(tmp_path / "local")
    cli_ok("-r", local, "init")
    cli_ok("-r", local, "commit", str(data), "-m", "v1")
    cli_ok("-r", local, "tag", "v1", "main")
    cli_ok("-r", local, "branch", "dev", "main")
    write_file(data / "fixed" / "new.txt", b"second version\n")
    shutil.rmtree(data / "fixed" / "n1")
    want_v2 = describe(data)
    cli_ok("-r", local, "commit", str(data), "-m", "v2")

    cli_ok("-r", s3_url, "init")
    cli_ok("-r", local, "remote", "add", "origin", s3_url)
    out = json.loads(cli_ok("-r", local, "push", "--tags", "--json").stdout)
    assert {(u["name"], u["kind"], u["status"]) for u in out["updates"]} == {
        ("main", "branch", "created"), ("v1", "tag", "created")}
    assert out["stats"]["commits"] == 2 and out["stats"]["bytes_sent"] > 600_000
    cli_ok("-r", local, "push", "origin", "dev")

    clone = tmp_path / "clone"
    cli_ok("clone", s3_url, str(clone))
    assert json.loads(cli_ok("-r", str(clone), "remote", "list", "--json").stdout) == {
        "origin": {"url": s3_url, "endpoint_url": None}}
    for name in ("main", "dev"):
        assert branch_of(str(clone), name) == branch_of(local, name)
    assert checked_out(str(clone), "main", tmp_path / "out-main") == want_v2
    assert checked_out(str(clone), "v1", tmp_path / "out-v1") == want_v1
    assert checked_out(str(clone), "dev", tmp_path / "out-dev") == want_v1
    assert_fsck_clean(s3_url)
    assert_fsck_clean(str(clone))


def test_s3_to_s3(tmp_path, s3_url, cache_home):
    rng = random.Random(8)
    data = tmp_path / "data"
    want = make_random_tree(data, rng, big=300_000)
    second = s3_url + "-copy"
    cli_ok("-r", s3_url, "init")
    cli_ok("-r", s3_url, "commit", str(data), "-m", "v1")
    cli_ok("-r", second, "init")
    cli_ok("-r", s3_url, "push", second)  # a URL works where a remote name does
    assert branch_of(second) == branch_of(s3_url)
    assert checked_out(second, "main", tmp_path / "out") == want
    assert_fsck_clean(second)
    # Clone from a bucket into another bucket prefix.
    third = s3_url + "-clone"
    cli_ok("clone", second, third)
    assert checked_out(third, "main", tmp_path / "out3") == want


def test_clone_refuses_a_non_empty_directory_and_resumes_its_own(tmp_path, cache_home):
    src = str(tmp_path / "src")
    data = tmp_path / "data"
    random_files(data, random.Random(1), 5, 10_000)
    Repository.init(src).close()
    commit(src, data, "v1")
    busy = tmp_path / "busy"
    write_file(busy / "x", b"x")
    assert "exists and is not an empty directory" in cli_fails("clone", src, str(busy))
    dest = tmp_path / "dest"
    cli_ok("clone", src, str(dest))
    # Cloning again into the same clone finds everything there.
    again = cli_ok("clone", src, str(dest))
    assert b"up to date" in again.stdout and b"nothing to fetch" in again.stderr
    other = str(tmp_path / "other")
    Repository.init(other).close()
    assert "already a commitfs repository" in cli_fails("clone", src, other)
    assert "no commitfs repository at" in cli_fails("clone", str(tmp_path / "nowhere"), str(tmp_path / "d2"))


# --- what is sent ------------------------------------------------------------------
@pytest.mark.parametrize("change", ["one file of 100", "1% inside one big file"])
def test_push_sends_only_what_is_missing(tmp_path, s3_url, cache_home, change):
    rng = random.Random(3)
    data = tmp_path / "data"
    if change == "one file of 100":
        random_files(data, rng, 100, 40_000)
    else:
        write_file(data / "big.bin", rng.randbytes(4_000_000))
        write_file(data / "small.txt", b"labels\n")
    total = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    local = str(tmp_path / "local")
    Repository.init(local).close()
    commit(local, data, "v1")
    Repository.init(s3_url).close()
    with Repository.open(local) as lr, counting_repository(s3_url) as rr:
        first = sync.push(lr, rr)
        assert first.stats.bytes_sent >= total  # random bytes: stored as they are
        assert rr.store.saved["packs"] >= total

    if change == "one file of 100":
        changed = 40_000
        write_file(data / "d3" / "f010.bin", rng.randbytes(changed))
    else:
        changed = 40_000  # 1% of the dataset, overwritten in place in the middle
        with open(data / "big.bin", "r+b") as f:
            f.seek(2_000_000)
            f.write(rng.randbytes(changed))
    commit(local, data, "v2")
    with Repository.open(local) as lr, counting_repository(s3_url) as rr:
        second = sync.push(lr, rr)
        sent = rr.store.saved["packs"]
        assert second.updates[0].status == "fast-forward"
        assert second.stats.commits == 1
        assert second.stats.manifests == 1
        assert rr.store.saved_count["commits"] == 1
        if change == "one file of 100":
            # One 40 kB chunk, its manifest, the root and one directory tree.
            assert second.stats.trees == 2
            assert changed <= sent <= changed + 16_000
        else:
            # Content-defined chunks: the change, plus the rest of the chunks it
            # touches (at most a max-size chunk on each side), plus metadata.
            assert second.stats.trees == 1
            assert changed <= sent <= changed + 2 * 256 * 1024 + 16_000
        print(f"\n{change}: changed {changed} of {total} bytes, push sent {sent} pack bytes "
              f"({second.stats.chunks} chunks, {second.stats.objects} objects)")

    # Nothing left to send: no object written, the branch reported up to date.
    with Repository.open(local) as lr, counting_repository(s3_url) as rr:
        third = sync.push(lr, rr)
        assert third.updates[0].status == "up-to-date"
        assert rr.store.saved_count == {} and third.stats.objects == 0
    assert_fsck_clean(s3_url)


def test_walk_skips_trees_the_destination_has(tmp_path, cache_home):
    data = tmp_path / "data"
    rng = random.Random(4)
    for d in ("a/b/c", "a/x", "y/z", "w"):
        for i in range(5):
            write_file(data / d / f"f{i}", rng.randbytes(3000))
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    Repository.init(src).close()
    Repository.init(dst).close()
    commit(src, data, "v1")
    with Repository.open(src) as s, Repository.open(dst) as d:
        sync.push(s, d)
    write_file(data / "a" / "b" / "c" / "f0", b"changed")
    commit(src, data, "v2")
    with counting_repository(src) as s, Repository.open(dst) as d:
        result = sync.push(s, d)
        # Only the trees on the changed path are read and sent: root, a, a/b, a/b/c;
        # a/x, y, y/z and w are skipped without being read.
        assert result.stats.trees == 4 and result.stats.manifests == 1 and result.stats.chunks == 1
        assert s.store.calls["load_range"] <= 4 + 1 + 1


# --- fast-forward rules ------------------------------------------------------------
def test_push_refuses_non_fast_forward_unless_forced(tmp_path, s3_url, cache_home):
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    random_files(data_a, random.Random(1), 3, 5000)
    a = str(tmp_path / "repo-a")
    cli_ok("-r", a, "init")
    cli_ok("-r", s3_url, "init")
    commit(a, data_a, "c1")
    cli_ok("-r", a, "remote", "add", "origin", s3_url)
    cli_ok("-r", a, "push")
    b = str(tmp_path / "repo-b")
    cli_ok("clone", s3_url, b)
    random_files(data_b, random.Random(2), 3, 5000)
    c2 = commit(b, data_b, "c2 from b")
    cli_ok("-r", b, "push")
    assert branch_of(s3_url) == c2

    write_file(data_a / "new", b"a's change")
    c3 = commit(a, data_a, "c3 from a")
    line = cli_fails("-r", a, "push")
    assert line == "commitfs: remote branch main has commits you do not have: pull first, or --force"
    assert branch_of(s3_url) == c2
    with Repository.open(a) as lr, Repository.open(s3_url) as rr:
        with pytest.raises(RefConflictError, match="pull first, or --force"):
            sync.push(lr, rr)
    out = json.loads(cli_ok("-r", a, "push", "--force", "--json").stdout)
    assert out["updates"][0]["status"] == "forced"
    assert branch_of(s3_url) == c3
    assert_fsck_clean(s3_url)
    # An older commit is not a fast-forward either.
    with Repository.open(b) as lr, Repository.open(s3_url) as rr:
        with pytest.raises(RefConflictError, match="has commits you do not have"):
            sync.push(lr, rr)


def test_pull_fast_forwards_and_refuses_divergence(tmp_path, cache_home):
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    random_files(data_a, random.Random(1), 3, 5000)
    a, b = str(tmp_path / "repo-a"), str(tmp_path / "repo-b")
    cli_ok("-r", a, "init")
    c1 = commit(a, data_a, "c1")
    cli_ok("clone", a, b)
    assert branch_of(b) == c1

    write_file(data_a / "more", b"more")
    c2 = commit(a, data_a, "c2")
    out = json.loads(cli_ok("-r", b, "pull", "--json").stdout)
    assert out["updates"][0]["status"] == "fast-forward" and branch_of(b) == c2
    assert checked_out(b, "main", tmp_path / "out") == describe(data_a)

    shutil.copytree(data_a, data_b)
    write_file(data_b / "local-only", b"b's work")
    c3 = commit(b, data_b, "c3 local")
    write_file(data_a / "remote-only", b"a's work")
    c4 = commit(a, data_a, "c4 remote")
    line = cli_fails("-r", b, "pull")
    assert "local branch main has diverged" in line and "does not merge" in line
    assert branch_of(b) == c3
    cli_ok("-r", b, "pull", "--force")
    assert branch_of(b) == c4

    # The local branch ahead of the remote: nothing to do.
    write_file(data_b / "local-again", b"b")
    age_tree(data_b)
    c5 = commit(b, data_b, "c5 local")
    out = json.loads(cli_ok("-r", b, "pull", "--json").stdout)
    assert out["updates"][0]["status"] == "ahead" and branch_of(b) == c5
    # Pulling a remote branch into a differently named local one.
    cli_ok("-r", b, "pull", "origin", "main", "--to", "mirror")
    assert branch_of(b, "mirror") == c4
    assert "no branch 'nope'" in cli_fails("-r", b, "pull", "origin", "nope")
    assert "no branch 'nope'" in cli_fails("-r", b, "push", "origin", "nope")


# --- remotes -----------------------------------------------------------------------
def test_remote_add_list_remove(tmp_path, s3_url, cache_home, monkeypatch):
    local = tmp_path / "local"
    cli_ok("-r", str(local), "init")
    monkeypatch.chdir(tmp_path)
    cli_ok("-r", str(local), "remote", "add", "backup", "./elsewhere")  # made absolute
    cli_ok("-r", str(local), "remote", "add", "cloud", s3_url, "--endpoint-url", "http://127.0.0.1:9")
    listed = json.loads(cli_ok("-r", str(local), "remote", "--json").stdout)
    assert listed == {"backup": {"url": str(tmp_path / "elsewhere"), "endpoint_url": None},
                      "cloud": {"url": s3_url, "endpoint_url": "http://127.0.0.1:9"}}
    assert "remote 'cloud' already exists" in cli_fails("-r", str(local), "remote", "add", "cloud", "/x")
    assert "invalid remote name" in cli_fails("-r", str(local), "remote", "add", "bad..name", "/x")
    line = cli_fails("-r", str(local), "push", "nope")
    assert "no remote named 'nope'" in line and "backup, cloud" in line
    cli_ok("-r", str(local), "remote", "remove", "backup")
    assert "no remote named 'backup'" in cli_fails("-r", str(local), "remote", "remove", "backup")
    assert json.loads(cli_ok("-r", str(local), "remote", "list", "--json").stdout).keys() == {"cloud"}
    # Remotes live in the repository, so an S3 repository has them too.
    cli_ok("-r", s3_url, "init")
    cli_ok("-r", s3_url, "remote", "add", "mirror", str(local))
    assert "mirror" in cli_ok("-r", s3_url, "remote", "list").stdout.decode()


def test_remote_endpoint_is_remembered(tmp_path, s3_server, s3_url, cache_home, monkeypatch):
    """A remote added with --endpoint-url uses it without the option or the environment."""
    data = tmp_path / "data"
    random_files(data, random.Random(5), 2, 3000)
    local = str(tmp_path / "local")
    cli_ok("-r", local, "init")
    commit(local, data, "v1")
    cli_ok("-r", s3_url, "init")
    monkeypatch.delenv("COMMITFS_S3_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cli_ok("-r", local, "remote", "add", "origin", s3_url, "--endpoint-url", s3_server.endpoint_url)
    cli_ok("-r", local, "push")
    with Repository.open(s3_url, endpoint_url=s3_server.endpoint_url) as r:
        assert r.refs.lookup_branch("main") == branch_of(local)


# --- interruption ------------------------------------------------------------------
def _index_invariant_holds(url: str) -> int:
    """Every indexed tree and manifest has everything beneath it indexed, and
    every commit object's tree is; return the number of indexed chunks."""
    with Repository.open(url) as r:
        entries = {oid: loc for seg in r.index.segments() for oid, loc in seg.iter_entries()}
        for oid, loc in entries.items():
            if loc.kind is BlobKind.TREE:
                for e in Tree.decode(r.load_blob(oid)).entries:
                    if e.kind is not Kind.SYMLINK:
                        assert e.id in entries, f"tree {oid.hex()} indexed before {e.name}"
            elif loc.kind is BlobKind.MANIFEST:
                for cid in FileManifest.decode(r.load_blob(oid)).chunk_ids:
                    assert cid in entries, f"manifest {oid.hex()} indexed before its chunks"
        for cid in r.iter_commit_ids():
            assert r.load_commit(cid).tree in entries
        return sum(1 for loc in entries.values() if loc.kind is BlobKind.CHUNK)


def test_interrupted_push_at_every_write_keeps_the_invariant_and_resumes(tmp_path, cache_home, small_packs,
                                                                         pack_mode):
    data = tmp_path / "data"
    rng = random.Random(9)
    make_random_tree(data / "tree", rng, big=1_500_000)
    random_files(data / "flat", rng, 20, 50_000)
    src = str(tmp_path / "src")
    Repository.init(src).close()
    commit(src, data, "v1")

    # A clean push, to count its writes.
    dst = str(tmp_path / "dst-clean")
    Repository.init(dst).close()
    with Repository.open(src) as s, counting_repository(dst) as d:
        full = sync.push(s, d)
        writes = d.store.calls["save_object"]
    assert full.stats.segments >= 4 and full.stats.packs >= 8  # the test exercises batching
    assert (full.stats.packs_copied > 0) == (pack_mode == "whole packs")

    index_only = 0
    for fail_at in range(writes):
        dst = str(tmp_path / f"dst-{fail_at}")
        Repository.init(dst).close()
        with Repository.open(src) as s, counting_repository(dst) as d:
            def fail(method: str, key: str, _n=[0]) -> None:
                if method == "save_object":
                    _n[0] += 1
                    if _n[0] > fail_at:
                        raise StorageError(f"injected: {key}")
            d.store.before = fail
            with pytest.raises(StorageError, match="injected"):
                sync.push(s, d)
        assert branch_of(dst) is None
        indexed = _index_invariant_holds(dst)
        with Repository.open(src) as s, counting_repository(dst) as d:
            resumed = sync.push(s, d)
            if resumed.stats.packs > d.store.saved_count["packs"]:
                index_only += 1  # a pack copied whole before the failure, only indexed now
        # Chunks that were indexed before the failure are not sent again.
        assert resumed.stats.chunks == full.stats.chunks - indexed
        assert branch_of(dst) == branch_of(src)
    assert (index_only > 0) == (pack_mode == "whole packs")
    assert_fsck_clean(dst)
    assert checked_out(dst, "main", tmp_path / "out") == describe(data)


def test_each_tree_is_indexed_after_everything_beneath_it(tmp_path, cache_home, monkeypatch):
    """With an index segment per blob, the order of segments is the order
    of sending: a blob's first segment comes after those of its children,
    including a subtree shared by directories at different depths."""
    monkeypatch.setattr(sync, "BATCH_BYTES", 1)
    data = tmp_path / "data"
    rng = random.Random(12)
    make_random_tree(data / "t", rng, big=200_000)
    for where in ("shared", "deep/er/shared", "x/shared"):
        write_file(data / where / "s1" / "leaf", b"same leaf")
        write_file(data / where / "s2", b"same file")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    Repository.init(src).close()
    Repository.init(dst).close()
    commit(src, data, "v1")
    with Repository.open(src) as s, counting_repository(dst) as d:
        d.store.keep = lambda key: key.startswith("index/")
        result = sync.push(s, d)
        segments = d.store.kept
    assert result.stats.segments == result.stats.objects - result.stats.commits
    first: dict[bytes, int] = {}  # blob id -> number of the first segment naming it
    for n, (_, seg) in enumerate(segments):
        _, npacks, bits, count = INDEX_HEADER.unpack_from(seg)
        base = INDEX_HEADER.size + npacks * ID_SIZE + (1 << bits) * 4
        for i in range(count):
            first.setdefault(INDEX_ENTRY.unpack_from(seg, base + i * INDEX_ENTRY.size)[0], n)
    with Repository.open(dst) as r:
        for oid, n in first.items():
            loc = r.locate(oid)
            if loc.kind is BlobKind.TREE:
                below = [e.id for e in Tree.decode(r.load_blob(oid)).entries if e.kind is not Kind.SYMLINK]
            elif loc.kind is BlobKind.MANIFEST:
                below = list(FileManifest.decode(r.load_blob(oid)).chunk_ids)
            else:
                continue
            assert all(first[c] < n for c in below), f"{loc.kind.name} {oid.hex()} indexed too early"


def test_interrupted_pull_from_s3_resumes(tmp_path, s3_url, cache_home, small_packs):
    data = tmp_path / "data"
    random_files(data, random.Random(11), 60, 50_000)
    Repository.init(s3_url).close()
    commit(s3_url, data, "v1")
    local = str(tmp_path / "local")
    Repository.init(local).close()
    with Repository.open(local) as lr, counting_repository(s3_url) as rr:
        rr.store.fail_on = {"load_range"}
        rr.store.fail_keys = lambda key: key.startswith("packs/")
        reads = [0]

        def after_some(method: str, key: str) -> None:
            if method == "load_range" and key.startswith("packs/"):
                reads[0] += 1
                if reads[0] == 12:
                    rr.store.fail_count = None  # from now on every pack read fails
        rr.store.fail_count = 0
        rr.store.before = after_some
        with pytest.raises(StorageError, match="injected failure"):
            sync.pull(lr, rr, threads=2)
    assert branch_of(local) is None
    with Repository.open(local) as lr, counting_repository(s3_url) as rr:
        resumed = sync.pull(lr, rr)
    with Repository.open(s3_url) as r:
        total_chunks = sum(1 for seg in r.index.segments() for _, loc in seg.iter_entries()
                           if loc.kind is BlobKind.CHUNK)
    assert 0 < resumed.stats.chunks < total_chunks
    assert branch_of(local) == branch_of(s3_url)
    assert_fsck_clean(local)
    assert checked_out(local, "main", tmp_path / "out") == describe(data)


def test_whole_pack_copy_of_a_corrupt_pack_falls_back_and_fails_cleanly(tmp_path, cache_home, small_packs,
                                                                        monkeypatch):
    monkeypatch.setattr(sync, "_WHOLE_PACK_MIN", 0)
    data = tmp_path / "data"
    random_files(data, random.Random(13), 12, 100_000)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    Repository.init(src).close()
    Repository.init(dst).close()
    commit(src, data, "v1")
    with Repository.open(src) as s:
        with Repository.open(dst) as d:
            plan = sync._plan(s, d, [s.refs.lookup_branch("main")], 2, lambda n: None)
        oid, loc = plan.chunks[len(plan.chunks) // 2]
        path = s.store.local_path(pack_key(loc.pack))
    raw = bytearray(path.read_bytes())
    raw[loc.offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with Repository.open(src) as s, Repository.open(dst) as d:
        with pytest.raises(CorruptObjectError, match=f"object {oid.hex()} fails its hash check"):
            sync.push(s, d)
    assert branch_of(dst) is None
    with Repository.open(dst) as d:
        assert not d.has_blob(oid)  # the corrupt pack was neither copied nor indexed
        assert d.store.lookup_size(pack_key(loc.pack)) is None


def test_commits_are_written_after_their_blobs_and_parents(tmp_path, cache_home):
    """A push of several commits writes commit objects only after every
    index segment, parents before children; the branch last."""
    data = tmp_path / "data"
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    Repository.init(src).close()
    Repository.init(dst).close()
    ids = []
    for i in range(4):
        write_file(data / f"f{i}", os.urandom(20_000))
        ids.append(commit(src, data, f"c{i}"))
    order: list[str] = []
    with Repository.open(src) as s, counting_repository(dst) as d:
        d.store.before = lambda method, key: order.append(f"{method} {key}")
        sync.push(s, d, threads=4)
    writes = [w.split(" ", 1)[1] for w in order if w.startswith(("save_object", "save_ref"))]
    commit_writes = [w for w in writes if w.startswith("commits/")]
    assert commit_writes == [commit_key(c) for c in ids]  # one per wave: parents first
    last_blob_write = max(i for i, w in enumerate(writes) if w.startswith(("packs/", "index/")))
    assert writes.index(commit_key(ids[0])) > last_blob_write
    assert writes[-1] == "branches/main"


def test_pull_of_unknown_commit_source_is_a_clear_error(tmp_path, cache_home):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    Repository.init(src).close()
    Repository.init(dst).close()
    with Repository.open(src) as s, Repository.open(dst) as d:
        with pytest.raises(RevisionError, match="no branch 'main'"):
            sync.pull(d, s)
        with pytest.raises(RevisionError, match="does not exist"):
            sync.transfer(s, d, [b"\1" * 32])
