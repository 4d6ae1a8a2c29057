"""Sync against an S3 server that goes away, stalls, or refuses us.

"The server killed in the middle of a push, a pull or a clone: re-run, it
completes."  The server is a dedicated moto process behind a TcpProxy
(tests/sync_fixtures.py) that the test cuts once a given number of bytes went
through: every connection is reset and new ones are refused, exactly what a
client sees when the server dies.  Killing moto itself would lose its
in-memory bucket, so the proxy is the honest way to make the server vanish
and come back on the same port with its data.

The push/pull/clone runs through the command line in-process (``main``), so
the small-pack settings apply and stderr is captured: the failure must be one
line, exit 1, and the re-run must not send again what had arrived.
"""

from __future__ import annotations

import random
import socket

import pytest
from core_fixtures import assert_fsck_clean, assert_one_line_error, cli_fails, describe, pack_bytes, write_file

from commitfs.cli import main
from commitfs.errors import StorageError, StorageTimeoutError
from commitfs.ops import sync
from commitfs.ops.checkout import checkout
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from s3server import MotoServer

MiB = 1024 * 1024


def make_data(root, n: int = 40, size: int = 100_000, seed: int = 1) -> dict:
    rng = random.Random(seed)
    for i in range(n):
        write_file(root / f"d{i % 5}" / f"f{i:02d}.bin", rng.randbytes(size))
    return describe(root)


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def direct(proxied) -> Repository:
    """The repository straight through moto, around the proxy."""
    return Repository.open(proxied.url, endpoint_url=proxied.server.endpoint_url)


def checked_out(url: str, dest) -> dict:
    with Repository.open(url) as r:
        checkout(r, r.resolve("main"), dest)
    return describe(dest)


def test_push_interrupted_by_server_death_resumes(tmp_path, proxied_s3, cache_home, small_packs, pack_mode, capsys):
    want = make_data(tmp_path / "data")
    local = str(tmp_path / "local")
    with Repository.init(local) as r:
        commit_directory(r, tmp_path / "data", message="v1")
    Repository.init(proxied_s3.url).close()
    total = pack_bytes(local)
    proxy = proxied_s3.proxy

    proxy.reset_counts()
    proxy.cut_after_up = total // 2
    code, err = run_main(capsys, "-r", local, "push", proxied_s3.url)
    line = assert_one_line_error(code, err)
    assert "cannot reach S3 endpoint" in line or "broke" in line, line
    assert proxy.cuts == 1
    with direct(proxied_s3) as r:
        assert r.refs.lookup_branch("main") is None  # refs move last

    proxy.restore()
    proxy.reset_counts()
    code, err = run_main(capsys, "-r", local, "push", proxied_s3.url)
    assert code == 0, err
    # At most a batch (512 KiB) and the packs in flight were lost at the cut.
    resent = proxy.up_bytes
    print(f"\npush of {total} pack bytes cut after {total // 2}: the re-run sent {resent} bytes")
    assert resent < total - total // 4
    with direct(proxied_s3) as r, Repository.open(local) as lr:
        assert r.refs.lookup_branch("main") == lr.refs.lookup_branch("main")
    assert_fsck_clean(proxied_s3.url)
    assert checked_out(proxied_s3.url, tmp_path / "out") == want


def test_pull_interrupted_by_server_death_resumes(tmp_path, proxied_s3, cache_home, small_packs, pack_mode, capsys):
    want = make_data(tmp_path / "data", seed=2)
    with Repository.init(proxied_s3.url) as r:
        commit_directory(r, tmp_path / "data", message="v1")
    total = pack_bytes(proxied_s3.url)
    local = str(tmp_path / "local")
    Repository.init(local).close()
    proxy = proxied_s3.proxy

    proxy.reset_counts()
    proxy.cut_after_down = total // 2
    code, err = run_main(capsys, "-r", local, "pull", proxied_s3.url, "--jobs", "2")
    line = assert_one_line_error(code, err)
    assert "S3 endpoint" in line, line
    with Repository.open(local) as r:
        assert r.refs.lookup_branch("main") is None

    proxy.restore()
    proxy.reset_counts()
    code, err = run_main(capsys, "-r", local, "pull", proxied_s3.url)
    assert code == 0, err
    print(f"\npull of {total} pack bytes cut after {total // 2}: the re-run read {proxy.down_bytes} bytes")
    assert proxy.down_bytes < total - total // 4
    assert_fsck_clean(local)
    assert checked_out(local, tmp_path / "out") == want


def test_clone_interrupted_by_server_death_resumes(tmp_path, proxied_s3, cache_home, small_packs, pack_mode, capsys):
    want = make_data(tmp_path / "data", seed=3)
    with Repository.init(proxied_s3.url) as r:
        commit_directory(r, tmp_path / "data", message="v1")
        r.refs.create_tag("v1", r.refs.lookup_branch("main"))
    total = pack_bytes(proxied_s3.url)
    proxy = proxied_s3.proxy
    dest = str(tmp_path / "clone")

    proxy.cut_after_down = total // 2
    code, err = run_main(capsys, "clone", proxied_s3.url, dest)
    assert_one_line_error(code, err)
    proxy.restore()
    proxy.reset_counts()
    code, err = run_main(capsys, "clone", proxied_s3.url, dest)  # the same command, re-run
    assert code == 0, err
    assert proxy.down_bytes < total - total // 4
    with Repository.open(dest) as r:
        assert set(r.refs.tags()) == {"v1"}
    assert checked_out(dest, tmp_path / "out") == want
    assert_fsck_clean(dest)


def test_stalled_server_times_out_then_push_completes(tmp_path, proxied_s3, cache_home):
    want = make_data(tmp_path / "data", n=5, seed=4)
    local = str(tmp_path / "local")
    with Repository.init(local) as r:
        commit_directory(r, tmp_path / "data", message="v1")
    Repository.init(proxied_s3.url).close()
    options = {"read_timeout": 0.5, "connect_timeout": 0.5, "attempts": 2, "deadline_s": 2.0}
    with Repository.open(local) as lr, Repository.open(proxied_s3.url, **options) as rr:
        proxied_s3.proxy.stalled = True
        try:
            with pytest.raises(StorageTimeoutError, match="did not answer within 0.5s"):
                sync.push(lr, rr)
        finally:
            proxied_s3.proxy.stalled = False
        sync.push(lr, rr)
    assert checked_out(proxied_s3.url, tmp_path / "out") == want


# --- configuration errors through the CLI: one line, exit 1 -----------------------
def test_missing_bucket_is_one_line(tmp_path, s3_url, cache_home):
    local = str(tmp_path / "local")
    Repository.init(local).close()
    missing = "s3://no-such-bucket-for-commitfs/repo"
    for args in (["-r", local, "push", missing], ["-r", local, "pull", missing], ["clone", missing, str(tmp_path / "c")]):
        line = cli_fails(*args)
        assert line == "commitfs: bucket no-such-bucket-for-commitfs does not exist", args
    assert not (tmp_path / "c").exists()


def test_unreachable_endpoint_is_one_line(tmp_path, s3_server, cache_home):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = str(tmp_path / "local")
    Repository.init(local).close()
    line = cli_fails("--endpoint-url", f"http://127.0.0.1:{port}", "clone", "s3://bucket/repo", str(tmp_path / "c"),
                     timeout=90)
    assert f"cannot reach S3 endpoint http://127.0.0.1:{port}" in line
    cli_ok_remote = cli_fails("-r", local, "--endpoint-url", f"http://127.0.0.1:{port}", "push", "s3://bucket/repo",
                              timeout=90)
    assert "cannot reach S3 endpoint" in cli_ok_remote


def test_wrong_credentials_are_one_line(tmp_path, s3_server, cache_home, monkeypatch):
    # A moto server that checks credentials: none of ours is known to it.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    server = MotoServer()
    server.start()
    try:
        monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
        local = str(tmp_path / "local")
        Repository.init(local).close()
        line = cli_fails("-r", local, "--endpoint-url", server.endpoint_url, "push", "s3://bucket/repo")
        assert line.startswith("commitfs: access denied to s3://bucket/repo") and "check credentials" in line
        line = cli_fails("--endpoint-url", server.endpoint_url, "clone", "s3://bucket/repo", str(tmp_path / "c"))
        assert "access denied" in line
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_multipart_upload_whose_completion_answer_is_lost_is_saved(s3_server, s3_url, monkeypatch):
    """The server completes the upload, its answer is lost, and the retry is answered
    NoSuchUpload (as S3 and MinIO may answer a completed upload; moto would repeat its
    answer, so the proxy says it): the object there is this upload's (its ETag is the
    one the parts make), so the save succeeds; an object that is not (another upload's)
    stays a one-line error."""
    import io

    from commitfs.storage import s3 as s3mod
    from commitfs.storage.s3 import S3Store
    from cutproxy import LosingProxy, s3_error_answer

    monkeypatch.setattr(s3mod, "_PART_SIZE", 5 * MiB)  # S3's smallest part: two parts
    bucket = s3_url.split("/")[2]
    data = random.Random(3).randbytes(5 * MiB + 1000)
    gone = s3_error_answer("404 Not Found", "NoSuchUpload", "The specified upload does not exist.")
    # CompleteMultipartUpload is the one POST with an uploadId (creating one is POST ?uploads).
    with LosingProxy(s3_server.port, method=b"POST", marker=b"uploadId=", then=gone) as proxy:
        store = S3Store(bucket, "repo", endpoint_url=proxy.endpoint_url, attempts=4, deadline_s=30)
        store.save_object_from("packs/ab/whole", io.BytesIO(data), len(data))
        assert (proxy.lost, proxy.replaced) == (1, 1)
        assert store.load_object("packs/ab/whole") == data
        # Lost again, and meanwhile another writer's object took the key: not this upload's.
        proxy.remaining = 1
        real_completed_as = store._completed_as

        def replaced_first(s3_key, parts, size):
            store._client.put_object(Bucket=bucket, Key=s3_key, Body=random.Random(4).randbytes(size))
            return real_completed_as(s3_key, parts, size)
        monkeypatch.setattr(store, "_completed_as", replaced_first)
        with pytest.raises(StorageError, match="upload is gone"):
            store.save_object_from("packs/ab/second", io.BytesIO(data), len(data))
        assert (proxy.lost, proxy.replaced) == (2, 2)
        store.close()
