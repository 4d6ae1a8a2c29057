"""Hostile repositories and flaky networks (issue 20): never a wrong answer.

Crafted repositories (damaged refs, lying manifests, hostile ids, exploding
tree DAGs, bad keys) on both backends, and bad input on the command line:
each gives a one-line error naming what is wrong, or is reported by fsck,
never a traceback, never wrong bytes, never unbounded work.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import tempfile
import time
import subprocess
import sys

from pathlib import Path

import boto3
import pytest
import trio

from core_fixtures import (assert_fsck_clean, assert_one_line_error, cli_env, cli_fails, cli_ok, faulty_repository,
                           mounted_tmpfs, pack_bytes, reopen, run_cli, shared_store, write_file)
from cutproxy import CuttingProxy
from mount_fixtures import fs_of, vfs_listdir, vfs_read_all
from commitfs.errors import (CorruptObjectError, DamagedRefError, ExpansionLimitError, RepositoryError, RevisionError,
                             StorageError)
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import Commit, DecodeError, FileManifest, Kind, Tree, TreeEntry
from commitfs.ops.browse import lookup_path, walk
from commitfs.ops.checkout import checkout
from commitfs.ops.diff import diff_trees
from commitfs.ops.fsck import fsck
from commitfs.ops.sync import transfer
from commitfs.repo.pack import BlobKind
from commitfs.repo import treewalk
from commitfs.repo.reader import FileReader
from commitfs.repo.remotes import Remotes
from commitfs.storage.url import open_store
from commitfs.storage.s3 import S3Store
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from commitfs.vfs import ROOT_INODE

pytestmark = pytest.mark.timeout(120)


def small_repo(url: str, tmp_path) -> bytes:
    """A repository at ``url`` with branch main (two files) and tag v1; its commit id."""
    src = tmp_path / "src"
    write_file(src / "a.txt", b"alpha\n")
    write_file(src / "sub" / "b.bin", bytes(range(256)) * 300)
    with Repository.init(url) as repo:
        cid = commit_directory(repo, src, message="one").commit_id
        repo.refs.create_tag("v1", cid)
    return cid


def put_raw_ref(url: str, name: str, value: bytes) -> None:
    """Write a reference's stored value as a hostile writer would (no checks)."""
    store = shared_store(url)
    old = store.load_ref(name)
    store.save_ref_if_equals(name, value, old)


# --- item 5: damaged refs --------------------------------------------------------------
DAMAGED_VALUES = [b"", b"\n", b"zz\n", b"a" * 63 + b"\n", b"A" * 64 + b"\n"]


def test_a_damaged_branch_is_a_one_line_error_naming_it_and_fsck_reports_it(store_url, tmp_path, cache_home):
    cid = small_repo(store_url, tmp_path)
    for value in DAMAGED_VALUES + [b"<cid>garbage", b"<cid>\n<cid>\n"]:
        value = value.replace(b"<cid>", cid.hex().encode())
        put_raw_ref(store_url, "branches/bad", value)
        r = reopen(store_url)
        with pytest.raises(DamagedRefError, match="branches/bad"):
            r.resolve("bad")
        with pytest.raises(DamagedRefError, match="branches/bad"):
            r.refs.branches()
        assert r.resolve("main") == cid  # the other refs still work
        damaged: dict[str, str] = {}
        assert r.refs.branches(damaged) == {"main": cid}
        assert list(damaged) == ["branches/bad"]
        report = fsck(r)
        assert len(report.problems) == 1 and "branches/bad" in report.problems[0], value
        assert report.commits == 1


def test_damaged_refs_on_the_command_line(store_url, tmp_path, cache_home):
    cid = small_repo(store_url, tmp_path)
    put_raw_ref(store_url, "branches/bad", b"")
    put_raw_ref(store_url, "tags/t", cid.hex().encode() + b"trailing\n")
    many = not store_url.startswith("s3://")  # the commands are the same on S3: two of them there
    for args in [["branch", "--json"], ["tag"]] + ([["log", "bad"], ["checkout", "bad", str(tmp_path / "co")]]
                                                   if many else []):
        line = cli_fails("-r", store_url, *args)
        assert "branches/bad" in line or "tags/t" in line, (args, line)
    proc = cli_ok("-r", store_url, "log", "main")  # what is not damaged still works
    assert cid.hex().encode() in proc.stdout
    proc = cli_ok("-r", store_url, "branch", "-d", "bad")  # and the damage can be removed
    assert b"damaged" in proc.stdout
    assert shared_store(store_url).load_ref("branches/bad") is None


def test_mounting_an_empty_branch_is_an_error_not_the_whole_layout(local_url, tmp_path, mounts):
    small_repo(local_url, tmp_path)
    put_raw_ref(local_url, "branches/empty", b"")
    proc = mounts.mount(local_url, mounts.mountpoint(), rev="empty", check=False)
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "branches/empty" in line and "empty" in line


def test_a_mount_keeps_showing_a_branch_whose_ref_is_damaged(local_url, tmp_path, cache_home):
    cid = small_repo(local_url, tmp_path)
    put_raw_ref(local_url, "branches/dev", cid.hex().encode() + b"\n")
    put_raw_ref(local_url, "branches/junk", b"not a commit")

    async def main():
        repo = reopen(local_url)
        async with fs_of(repo, refresh_s=0) as fs:  # every request reads the refs again
            branches = (await fs.lookup(ROOT_INODE, b"branches")).ino
            assert [n for n, _ in await vfs_listdir(fs, branches)] == ["dev", "main"]
            dev = (await fs.lookup(branches, b"dev")).ino
            put_raw_ref(local_url, "branches/dev", b"")  # emptied while mounted
            await trio.sleep(0.01)
            assert [n for n, _ in await vfs_listdir(fs, branches)] == ["dev", "main"]
            assert (await fs.lookup(branches, b"dev")).ino == dev
            tags = (await fs.lookup(ROOT_INODE, b"tags")).ino
            assert [n for n, _ in await vfs_listdir(fs, tags)] == ["v1"]
    trio.run(main)


def test_s3_keys_with_dot_dot_under_refs_and_index_are_ignored(s3_url, tmp_path, cache_home):
    cid = small_repo(s3_url, tmp_path)
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    client = boto3.client("s3")
    for key in ("repo/refs/branches/../../evil", "repo/refs/branches/a/../b", "repo/refs/tags//x",
                "repo/index/../config2", "repo/index/./x", "repo/commits/../../x"):
        client.put_object(Bucket=bucket, Key=key, Body=cid.hex().encode() + b"\n")
    client.close()
    r = reopen(s3_url)
    assert r.refs.branches() == {"main": cid}
    assert r.refs.tags() == {"v1": cid}
    assert fsck(r).problems == []
    assert all(".." not in k and "//" not in k for k in r.store.iter_keys(""))
    dest = tmp_path / "clone"
    cli_ok("clone", s3_url, str(dest))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "config2").exists()
    with Repository.open(str(dest)) as c:
        assert c.refs.branches() == {"main": cid}
        assert fsck(c, read_data=True).problems == []


# --- item 2: a manifest whose chunk sizes lie ---------------------------------------------
def craft_commit(url: str, trees_and_manifests, root: Tree, branch: str = "main", parent=None) -> bytes:
    """Store crafted blobs (chunks, manifests, trees) and a commit of ``root`` on ``branch``."""
    with Repository.open(url) as repo:
        with repo.writer() as w:
            for kind, data in trees_and_manifests:
                w.add(hash_bytes(data), kind, data)
            tid = w.add_tree(root)
        old = repo.refs.lookup_branch(branch)
        cid = repo.save_commit(Commit(tid, (old,) if old else (), "mallory", 0, "crafted", {}))
        repo.refs.set_branch_if_equals(branch, cid, old)
    return cid


def lying_manifest_repo(url: str, tmp_path):
    """main: ``lie.bin`` whose manifest declares its two 100-byte chunks as 150 and 50 bytes
    (the total, 200, is right); ``ok.bin`` beside it is honest."""
    small_repo(url, tmp_path)
    a, b = b"A" * 100, b"B" * 100
    ids = (hash_bytes(a), hash_bytes(b))
    lie = FileManifest(ids, (150, 50)).encode()
    ok = FileManifest(ids, (100, 100)).encode()
    root = Tree.build([TreeEntry("lie.bin", Kind.FILE, 200, hash_bytes(lie)),
                       TreeEntry("ok.bin", Kind.FILE, 200, hash_bytes(ok))])
    craft_commit(url, [(BlobKind.CHUNK, a), (BlobKind.CHUNK, b), (BlobKind.MANIFEST, lie),
                       (BlobKind.MANIFEST, ok)], root, branch="lying")
    return a + b


def test_a_manifest_whose_chunk_sizes_lie_is_rejected_by_every_reader(store_url, tmp_path, cache_home):
    good = lying_manifest_repo(store_url, tmp_path)
    r = reopen(store_url)
    cid = r.resolve("lying")
    lie = lookup_path(r, cid, "lie.bin")
    ok = lookup_path(r, cid, "ok.bin")
    assert r.load_file(ok.id) == good
    # cat, checkout, the Python API: one code path (FileReader / load_file), one error.
    with pytest.raises(CorruptObjectError, match="declares"):
        r.load_file(lie.id)
    with pytest.raises(CorruptObjectError, match="declares"):
        list(FileReader.open(r, lie.id).iter_chunks())
    with pytest.raises(CorruptObjectError, match="declares"):
        FileReader.open(r, lie.id).read(120, 10)
    assert "declares" in cli_fails("-r", store_url, "cat", "lying:lie.bin")
    assert "declares" in cli_fails("-r", store_url, "checkout", "lying", str(tmp_path / "co"))
    # fsck reports it, with and without reading the data.
    for read_data in (False, True):
        problems = fsck(reopen(store_url), read_data=read_data).problems
        assert any(lie.id.hex() in p and "declares" in p for p in problems), problems
        # Held to the index's sizes, not to the first manifest seen: the honest file beside it is not damage.
        assert not any(ok.id.hex() in p for p in problems), problems
    # sync refuses to copy it.
    with Repository.init(str(tmp_path / "dest")) as dst:
        with pytest.raises(CorruptObjectError, match="declares"):
            transfer(reopen(store_url), dst, [cid])


def test_a_mount_refuses_a_manifest_whose_chunk_sizes_lie(local_url, tmp_path, cache_home):
    good = lying_manifest_repo(local_url, tmp_path)

    async def main():
        for whole in (1 << 20, 0):  # small files read whole at open; or through the prefetcher
            repo = reopen(local_url)
            cid = repo.resolve("lying")
            async with fs_of(repo, cid, whole_file_bytes=whole) as fs:
                ok = (await fs.lookup(ROOT_INODE, b"ok.bin")).ino
                assert await vfs_read_all(fs, ok) == good
                ino = (await fs.lookup(ROOT_INODE, b"lie.bin")).ino
                for off in (0, 120):
                    fh = await fs.open(ino, os.O_RDONLY)
                    with pytest.raises(CorruptObjectError):
                        await fs.read(fh, off, 10)
                    await fs.release(fh)
    trio.run(main)


# --- item 3: the repository id never becomes a path ---------------------------------------
def test_a_hostile_repository_id_is_refused_before_it_becomes_a_path(store_url, tmp_path, cache_home):
    small_repo(store_url, tmp_path)
    store = shared_store(store_url)
    good = json.loads(store.load_object("config"))
    for rid in ["../../../../escaped", "0" * 31 + "/", "A" * 32, 42, None]:
        config = dict(good)
        if rid is None:
            del config["id"]
        else:
            config["id"] = rid
        store.save_object("config", json.dumps(config).encode())
        with pytest.raises(RepositoryError, match="id"):
            Repository.open(store_url).close()
    config["id"] = "../../../../escaped"
    store.save_object("config", json.dumps(config).encode())
    before = set(tmp_path.rglob("*"))
    assert "id" in cli_fails("-r", store_url, "lineage", "main")
    assert set(tmp_path.rglob("*")) == before  # nothing created in the test's tree...
    escaped = (cache_home / "commitfs" / "lineage" / "../../../..").resolve()
    assert not list(escaped.glob("escaped*"))  # ...nor where the id pointed
    assert not (cache_home / "commitfs" / "lineage").exists() or not any(
        (cache_home / "commitfs" / "lineage").iterdir())


# --- item 11: bad input is a one-line error, never a traceback ---------------------------
def test_undecodable_message_or_metadata_fails_before_any_data_is_stored(store_url, tmp_path, cache_home):
    small_repo(store_url, tmp_path)
    src = tmp_path / "more"
    write_file(src / "new.bin", b"n" * 70_000)
    packs = set(shared_store(store_url).iter_keys("packs/"))
    env = cli_env(PYTHONIOENCODING="utf-8")
    for extra in (["-m", "\udcff\udcfe"], ["-m", "ok", "--meta", "k=\udcff"], ["-m", "ok", "--meta", "\udcff=v"]):
        args = [os.fsencode(a) for a in ["-r", store_url, "commit", str(src), *extra]]
        proc = subprocess.run([sys.executable, "-m", "commitfs", *args], capture_output=True, env=env, timeout=60)
        line = assert_one_line_error(proc.returncode, proc.stderr.decode(errors="replace"))
        assert "UTF-8" in line
    assert set(shared_store(store_url).iter_keys("packs/")) == packs  # nothing was uploaded


def test_bad_repository_urls_and_revisions(local_url, tmp_path, cache_home):
    small_repo(local_url, tmp_path)
    assert "~nouser" in cli_fails("-r", "~nouser-commitfs-test/x", "log")
    line = cli_fails("-r", "s3://" + "b" * 300 + "/x", "log")
    assert "bucket name" in line
    with pytest.raises(RevisionError):
        reopen(local_url).resolve(None)


def symlink_tree(target: bytes, size: int | None = None) -> bytes:
    """A tree's encoding with one symlink entry, bypassing Tree.build's checks."""
    e = TreeEntry("link", Kind.SYMLINK, len(target) if size is None else size, hash_bytes(target), target)
    return Tree((e,)).encode()


def test_a_symlink_no_system_could_make_is_malformed(local_url, tmp_path, cache_home):
    small_repo(local_url, tmp_path)
    for target, size in [(b"a\0b", None), (b"", None), (b"abc", 7)]:
        data = symlink_tree(target, size)
        with pytest.raises(DecodeError, match="symlink"):
            Tree.decode(data)
        root = Tree.build([TreeEntry("d", Kind.DIR, 0, hash_bytes(data))])
        craft_commit(local_url, [(BlobKind.TREE, data)], root, branch="evil")
        assert any("symlink" in p for p in fsck(reopen(local_url)).problems)
    assert "symlink" in cli_fails("-r", local_url, "checkout", "evil", str(tmp_path / "co"))
    assert "symlink" in cli_fails("-r", local_url, "ls", "-R", "evil")


# --- item 10: the runtime directory is made when missing ---------------------------------
@pytest.fixture
def empty_runtime_dir(monkeypatch):
    """XDG_RUNTIME_DIR: an existing directory with no commitfs/mounts in it yet
    (short: a socket's path has 107 bytes); removed after the mounts are gone."""
    run = Path(tempfile.mkdtemp(prefix="cfrun-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    yield run
    shutil.rmtree(run, ignore_errors=True)


@pytest.mark.timeout(90)
def test_a_writable_mount_makes_a_missing_runtime_directory_private(empty_runtime_dir, local_url, tmp_path, mounts):
    run = empty_runtime_dir
    small_repo(local_url, tmp_path)
    mp = mounts.mountpoint()
    mounts.mount(local_url, mp, "--writable", rev="main")
    (mp / "new.txt").write_bytes(b"written\n")
    assert (mp / "a.txt").read_bytes() == b"alpha\n"
    for d in (run / "commitfs", run / "commitfs" / "mounts"):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700
    proc = cli_ok("-r", local_url, "commit", str(mp), "-m", "from the mount")
    assert len(proc.stdout.strip()) == 64


# --- item 1: answers cut at random points --------------------------------------------------
def _truth(store):
    keys = sorted(store.iter_keys(""))
    return {
        "keys": keys,
        "sizes": {k: store.lookup_size(k) for k in keys},
        "objects": {k: store.load_object(k) for k in keys},
        "refs": dict(store.iter_refs("")),
    }


@pytest.mark.timeout(120)
def test_s3_answers_cut_at_random_points_are_retried_or_errors_never_data(s3_server, s3_url, tmp_path, cache_home):
    """Every read through a proxy cutting 30% of answers (in the headers or the body)
    returns exactly what the bucket holds, or raises StorageError: never an empty
    listing, an empty or short object, a missing size."""
    small_repo(s3_url, tmp_path)
    direct = shared_store(s3_url)
    truth = _truth(direct)
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    rng = random.Random(20)
    errors = 0
    with CuttingProxy(s3_server.port, probability=0.3, seed=20) as proxy:
        store = S3Store(bucket, "repo", endpoint_url=proxy.endpoint_url, attempts=6, deadline_s=20)
        try:
            for _ in range(50):
                op = rng.randrange(6)
                key = rng.choice(truth["keys"])
                data = truth["objects"][key]
                try:
                    if op == 0:
                        assert sorted(store.iter_keys("")) == truth["keys"]
                    elif op == 1:
                        assert dict(store.iter_refs("")) == truth["refs"]
                    elif op == 2:
                        assert store.lookup_size(key) == truth["sizes"][key]
                    elif op == 3:
                        assert store.load_object(key) == data
                    elif op == 4:
                        off = rng.randrange(len(data) + 5)
                        n = rng.randrange(1, 200)
                        assert store.load_range(key, off, n) == data[off:off + n]
                    else:
                        name = rng.choice(list(truth["refs"]))
                        assert store.load_ref(name) == truth["refs"][name]
                except StorageError:
                    errors += 1
        finally:
            store.close()
    assert proxy.cuts >= 12 and proxy.header_cuts >= 5, (proxy.cuts, proxy.header_cuts)
    assert errors <= 5  # retried: nearly every operation got through


@pytest.mark.timeout(150)
def test_commands_over_a_cutting_network_succeed_whole_or_fail_in_one_line(s3_server, s3_url, tmp_path, cache_home):
    """clone, branch --json, log, commit through a proxy cutting 30% of answers:
    each exits 0 with the whole truth, or 1 with one line; never 0 with nothing."""
    cid = small_repo(s3_url, tmp_path)
    with Repository.open(s3_url) as r:
        r.refs.set_branch_if_equals("dev", cid, None)
    branches = {"dev": cid.hex(), "main": cid.hex()}
    more = tmp_path / "more"
    write_file(more / "m.bin", random.Random(3).randbytes(50_000))
    with CuttingProxy(s3_server.port, probability=0.3, seed=21) as proxy:
        env = cli_env(AWS_ENDPOINT_URL=proxy.endpoint_url, COMMITFS_S3_ENDPOINT_URL=proxy.endpoint_url)
        outcomes = []
        for args in (["branch", "--json"], ["clone", s3_url, str(tmp_path / "c1")],
                     ["commit", str(more), "-b", "dev", "-m", "m"], ["branch", "--json"]):
            proc = run_cli("-r", s3_url, *args, env=env)
            err = proc.stderr.decode(errors="replace")
            if proc.returncode != 0:
                assert_one_line_error(proc.returncode, err)
                outcomes.append("error")
                continue
            assert "Traceback" not in err
            outcomes.append("ok")
            if args[0] == "branch":
                got = json.loads(proc.stdout)
                assert got.keys() == branches.keys(), got  # never {}
            elif args[0] == "log":
                assert cid.hex()[:12].encode() in proc.stdout
            elif args[0] == "clone":
                with Repository.open(args[2]) as c:
                    assert set(c.refs.branches()) == {"dev", "main"}
                    assert fsck(c, read_data=True).problems == []
            elif args[0] == "commit":
                branches["dev"] = proc.stdout.decode().split()[-1]
    assert proxy.cuts >= 8, proxy.cuts
    assert outcomes.count("ok") >= 3, outcomes
    assert fsck(reopen(s3_url), read_data=True).problems == []  # what got through is whole


# --- item 4: tree DAGs whose paths multiply ------------------------------------------------
def exploding_repo(url: str, tmp_path, depth: int = 41) -> bytes:
    """Branch ``dag``: ``depth`` trees, each naming the next twice (2^(depth-1) paths
    from 2*depth stored entries) beside an honest file; returns the commit id."""
    small_repo(url, tmp_path)
    f = FileManifest((), ()).encode()
    tree = Tree.build([TreeEntry("leaf", Kind.FILE, 0, hash_bytes(f))])
    blobs = [(BlobKind.MANIFEST, f)]
    for _ in range(depth - 1):
        data = tree.encode()
        blobs.append((BlobKind.TREE, data))
        tid = hash_bytes(data)
        tree = Tree.build([TreeEntry("a", Kind.DIR, 0, tid), TreeEntry("b", Kind.DIR, 0, tid)])
    root = Tree.build([TreeEntry("dag", Kind.DIR, 0, hash_bytes(tree.encode())),
                       TreeEntry("ok.txt", Kind.FILE, 0, hash_bytes(f))])
    blobs.append((BlobKind.TREE, tree.encode()))
    return craft_commit(url, blobs, root, branch="dag")


@pytest.mark.timeout(60)
def test_walks_of_a_tree_dag_whose_paths_multiply_are_refused_before_any_work(store_url, tmp_path, cache_home):
    exploding_repo(store_url, tmp_path)
    r = reopen(store_url)
    cid = r.resolve("dag")
    with pytest.raises(ExpansionLimitError, match="paths"):
        next(iter(walk(r, cid)))
    dest = tmp_path / "co"
    with pytest.raises(ExpansionLimitError):
        checkout(r, cid, dest)
    assert not dest.exists() and not list(tmp_path.glob(".co.checkout-*"))  # nothing was written
    with pytest.raises(ExpansionLimitError):
        list(diff_trees(r, r.load_commit(r.resolve("main")).tree, r.load_commit(cid).tree))
    if not store_url.startswith("s3://"):  # the command line: the same one-line error
        assert "refusing to walk" in cli_fails("-r", store_url, "checkout", "dag", str(dest))
        assert "refusing to walk" in cli_fails("-r", store_url, "ls", "-R", "dag")
        assert "refusing to walk" in cli_fails("-r", store_url, "diff", "main", "dag")
    assert fsck(reopen(store_url)).problems == []  # fsck visits each tree once: no bound needed
    # A walk of the honest part, and modest sharing, are fine.
    deep = "dag/" + "/".join(["a"] * 30)  # 10 levels left: 2^10 paths, within the allowance
    items = list(walk(r, cid, deep))
    assert len(items) == 2 ** 11 - 2 + 2 ** 10 and all(i.path.startswith(deep + "/") for i in items)


def test_a_find_on_a_mount_of_a_tree_dag_stays_bounded(local_url, tmp_path, cache_home, monkeypatch):
    """Each tree met at a second path is held to the rule; with a small allowance
    (200 + 2 per entry) a find(1) of 2^40 paths lists a few hundred directories."""
    monkeypatch.setattr(treewalk, "MAX_PATHS_ALLOWANCE", 200)
    monkeypatch.setattr(treewalk, "MAX_PATHS_RATIO", 2)
    exploding_repo(local_url, tmp_path)

    async def main():
        repo = reopen(local_url)
        async with fs_of(repo, repo.resolve("dag")) as fs:
            listed, refused, stack = 0, 0, [ROOT_INODE]
            while stack:  # what find(1) does: list every directory it meets
                ino = stack.pop()
                try:
                    entries = await vfs_listdir(fs, ino)
                except ExpansionLimitError:
                    refused += 1
                    continue
                listed += 1
                for name, attr in entries:
                    if stat.S_ISDIR(attr.mode):
                        stack.append((await fs.lookup(ino, name.encode())).ino)
                assert listed < 3000
            assert refused >= 1
    trio.run(main)


# --- item 8: a clone killed at any point resumes -------------------------------------------
def _clone_states(dest: Path, src: str):
    """What a clone killed at each point leaves in ``dest`` (made by the same steps)."""
    yield "nothing yet", lambda: dest.mkdir()
    yield "its origin being recorded", lambda: (  # the compare-and-swap's lock made, no record yet
        (dest / "refs").mkdir(parents=True), (dest / "refs" / ".lock").touch())
    yield "its origin", lambda: Remotes(open_store(str(dest))).add("origin", src)
    yield "its origin and a config being written", lambda: (
        Remotes(open_store(str(dest))).add("origin", src),
        (dest / f".tmp-{'0' * 32}-config").write_bytes(b'{"format": "commi'))
    yield "its origin and its config", lambda: (
        Remotes(open_store(str(dest))).add("origin", src), Repository.init(str(dest)).close())


def test_a_clone_killed_at_any_point_resumes(tmp_path, cache_home):
    src = str(tmp_path / "src-repo")
    cid = small_repo(src, tmp_path)
    for i, (what, make) in enumerate(_clone_states(tmp_path / "d", src)):
        dest = tmp_path / f"dest{i}"
        for step in _clone_states(dest, src):
            if step[0] == what:
                step[1]()
        proc = run_cli("clone", src, str(dest))
        assert proc.returncode == 0, (what, proc.stderr)
        with Repository.open(str(dest)) as c:
            assert c.refs.branches() == {"main": cid} and c.refs.tags() == {"v1": cid}, what
            assert Remotes(c.store).lookup("origin").url == src
            assert fsck(c, read_data=True).problems == [], what
        assert not list(dest.glob(".tmp-*"))
    # A repository that is not a clone of this source is still refused.
    Repository.init(str(tmp_path / "mine")).close()
    assert "already a commitfs repository" in cli_fails("clone", src, str(tmp_path / "mine"))


@pytest.mark.timeout(120)
def test_sigkill_during_clone_then_a_rerun_completes(tmp_path, cache_home):
    src = str(tmp_path / "src-repo")
    small_repo(src, tmp_path)
    big = tmp_path / "big"
    rng = random.Random(8)
    for i in range(6):
        write_file(big / f"f{i}.bin", rng.randbytes(1 << 20))
    with Repository.open(src) as r:
        commit_directory(r, big, message="big", branch="big")
        want = r.refs.branches()
    start = time.monotonic()
    cli_ok("clone", src, str(tmp_path / "timing"))
    took = time.monotonic() - start
    for i in range(3):
        dest = tmp_path / f"k{i}"
        proc = subprocess.Popen([sys.executable, "-m", "commitfs", "clone", src, str(dest)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
        try:
            time.sleep(rng.uniform(0.1, took))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        proc = run_cli("clone", src, str(dest))
        assert proc.returncode == 0, proc.stderr
        with Repository.open(str(dest)) as c:
            assert c.refs.branches() == want
            assert fsck(c).problems == []


# --- item 9: a failed index write leaves no packs behind ------------------------------------
def test_a_commit_that_cannot_write_its_index_segment_removes_its_packs(store_url, tmp_path, cache_home):
    small_repo(store_url, tmp_path)
    src = tmp_path / "more"
    write_file(src / "m.bin", random.Random(9).randbytes(300_000))
    before = set(shared_store(store_url).iter_keys("packs/"))
    r = faulty_repository(store_url)
    r.store.fail_on = {"save_object"}
    r.store.fail_keys = lambda key: key.startswith("index/")
    r.store.error = lambda msg: StorageError("no space left on device while writing index/x")
    with pytest.raises(StorageError, match="no space"):
        commit_directory(r, src, message="m")
    assert r.store.calls["save_object"] >= 3  # it did write packs first
    assert set(shared_store(store_url).iter_keys("packs/")) == before  # and removed them
    assert fsck(reopen(store_url)).problems == []
    res = commit_directory(reopen(store_url), src, message="m")  # the re-run needs the same room
    assert res.created


def test_a_rerun_after_a_full_disk_needs_no_more_room_than_the_first_attempt(tmp_path, cache_home):
    with mounted_tmpfs(tmp_path / "fs", "2m") as fs:
        url = str(fs / "repo")
        small_repo(url, tmp_path)
        src = tmp_path / "big"
        rng = random.Random(10)
        for i in range(3):
            write_file(src / f"b{i}.bin", rng.randbytes(400_000))
        filler = fs / "filler"
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        filler.write_bytes(b"\0" * (free - 1_000_000))  # room for about 2 of the 3 files
        packs = pack_bytes(url)
        with pytest.raises(StorageError, match="no space"):
            commit_directory(reopen(url), src, message="big")
        assert pack_bytes(url) == packs  # what the failed attempt stored is gone
        filler.unlink()
        filler.write_bytes(b"\0" * (free - 1_400_000))  # room for the commit, once
        assert commit_directory(reopen(url), src, message="big").created
        assert_fsck_clean(url)


@pytest.mark.timeout(90)
def test_find_on_a_real_mount_of_a_tree_dag_ends(local_url, tmp_path, mounts, monkeypatch):
    """find(1) over a mount of 41 trees / 2^40 paths ends, with errors for the refused
    directories (a small COMMITFS_WALK_ALLOWANCE keeps the bounded part short)."""
    monkeypatch.setenv("COMMITFS_WALK_ALLOWANCE", "100")
    exploding_repo(local_url, tmp_path)
    mp = mounts.mountpoint()
    mounts.mount(local_url, mp, rev="dag")
    proc = subprocess.run(["find", str(mp)], capture_output=True, timeout=60)
    listed = proc.stdout.count(b"\n")
    assert proc.returncode != 0 and b"Input/output error" in proc.stderr  # the refused ones
    assert 40 < listed < 20_000, listed
    assert (mp / "ok.txt").read_bytes() == b""
