"""issue 17: mount REV:PATH, --no-disk-cache, commitfs mounts [--json] (real mounts)."""

from __future__ import annotations

import json
import os

import pytest

from core_fixtures import assert_one_line_error, describe, write_file
from mount_fixtures import run_commitfs
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    write_file(d / "labels.csv", b"id,label\n")
    write_file(d / "train" / "cat" / "img0.bin", os.urandom(300_000))
    write_file(d / "train" / "dog.bin", b"woof")
    return d


def _commit(url, d) -> bytes:
    with Repository.init(url) as repo:
        return commit_directory(repo, d, message="one").commit_id


@pytest.mark.timeout(120)
def test_mount_a_subdirectory_as_the_root_and_list_mounts(mounts, local_url, data, tmp_path):
    cid = _commit(local_url, data)
    mnt = mounts.mountpoint("sub")
    mounts.mount(local_url, mnt, rev="main:train")
    assert describe(mnt) == describe(data / "train")
    assert os.getxattr(mnt / "dog.bin", "user.commitfs.commit").decode() == cid.hex()
    top = mounts.mountpoint("top")
    mounts.mount(local_url, top)

    listed = {m["mountpoint"]: m for m in json.loads(run_commitfs("mounts", "--json").stdout)}
    sub = listed[str(mnt)]
    assert sub["repo"] == local_url and sub["rev"] == "main" and sub["path"] == "train"
    assert sub["commit"] == cid.hex() and sub["writable"] is False and sub["stale"] is False
    assert isinstance(sub["pid"], int) and os.path.exists(sub["log"])
    assert sub["cache"] is None  # a local repository is read in place
    assert listed[str(top)]["rev"] is None and listed[str(top)]["commit"] is None
    text = run_commitfs("mounts").stdout
    assert f"{mnt}: {local_url} main:train at {cid.hex()[:12]} (read-only), pid {sub['pid']}" in text

    # Bad paths: one line, before any daemon starts.
    other = mounts.mountpoint("other")
    for spec, what in [("main:nope", "no such path"), ("main:labels.csv", "is a file"),
                       ("main:train/dog.bin", "is a file")]:
        proc = run_commitfs("-r", local_url, "mount", spec, str(other))
        assert what in assert_one_line_error(proc.returncode, proc.stderr, 1)
    proc = run_commitfs("-r", local_url, "mount", "main:train", str(other), "--writable")
    assert_one_line_error(proc.returncode, proc.stderr, 2)
    assert run_commitfs("umount", str(mnt)).returncode == 0
    assert str(mnt) not in {m["mountpoint"] for m in json.loads(run_commitfs("mounts", "--json").stdout)}


@pytest.mark.timeout(120)
def test_no_disk_cache_writes_no_chunk(mounts, s3_url, data, tmp_path):
    _commit(s3_url, data)
    mnt = mounts.mountpoint()
    cache = tmp_path / "cache"
    mounts.mount(s3_url, mnt, "--no-disk-cache", "--cache-dir", str(cache), "--log-file",
                 str(tmp_path / "log"), rev="main")
    assert describe(mnt) == describe(data)
    (m,) = [m for m in json.loads(run_commitfs("mounts", "--json").stdout) if m["mountpoint"] == str(mnt)]
    assert m["cache"] is None and m["repo"] == s3_url
    assert run_commitfs("umount", str(mnt)).returncode == 0
    assert not (cache / "chunks").exists() or not any((cache / "chunks").rglob("*"))
    # Without the flag the same reads fill the cache (so the check above means something).
    mounts.mount(s3_url, mnt, "--cache-dir", str(cache), rev="main")
    assert describe(mnt) == describe(data)
    (m,) = [m for m in json.loads(run_commitfs("mounts", "--json").stdout) if m["mountpoint"] == str(mnt)]
    assert m["cache"] == str(cache)
    assert run_commitfs("umount", str(mnt)).returncode == 0
    assert any(p.is_file() for p in (cache / "chunks").rglob("*"))


@pytest.mark.timeout(120)
def test_a_mount_without_the_fast_path_says_so_loudly(mounts, local_url, data, tmp_path):
    """Without the fast path (forced here with COMMITFS_NO_FASTPATH=1, as when commitfs was
    installed without its C module) a read-only mount still mounts and serves the right
    bytes, but `commitfs mount` warns, `commitfs mounts` marks the mount and warns for it,
    its JSON says fast_open false and why, and the log has a WARNING."""
    _commit(local_url, data)
    env = dict(os.environ, COMMITFS_NO_FASTPATH="1")
    slow = mounts.mountpoint("slow")
    proc = mounts.mount(local_url, slow, rev="main", env=env)
    assert "commitfs: warning: this mount runs without commitfs's fast path (COMMITFS_NO_FASTPATH=1 is set)" \
        in proc.stderr
    assert describe(slow) == describe(data)
    fast = mounts.mountpoint("fast")
    proc = mounts.mount(local_url, fast, rev="main")
    assert "fast path" not in proc.stderr

    listed = {m["mountpoint"]: m for m in json.loads(run_commitfs("mounts", "--json").stdout)}
    assert listed[str(slow)]["fast_open"] is False and listed[str(fast)]["fast_open"] is True
    assert listed[str(slow)]["fast_path_missing"] == "COMMITFS_NO_FASTPATH=1 is set"
    assert listed[str(fast)]["fast_path_missing"] is None
    out = run_commitfs("mounts")
    # This test's two mounts only (other mounts of the machine are listed too).
    warned = [line for line in out.stderr.splitlines() if "fast path" in line and f"{tmp_path}/" in line]
    assert len(warned) == 1 and warned[0].startswith(f"commitfs: warning: {slow}: ")
    (slow_line,) = [line for line in out.stdout.splitlines() if line.startswith(f"{slow}: ")]
    (fast_line,) = [line for line in out.stdout.splitlines() if line.startswith(f"{fast}: ")]
    assert "(read-only, without the fast path)" in slow_line and "(read-only)" in fast_line
    log = open(listed[str(slow)]["log"]).read()
    assert "WARNING" in log and "without commitfs's fast path" in log
