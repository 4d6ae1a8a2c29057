"""The commitfs:// fsspec file system, through fsspec's own API, on a local and an S3 repository."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys

import fsspec
import pytest

import commitfs

from commitfs.fsspec import DEFAULT_BLOCK_SIZE, CommitfsFileSystem
from commitfs.model import chunker
from lineage_fixtures import cfs

pytestmark = pytest.mark.usefixtures("lineage_env")

BIG = 6 * 1024 * 1024


@pytest.fixture
def repo_url(store_url, tmp_path, sample_dir):
    """The sample dataset plus a 6 MiB random file, a symlink and a tag, on both backends."""
    rng = random.Random(5)
    (sample_dir / "blobs").mkdir()
    (sample_dir / "blobs" / "big.bin").write_bytes(rng.randbytes(BIG))
    os.symlink("../labels.csv", sample_dir / "blobs" / "labels-link.csv")
    os.symlink("/etc/passwd", sample_dir / "blobs" / "outside")
    with commitfs.Repository.init(store_url) as repo:
        v1 = repo.commit(sample_dir, message="v1")
        repo._repo.refs.create_tag("v1", bytes.fromhex(v1))
        (sample_dir / "labels.csv").write_text("path,label\n")
        repo.commit(sample_dir, branch="team/exp", message="v2")
    return store_url


@pytest.fixture
def fs(repo_url):
    # No chunk cache: every read below reaches the store, where it is counted.
    fs = fsspec.filesystem("commitfs", repo=repo_url, cache_dir=False, skip_instance_cache=True)
    yield fs
    fs.repo.close()


def test_the_protocol_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="fsspec.specs")}
    assert eps["commitfs"] == "commitfs.fsspec:CommitfsFileSystem"
    assert fsspec.get_filesystem_class("commitfs") is CommitfsFileSystem


def test_open_reads_a_file_of_a_revision(repo_url, sample_dir, tmp_path):
    original = subprocess.run([sys.executable, "-m", "commitfs", "-r", repo_url, "cat", "v1:labels.csv"],
                              capture_output=True, text=True, check=True).stdout
    assert original.count("\n") == 13
    with fsspec.open("commitfs://main/labels.csv", "r", repo=repo_url) as f:
        assert f.readline() == "path,label\n"
        assert f.readline() + f.read() == original[len("path,label\n"):]
    with fsspec.open("commitfs://team/exp/labels.csv", "rb", repo=repo_url) as f:  # a branch with '/'
        assert f.read() == b"path,label\n"
    cid = json.loads(cfs("-r", repo_url, "show", "v1", "--json").stdout)["id"]
    for rev in ("v1", "main", cid, cid[:8]):
        with fsspec.open(f"commitfs://{rev}/labels.csv", "rb", repo=repo_url) as f:
            assert f.read().decode() == original
    # COMMITFS_REPO is the default repository.
    os.environ["COMMITFS_REPO"] = repo_url
    try:
        with fsspec.open("commitfs://v1/README.txt", "r") as f:
            assert "sample image dataset" in f.read()
    finally:
        del os.environ["COMMITFS_REPO"]


def test_ls_info_find_cat(fs, repo_url):
    tree = {e["path"]: e for e in json.loads(cfs("-r", repo_url, "ls", "-R", "v1", "--json").stdout)}
    roots = fs.ls("")
    assert {e["name"] for e in roots} == {"main", "team/exp", "v1"}
    assert all(e["type"] == "directory" for e in roots)
    assert sorted(fs.ls("v1", detail=False)) == ["v1/README.txt", "v1/blobs", "v1/labels.csv", "v1/train", "v1/val"]
    info = fs.info("v1/labels.csv")
    assert info["type"] == "file" and info["size"] == tree["labels.csv"]["size"]
    assert info["id"] == tree["labels.csv"]["id"] == fs.ukey("v1/labels.csv")
    assert fs.info("commitfs://v1/train")["type"] == "directory"
    assert fs.info("v1")["type"] == "directory"
    assert fs.isdir("v1/val") and fs.isfile("v1/val/cat/img_00000.png") and not fs.exists("v1/nope")
    assert fs.ls("v1/labels.csv")[0]["name"] == "v1/labels.csv"
    pngs = fs.glob("v1/train/*/*.png")
    assert len(pngs) == sum(1 for p in tree if p.startswith("train/") and p.endswith(".png"))
    assert set(fs.find("v1/val")) == {f"v1/{p}" for p, e in tree.items() if p.startswith("val/") and e["kind"] == "file"}
    png = fs.cat_file("v1/val/cat/img_00000.png")
    assert png.startswith(b"\x89PNG") and len(png) == tree["val/cat/img_00000.png"]["size"]
    # Ranges: start/end, negative from the end, past the end.
    assert fs.cat_file("v1/labels.csv", 0, 10) == b"path,label"
    whole = fs.cat_file("v1/labels.csv")
    assert fs.cat_file("v1/labels.csv", -10) == whole[-10:]
    assert fs.cat_file("v1/labels.csv", 5, -5) == whole[5:-5]
    assert fs.cat_file("v1/labels.csv", len(whole) + 5) == b""
    assert fs.cat("commitfs://v1/README.txt").startswith(b"A sample")
    # Symlinks inside the commit are followed; ones leaving it are not.
    assert fs.info("v1/blobs/labels-link.csv")["type"] == "other"
    assert fs.cat_file("v1/blobs/labels-link.csv") == whole
    with pytest.raises(FileNotFoundError, match="outside the commit"):
        fs.cat_file("v1/blobs/outside")


def test_errors_are_the_usual_os_errors(fs):
    with pytest.raises(FileNotFoundError):
        fs.info("v1/nope.csv")
    with pytest.raises(FileNotFoundError):
        fs.open("nosuchrev/labels.csv")
    with pytest.raises(NotADirectoryError):
        fs.ls("v1/labels.csv/x")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("v1/train")
    with pytest.raises(PermissionError):
        fs.open("v1/new.txt", "wb")
    with pytest.raises(PermissionError):
        fs.rm("v1/labels.csv")
    with pytest.raises(ValueError, match="repository"):
        CommitfsFileSystem(skip_instance_cache=True)


def _count_loads(fs) -> list[int]:
    """Wrap the store so that every ranged read's length is recorded."""
    sizes: list[int] = []
    store = fs.repo.store
    original = store.load_range

    def load_range(key, offset, length):
        sizes.append(length)
        return original(key, offset, length)

    store.load_range = load_range
    return sizes


def test_range_reads_are_lazy(fs):
    want = fs.cat_file("v1/blobs/big.bin")
    assert len(want) == BIG
    loads = _count_loads(fs)
    # cat_file with a range fetches about the chunks overlapping it (at most a chunk either side).
    got = fs.cat_file("v1/blobs/big.bin", 4_000_000, 4_000_100)
    assert got == want[4_000_000:4_000_100]
    assert 0 < sum(loads) <= 2 * chunker.MAX_SIZE
    # A seek and a small read through open() fetch at most one read-ahead block.
    loads.clear()
    with fs.open("v1/blobs/big.bin", "rb") as f:
        f.seek(5_000_000)
        assert f.read(10) == want[5_000_000:5_000_010]
        first = sum(loads)
        assert f.read(10) == want[5_000_010:5_000_020]  # served from the block already read
        assert sum(loads) == first
    assert 0 < first <= DEFAULT_BLOCK_SIZE + 2 * chunker.MAX_SIZE
    # No read-ahead at all: only the chunks holding the bytes.
    loads.clear()
    with fs.open("v1/blobs/big.bin", "rb", cache_type="none") as f:
        f.seek(BIG - 3)
        assert f.read() == want[-3:]
    assert 0 < sum(loads) <= chunker.MAX_SIZE


def test_branches_are_pinned_until_invalidated(fs, repo_url, tmp_path):
    assert fs.cat_file("main/labels.csv") != b"path,label\n"
    d = tmp_path / "v3"
    d.mkdir()
    (d / "labels.csv").write_text("moved\n")
    cfs("-r", repo_url, "commit", d, "-m", "v3")
    assert fs.cat_file("main/labels.csv") != b"moved\n"  # one process reads one commit
    fs.invalidate_cache()
    assert fs.cat_file("main/labels.csv") == b"moved\n"


def test_pickles_and_reads_in_a_forked_worker(fs):
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.cat_file("v1/README.txt") == fs.cat_file("v1/README.txt")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker would be forked like this
        try:
            os.close(r)
            os.write(w, fs.cat_file("v1/labels.csv", 0, 10))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 100)
    os.close(r)
    os.waitpid(pid, 0)
    assert data == b"path,label"


def test_s3_reads_go_through_the_verified_chunk_cache(s3_url, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "big.bin").write_bytes(random.Random(9).randbytes(2 * 1024 * 1024))
    cfs("-r", s3_url, "init")
    cfs("-r", s3_url, "commit", d, "-m", "v1")
    fs = fsspec.filesystem("commitfs", repo=s3_url, cache_dir=str(tmp_path / "cache"), skip_instance_cache=True)
    loads = _count_loads(fs)
    first = fs.cat_file("main/big.bin", 1_000_000, 1_000_100)
    assert sum(loads) > 0 and any((tmp_path / "cache" / "chunks").rglob("*"))
    loads.clear()
    assert fs.cat_file("main/big.bin", 1_000_000, 1_000_100) == first
    assert sum(loads) == 0  # served from the cache
    fs.repo.close()
