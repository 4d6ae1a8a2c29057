"""gc: what it frees, what it keeps, and its protocol with concurrent writers (docs/FORMAT.md).

Grace periods here are a fraction of a second, with ``force`` (the CLI's
``--force``): below the safe minimum, for tests only.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from commitfs.errors import GcInterferenceError, GcLeaseError, InputError
from commitfs.ops import sync
from commitfs.ops.checkout import checkout
from commitfs.ops.gc import KILL_AT_ENV, collect
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.gcstate import LEASE_REF, Lease
from commitfs.repo.pack import pack_key
from commitfs.repo.repository import Repository, commit_key
from core_fixtures import (
    assert_fsck_clean,
    cli_env,
    cli_fails,
    cli_ok,
    describe,
    faulty_repository,
    pack_bytes,
    reopen,
    shared_store,
    store_state,
    write_file,
)

MiB = 1 << 20


def _gc(url, grace=0.0, **kw):
    return collect(reopen(url), grace=grace, force=True, **kw)


def _packs(url) -> dict[str, int]:
    store = shared_store(url)
    return {k: store.lookup_size(k) for k in store.iter_keys("packs/")}


def _readback(url, cid, expected: dict, tmp_path: Path) -> None:
    dest = tmp_path / f"out-{cid.hex()[:12]}-{random.randrange(1 << 30)}"
    checkout(reopen(url), cid, dest)
    assert describe(dest) == expected


@pytest.fixture
def two_branches(repo, tmp_path):
    """main: a.bin; branch x: a.bin and 2 MiB only x has, in packs only x wrote."""
    rng = random.Random(15)
    main_dir, x_dir = tmp_path / "main", tmp_path / "x"
    write_file(main_dir / "a.bin", rng.randbytes(MiB))
    main = commit_directory(repo, main_dir, message="main").commit_id
    before = _packs(repo.url)
    write_file(x_dir / "a.bin", (main_dir / "a.bin").read_bytes())
    write_file(x_dir / "only-x.bin", rng.randbytes(2 * MiB))
    x = commit_directory(repo, x_dir, branch="x", message="x").commit_id
    x_packs = {k: s for k, s in _packs(repo.url).items() if k not in before}
    return repo, main, x, x_packs, describe(main_dir), describe(x_dir)


def test_gc_frees_exactly_a_deleted_branch(two_branches, tmp_path):
    repo, main, x, x_packs, main_files, _ = two_branches
    repo.refs.set_branch_if_equals("x", None, x)
    url = repo.url
    state = store_state(url)
    dry = _gc(url, dry_run=True)
    assert store_state(url) == state  # --dry-run deletes nothing, writes nothing
    planned = {pack_key(p.pack): p.size for p in dry.plan if p.action == "delete"}
    assert planned == x_packs
    report = _gc(url)
    assert report.packs_deleted == len(x_packs) and report.commits_deleted == 1
    assert not any(k in _packs(url) for k in x_packs)
    assert shared_store(url).lookup_size(commit_key(x)) is None
    # Bytes freed: x's packs and its commit object, give or take the index
    # segment rewritten (a few hundred bytes: within a pack's rounding).
    expected = sum(x_packs.values())
    assert abs(report.bytes_freed - expected) < 4096, (report.bytes_freed, expected)
    assert abs((report.bytes_before - report.bytes_after) - dry.bytes_freed) < 4096
    _readback(url, main, main_files, tmp_path)
    assert_fsck_clean(url, head=main)
    again = _gc(url)  # nothing left to free
    assert again.packs_deleted == 0 and again.bytes_freed <= 0 + 4096


def test_gc_keeps_what_tags_aliases_and_metadata_reach(two_branches, tmp_path):
    repo, main, x, x_packs, _, x_files = two_branches
    # x is kept by a tag, then only by a ref in a namespace gc has never heard of.
    repo.refs.create_tag("keep", x)
    repo.refs.set_branch_if_equals("x", None, x)
    assert _gc(repo.url).packs_deleted == 0
    repo.store.save_ref_if_equals("aliases/model", x.hex().encode() + b"\nmore lines\n", None)
    repo.store.save_ref_if_equals("tags/keep", None, x.hex().encode() + b"\n")
    assert _gc(repo.url).packs_deleted == 0
    _readback(repo.url, x, x_files, tmp_path)
    # A ref gc cannot parse stops it before it deletes anything.
    repo.store.save_ref_if_equals("aliases/bad", b"not a commit id\n", None)
    with pytest.raises(Exception, match="does not parse"):
        _gc(repo.url)
    assert all(k in _packs(repo.url) for k in x_packs)


def test_gc_after_interrupted_commit_and_push(repo, tmp_path, store_url):
    rng = random.Random(16)
    src = tmp_path / "src"
    write_file(src / "kept.bin", rng.randbytes(MiB))
    main = commit_directory(repo, src, message="kept").commit_id
    clean = pack_bytes(repo.url)
    # A commit killed before its branch moved: packs, segment, commit object...
    write_file(src / "lost.bin", rng.randbytes(MiB))
    faulty = faulty_repository(repo.url)
    faulty.store.fail_on = {"save_ref_if_equals"}
    with pytest.raises(Exception):
        commit_directory(faulty, src, message="never lands")
    # ...and a push cut before the remote branch moved.
    remote = Repository.init(str(tmp_path / "remote"))
    remote_faulty = faulty_repository(remote.url)
    remote_faulty.store.fail_on = {"save_ref_if_equals"}
    with pytest.raises(Exception):
        sync.push(reopen(repo.url), remote_faulty)
    assert pack_bytes(remote.url) > MiB and pack_bytes(repo.url) > clean + MiB // 2
    # A long grace keeps them (they may be a writer's work in progress)...
    young = collect(reopen(repo.url), grace=3600, wait=False)
    assert young.packs_deleted == 0 and pack_bytes(repo.url) > clean + MiB // 2
    # ...a short one frees them.
    _gc(repo.url)
    assert pack_bytes(repo.url) == clean
    _gc(remote.url)
    assert pack_bytes(remote.url) == 0
    assert_fsck_clean(repo.url, head=main)
    assert_fsck_clean(remote.url, head=None)


def test_repack_copies_the_live_blobs_of_a_sparse_pack(repo, tmp_path):
    rng = random.Random(17)
    x_dir, main_dir = tmp_path / "x", tmp_path / "main"
    shared, dead = rng.randbytes(3 * MiB), rng.randbytes(MiB)
    write_file(x_dir / "shared.bin", shared)
    write_file(x_dir / "dead.bin", dead)
    x = commit_directory(repo, x_dir, branch="x", message="x").commit_id
    write_file(main_dir / "shared.bin", shared)  # deduplicated against x's pack
    main = commit_directory(repo, main_dir, message="main").commit_id
    repo.refs.set_branch_if_equals("x", None, x)
    keep = _gc(repo.url, dry_run=True)  # x's data pack is 75% live: above the default 0.5
    data_pack = [p for p in keep.plan if p.size > 3 * MiB]
    assert len(data_pack) == 1 and data_pack[0].action == "keep"
    report = _gc(repo.url, repack_below=0.9)
    assert report.packs_repacked >= 1 and report.packs_written >= 1
    assert report.bytes_copied >= len(shared)
    assert abs(report.bytes_freed - len(dead)) < 64 * 1024, report.bytes_freed
    _readback(repo.url, main, describe(main_dir), tmp_path)
    assert_fsck_clean(repo.url, head=main)


def test_a_ref_set_behind_gcs_back_keeps_everything_it_reaches(repo, tmp_path):
    """A writer that does not honour the protocol (an older commitfs, a hand
    edit) points a ref at a commit gc has condemned, whose blobs are out of the
    index: the sweep keeps every blob the ref reaches and indexes it again."""
    rng = random.Random(23)
    x_dir, main_dir = tmp_path / "x", tmp_path / "main"
    shared = rng.randbytes(3 * MiB)
    write_file(x_dir / "shared.bin", shared)
    write_file(x_dir / "dead.bin", rng.randbytes(MiB))  # dead in a pack that stays (75% live)
    x = commit_directory(repo, x_dir, branch="x", message="x").commit_id
    write_file(main_dir / "shared.bin", shared)
    commit_directory(repo, main_dir, message="main")
    repo.refs.set_branch_if_equals("x", None, x)
    _gc(repo.url, wait=False)  # condemned; dead.bin's chunks are in no index now
    repo.store.save_ref_if_equals("branches/back", x.hex().encode() + b"\n", None)  # no check made
    report = _gc(repo.url)
    assert report.records_finished == 1 and report.notes
    _readback(repo.url, x, describe(x_dir), tmp_path)
    assert_fsck_clean(repo.url, head=x, branch="back")


def _shared_with_a_dropped_branch(repo, tmp_path, seed: int) -> tuple[bytes, bytes]:
    """Branch x holds shared.bin (1 MiB) and dead.bin (2 MiB); main holds shared.bin; then
    x is deleted, so gc repacks dead.bin's pack away.  Returns (main's commit, shared)."""
    rng = random.Random(seed)
    x_dir, main_dir = tmp_path / "x", tmp_path / "main"
    shared = rng.randbytes(MiB)
    write_file(x_dir / "shared.bin", shared)
    write_file(x_dir / "dead.bin", rng.randbytes(2 * MiB))
    x = commit_directory(repo, x_dir, branch="x", message="x").commit_id
    write_file(main_dir / "shared.bin", shared)
    main = commit_directory(repo, main_dir, message="main").commit_id
    repo.refs.set_branch_if_equals("x", None, x)
    return main, shared


def test_a_reader_opened_before_gc_reads_what_gc_moved(repo, tmp_path):
    """A long-lived reader (a mount's repository) holds index segments and
    answers from before gc: when a pack it names is gone, it re-lists and reads
    the blob at its new place."""
    main, shared = _shared_with_a_dropped_branch(repo, tmp_path, 22)
    reader = reopen(repo.url)
    fid = reader.load_tree(reader.load_commit(main).tree).get("shared.bin").id
    assert bytes(reader.load_file(fid)) == shared  # segments loaded, locations known
    ids = list(reader.load_manifest(fid).chunk_ids)
    old_pack = reader.locate(ids[0]).pack
    stale = reopen(repo.url)  # another one, reading by chunks
    assert all(stale.locate(c).pack == old_pack for c in ids)
    report = _gc(repo.url, repack_below=0.9)
    assert report.packs_repacked >= 1 and shared_store(repo.url).lookup_size(pack_key(old_pack)) is None
    assert bytes(reader.load_file(fid)) == shared
    assert b"".join(stale.load_chunks(ids)) == shared


def _held(path: str) -> list[str]:
    """What this process's open descriptors name at ``path`` (" (deleted)" once removed)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(path):
            out.append(target)
    return out


def test_a_reader_lets_go_of_the_packs_gc_removed(local_repo, tmp_path, monkeypatch):
    """A long-lived reader of a local repository (a mount's) keeps pack descriptors
    open: the store's for its reads (storage/local.py), the resident reader's for reads
    from the page cache (repo/resident.py).  Once gc in another process has removed a
    pack, the reader's next reads (RECHECK_S later; 0 here) close both, so the pack's
    space is freed while the reader lives on, and the file still reads right, now
    from its new pack."""
    from commitfs.repo import resident
    from commitfs.storage import local

    monkeypatch.setattr(resident, "RECHECK_S", 0.0)
    monkeypatch.setattr(local, "RECHECK_S", 0.0)
    repo = local_repo
    main, shared = _shared_with_a_dropped_branch(repo, tmp_path, 24)
    with Repository.open(repo.url) as reader:  # its own store, as a mount's daemon has
        fid = reader.load_tree(reader.load_commit(main).tree).get("shared.bin").id
        ids = list(reader.load_manifest(fid).chunk_ids)
        assert b"".join(reader.load_chunks(ids)) == shared  # by the store's descriptor
        old_pack = reader.locate(ids[0]).pack
        path = str(reader.store.local_path(pack_key(old_pack)))
        got = reader.file_from_memory(fid)  # the page cache's bytes, by the resident reader's
        assert got is not None and bytes(got) == shared
        assert _held(path) == [path, path]
        cli_ok("-r", repo.url, "gc", "--force", "--grace", "0s", "--repack-below", "0.9")
        assert not os.path.exists(path)
        assert _held(path) == [path + " (deleted)"] * 2  # the space is still allocated
        assert reader.file_from_memory(fid) is None  # the old pack is gone: the blocking path decides
        assert b"".join(reader.load_chunks(ids)) == shared
        assert _held(path) == []
        assert reader.locate(ids[0]).pack != old_pack


def test_a_storage_error_mid_gc_stops_it_and_a_rerun_finishes(two_branches, tmp_path):
    from commitfs.errors import StorageError
    repo, main, x, x_packs, main_files, _ = two_branches
    repo.refs.set_branch_if_equals("x", None, x)
    stopped = 0
    for method in ("load_object", "save_object", "remove_object", "load_range", "iter_keys"):
        faulty = faulty_repository(repo.url)
        faulty.store.fail_on, faulty.store.fail_count = {method}, 1  # the next such call fails
        try:
            collect(faulty, grace=0, force=True)
        except StorageError as exc:
            assert "injected failure" in str(exc)
            stopped += 1
        assert_fsck_clean(repo.url, head=main)  # nothing still needed was deleted
        _readback(repo.url, main, main_files, tmp_path)
    assert stopped >= 3
    _gc(repo.url)
    assert not any(k in _packs(repo.url) for k in x_packs)
    assert not list(repo.store.iter_keys("gc/records/"))
    assert_fsck_clean(repo.url, head=main)


def test_second_gc_is_refused_and_a_dead_lease_expires(repo, monkeypatch):
    held = Lease(repo.store, ttl=30)
    held.acquire()
    try:
        with pytest.raises(GcLeaseError, match="another gc is running"):
            _gc(repo.url)
        err = cli_fails("-r", repo.url, "gc", "--grace", "0", "--force")
        assert "another gc is running" in err
    finally:
        held.release()
    # A holder that died: its lease expires, and the next gc takes it over.
    dead = Lease(repo.store, ttl=0.5)
    dead.acquire()
    dead._stop.set()  # stops renewing, as a killed process would
    time.sleep(0.6)
    _gc(repo.url)
    assert json.loads(repo.store.load_ref(LEASE_REF))["expires"] == 0  # released


def test_grace_below_the_safe_minimum_is_refused(repo):
    with pytest.raises(InputError, match="safe minimum"):
        collect(repo, grace=5)
    err = cli_fails("-r", repo.url, "gc", "--grace", "30s")
    assert "safe minimum" in err and "--force" in err
    cli_fails("-r", repo.url, "gc", "--grace", "soon", code=1)
    cli_fails("-r", repo.url, "gc", "--repack-below", "2", code=2)


def test_cli_dry_run_and_json(two_branches):
    repo, main, x, x_packs, _, _ = two_branches
    repo.refs.set_branch_if_equals("x", None, x)
    out = cli_ok("-r", repo.url, "gc", "--dry-run", "--grace", "0", "--force").stdout.decode()
    assert "would delete pack" in out and "nothing changed" in out
    assert all(k in _packs(repo.url) for k in x_packs)
    doc = json.loads(cli_ok("-r", repo.url, "gc", "--grace", "0", "--force", "--json").stdout)
    assert doc["packs_deleted"] == len(x_packs) and doc["bytes_freed"] > 2 * MiB
    assert {"bytes_before", "bytes_after", "packs_written", "seconds"} <= set(doc)


# --- writers and gc ------------------------------------------------------------------
def test_writer_does_not_deduplicate_against_a_condemned_pack(two_branches, tmp_path):
    """A writer that re-adds what only a deleted branch had, after gc condemned
    it: the blobs are stored again, and the commit survives the sweep."""
    repo, main, x, x_packs, _, x_files = two_branches
    repo.refs.set_branch_if_equals("x", None, x)
    condemned = _gc(repo.url, wait=False)  # condemn now, delete at the next run
    assert condemned.notes and condemned.packs_deleted == 0
    assert list(repo.store.iter_keys("gc/records/"))
    writer = reopen(repo.url)
    stats = commit_directory(writer, tmp_path / "x", branch="again", message="re-add")
    assert stats.write.blobs_new > 0  # stored again, not deduplicated against the condemned copy
    swept = _gc(repo.url)
    assert swept.records_finished == 1 and swept.packs_deleted >= len(x_packs) - 1
    assert not any(k in _packs(repo.url) for k in x_packs)
    _readback(repo.url, stats.commit_id, x_files, tmp_path)
    assert_fsck_clean(repo.url)


def test_publish_refuses_what_gc_removed_meanwhile(two_branches, tmp_path):
    """A writer that deduplicated against x's blobs before gc ran, and moves
    its branch after gc deleted them: refused, nothing published."""
    repo, main, x, x_packs, _, _ = two_branches
    repo.refs.set_branch_if_equals("x", None, x)
    writer = reopen(repo.url)
    only_x = next(e for e in writer.load_tree(writer.load_commit(x).tree).entries if e.name == "only-x.bin")
    assert writer.has_blob(only_x.id)  # a deduplication, before gc
    _gc(repo.url)
    from commitfs.model.objects import Commit, Tree, TreeEntry, Kind
    with writer.writer() as w:
        tid = w.add_tree(Tree.build([TreeEntry("f", Kind.FILE, only_x.size, only_x.id)]))
    cid = writer.save_commit(Commit(tid, (main,), "t", 1, "stale dedup"))
    with pytest.raises(GcInterferenceError, match="run it again"):
        writer.refs.set_branch_if_equals("main", cid, main)
    assert reopen(repo.url).refs.lookup_branch("main") == main
    assert_fsck_clean(repo.url, head=main)


_WRITER = textwrap.dedent("""
    import json, os, random, sys, time
    from pathlib import Path
    from commitfs.errors import GcInterferenceError, RefConflictError
    from commitfs.ops.snapshot import commit_directory
    from commitfs.repo.repository import Repository
    url, seed, rounds, work, old = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    rng = random.Random(seed)
    repo = Repository.open(url)
    for i in range(rounds):
        d = work / f"w{seed}-{i}"
        d.mkdir(parents=True)
        files = {f"new-{seed}-{i}.bin": rng.randbytes(rng.choice([3000, 70000, 300000]))}
        if rng.random() < 0.5:  # re-add a file only the deleted branch had
            name = rng.choice(sorted(os.listdir(old)))
            files[name] = (Path(old) / name).read_bytes()
        for name, data in files.items():
            (d / name).write_bytes(data)
        for attempt in range(20):
            try:
                cid = commit_directory(repo, d, branch="main", message=f"{seed}/{i}").commit_id
                break
            except (GcInterferenceError, RefConflictError) as exc:
                print("retry:", exc, file=sys.stderr)
        else:
            continue
        print(json.dumps({"commit": cid.hex(), "dir": str(d)}), flush=True)
""")


@pytest.mark.timeout(240)
def test_concurrent_writer_processes_while_gc_runs_repeatedly(repo, tmp_path):
    rng = random.Random(18)
    old = tmp_path / "old"
    for i in range(6):
        write_file(old / f"old-{i}.bin", rng.randbytes(rng.choice([20000, 200000])))
    x = commit_directory(repo, old, branch="x", message="old").commit_id
    repo.refs.set_branch_if_equals("x", None, x)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = cli_env()
    writers = [subprocess.Popen([sys.executable, str(script), repo.url, str(seed), "3", str(tmp_path / "work"),
                                 str(old)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
               for seed in range(3)]
    runs = 0
    try:
        while any(w.poll() is None for w in writers) or runs < 2:
            # A grace period above the longest pause a writer makes between storing its
            # commit object and moving the branch (the protocol assumes one), even on a
            # loaded machine; S3 rounds its timestamps down to the second.
            _gc(repo.url, grace=2.0, repack_below=0.5)
            runs += 1
        outs = [w.communicate(timeout=60) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert all(w.returncode == 0 for w in writers), [o[1].decode()[-2000:] for o in outs]
    acked = [json.loads(line) for out, _ in outs for line in out.decode().splitlines()]
    assert len(acked) >= 6 and runs >= 2
    _gc(repo.url, grace=0.0)
    for a in acked:
        _readback(repo.url, bytes.fromhex(a["commit"]), describe(a["dir"]), tmp_path)
    assert_fsck_clean(repo.url)


_KILL_POINTS = ["repacked", "recorded", "indexed", "completed", "segment-removed", "sweep", "sweep-indexed",
                "pack-deleted", "commits-deleted"]


@pytest.mark.timeout(240)
def test_sigkill_of_gc_at_every_step_then_a_rerun_finishes(local_url, tmp_path):
    rng = random.Random(19)
    repo = Repository.init(local_url)
    main_dir = tmp_path / "main"
    write_file(main_dir / "a.bin", rng.randbytes(MiB // 2))
    main = commit_directory(repo, main_dir, message="main").commit_id
    env = cli_env(COMMITFS_GC_LEASE_SECONDS="0.5")
    points = list(_KILL_POINTS)
    random.Random().shuffle(points)  # a different order each run: leftovers of one meet the next
    for point in points:
        # x stores a file main then re-adds (live) beside one nothing keeps: a pack to repack.
        x_dir = tmp_path / f"x-{point}"
        keep = rng.randbytes(MiB // 4)
        write_file(x_dir / "keep.bin", keep)
        write_file(x_dir / "dead.bin", rng.randbytes(MiB // 4))
        x = commit_directory(reopen(local_url), x_dir, branch="x", message=point).commit_id
        write_file(main_dir / f"keep-{point}.bin", keep)
        main = commit_directory(reopen(local_url), main_dir, message=point).commit_id
        reopen(local_url).refs.set_branch_if_equals("x", None, x)
        killed = subprocess.run([sys.executable, "-m", "commitfs", "-r", local_url, "gc", "--grace", "0",
                                 "--force", "--repack-below", "0.99"],
                                env={**env, KILL_AT_ENV: point}, capture_output=True, timeout=60)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        assert_fsck_clean(local_url, head=main)  # leftovers at most
        _readback(local_url, main, describe(main_dir), tmp_path)
        time.sleep(0.6)  # the killed run's lease expires
        cli_ok("-r", local_url, "gc", "--grace", "0", "--force", env=env)
        assert not list(shared_store(local_url).iter_keys("gc/records/"))
        assert_fsck_clean(local_url, head=main)
        assert shared_store(local_url).lookup_size(commit_key(x)) is None
    _readback(local_url, main, describe(main_dir), tmp_path)
