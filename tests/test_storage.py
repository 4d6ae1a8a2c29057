"""The storage contract, run against every backend; then the S3 store's error
translation, the retry policy and the FaultyStore test helper."""

import multiprocessing
import os
import random
import socket
import threading
import time

import pytest
from botocore import exceptions as bx
from botocore.stub import Stubber

from commitfs.errors import (
    ObjectNotFoundError,
    RefConflictError,
    RepositoryNotFoundError,
    StorageError,
    StorageTimeoutError,
)
from commitfs.storage.url import open_store
from commitfs.storage.faulty import FaultyStore
from commitfs.storage.local import LocalStore, _FdTable
from commitfs.storage.retry import TransientError, retry_call


@pytest.fixture
def store(store_url):
    store = open_store(store_url)
    yield store
    store.close()


# --- objects ---------------------------------------------------------------
def test_round_trip(store):
    data = bytes(range(256)) * 100
    store.save_object("packs/ab/abcdef", data)
    store.save_object("empty", b"")
    assert store.load_object("packs/ab/abcdef") == data
    assert store.load_object("empty") == b""


def test_streamed_save_from_a_file(store, tmp_path):
    """save_object_from stores the first ``size`` bytes of a file (an index merge's
    output): on S3 a multipart upload past one part (_PART_SIZE), locally a copy
    a block at a time; whole or not at all, as save_object."""
    from commitfs.storage import s3

    rng = random.Random(4)
    data = rng.randbytes(s3._PART_SIZE + 3 * 1024 * 1024 + 17)  # two parts on S3
    with open(tmp_path / "out", "w+b") as f:
        f.write(data + b"not stored")
        store.save_object_from("index/big", f, len(data))
        store.save_object_from("index/small", f, 1000)
        with pytest.raises((ValueError, StorageError)):
            store.save_object_from("index/short", f, len(data) + 100)  # the file ends first
    assert store.load_object("index/big") == data
    assert store.load_object("index/small") == data[:1000]
    assert store.lookup_size("index/short") is None
    assert sorted(store.iter_keys("index/")) == ["index/big", "index/small"]


def test_rewriting_identical_data_is_harmless(store):
    store.save_object("k", b"same")
    store.save_object("k", b"same")
    assert store.load_object("k") == b"same"


def test_load_range(store):
    store.save_object("k", b"0123456789")
    assert store.load_range("k", 3, 4) == b"3456"
    assert store.load_range("k", 0, 10) == b"0123456789"
    assert store.load_range("k", 7, 100) == b"789"  # short only at the end
    assert store.load_range("k", 10, 5) == b""
    assert store.load_range("k", 50, 5) == b""
    assert store.load_range("k", 2, 0) == b""
    store.save_object("empty", b"")
    assert store.load_range("empty", 0, 5) == b""


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_descriptor_let_go_while_a_read_holds_it_is_closed_when_the_read_ends(tmp_path):
    fds = {}
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode())
        fds[name] = os.open(tmp_path / name, os.O_RDONLY)
    table = _FdTable(2)
    a = table.add("a", fds["a"])  # held by a read
    table.release(table.add("b", fds["b"]))
    assert table.acquire("a") is a and a.users == 2
    table.release(a)
    table.release(table.add("c", fds["c"]))  # over the cap: "b", the least recent, goes now
    assert not _is_open(fds["b"]) and len(table) == 2
    table.release(table.add("b", os.open(tmp_path / "b", os.O_RDONLY)))  # "a" goes, but is in use
    assert table.acquire("a") is None and a.retired and _is_open(a.fd)
    assert os.pread(a.fd, 1, 0) == b"a"
    table.release(a)  # the read ends: now it is closed
    assert not _is_open(a.fd)
    # A second open of a key another thread added first is closed, the first one used.
    spare = os.open(tmp_path / "c", os.O_RDONLY)
    c = table.add("c", spare)
    assert c.fd == fds["c"] and not _is_open(spare)
    table.release(c)
    table.discard()
    assert not _is_open(fds["c"]) and len(table) == 0


def test_reads_from_many_threads_through_a_small_descriptor_table_get_the_right_bytes(tmp_path):
    store = LocalStore(tmp_path)
    store._fds.size = 2  # far fewer descriptors than objects: constant eviction
    objects = {f"packs/{i:02d}/obj": bytes([i]) * 65536 + os.urandom(4096) for i in range(12)}
    for key, data in objects.items():
        store.save_object(key, data)
    before = len(os.listdir("/proc/self/fd"))
    errors = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        keys = sorted(objects)
        for _ in range(1500):
            key = rng.choice(keys)
            off = rng.randrange(0, 60000)
            try:
                got = store.load_range(key, off, 1000)
                if got != objects[key][off:off + 1000]:
                    errors.append(f"wrong bytes from {key}")
            except Exception as exc:  # a closed or reused descriptor
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store._fds) <= 2
    store.close()
    assert len(os.listdir("/proc/self/fd")) <= before  # nothing leaked


def test_lookup_size(store):
    store.save_object("k", b"12345")
    store.save_object("empty", b"")
    assert store.lookup_size("k") == 5
    assert store.lookup_size("empty") == 0
    assert store.lookup_size("absent") is None


def test_missing_object(store):
    with pytest.raises(ObjectNotFoundError):
        store.load_object("packs/none")
    with pytest.raises(ObjectNotFoundError):
        store.load_range("packs/none", 0, 10)


def test_iter_keys(store):
    keys = {"packs/aa/1", "packs/ab/2", "packs/ab/3", "index/x", "top"}
    for key in keys:
        store.save_object(key, b"x")
    store.save_ref_if_equals("branches/main", b"c1", None)
    assert set(store.iter_keys()) == keys  # references are not objects
    assert set(store.iter_keys("")) == keys
    assert set(store.iter_keys("packs/")) == {"packs/aa/1", "packs/ab/2", "packs/ab/3"}
    assert set(store.iter_keys("packs/a")) == {"packs/aa/1", "packs/ab/2", "packs/ab/3"}
    assert set(store.iter_keys("packs/ab/")) == {"packs/ab/2", "packs/ab/3"}
    assert set(store.iter_keys("r")) == set()
    assert set(store.iter_keys("nothing/")) == set()


def test_remove_object_is_idempotent(store):
    store.save_object("k", b"x")
    store.remove_object("k")
    store.remove_object("k")
    store.remove_object("never-existed")
    assert store.lookup_size("k") is None
    with pytest.raises(ObjectNotFoundError):
        store.load_object("k")


# --- references --------------------------------------------------------------
def test_ref_create_only_once(store):
    assert store.load_ref("branches/main") is None
    store.save_ref_if_equals("branches/main", b"c1", None)
    with pytest.raises(RefConflictError):
        store.save_ref_if_equals("branches/main", b"c2", None)
    assert store.load_ref("branches/main") == b"c1"


def test_ref_update(store):
    store.save_ref_if_equals("branches/main", b"c1", None)
    store.save_ref_if_equals("branches/main", b"c2", b"c1")
    assert store.load_ref("branches/main") == b"c2"
    with pytest.raises(RefConflictError):
        store.save_ref_if_equals("branches/main", b"c3", b"c1")
    assert store.load_ref("branches/main") == b"c2"
    with pytest.raises(RefConflictError):  # expected a value that does not exist
        store.save_ref_if_equals("branches/other", b"c3", b"c1")
    assert store.load_ref("branches/other") is None


def test_ref_delete(store):
    store.save_ref_if_equals("tags/v1", b"c1", None)
    with pytest.raises(RefConflictError):
        store.save_ref_if_equals("tags/v1", None, b"wrong")
    with pytest.raises(RefConflictError):  # "delete if absent" while present
        store.save_ref_if_equals("tags/v1", None, None)
    store.save_ref_if_equals("tags/v1", None, b"c1")
    assert store.load_ref("tags/v1") is None
    store.save_ref_if_equals("tags/v1", None, None)  # absent, as expected
    with pytest.raises(RefConflictError):
        store.save_ref_if_equals("tags/v1", None, b"c1")


def test_iter_refs(store):
    store.save_ref_if_equals("branches/main", b"c1", None)
    store.save_ref_if_equals("branches/dev", b"c2", None)
    store.save_ref_if_equals("tags/v1", b"c3", None)
    store.save_object("packs/x", b"x")
    assert dict(store.iter_refs()) == {"branches/main": b"c1", "branches/dev": b"c2", "tags/v1": b"c3"}
    assert dict(store.iter_refs("branches/")) == {"branches/main": b"c1", "branches/dev": b"c2"}
    assert dict(store.iter_refs("nothing/")) == {}


# --- concurrent compare-and-swap ------------------------------------------------
def _increment(store, name, n):
    """Add 1 to the counter ``name`` n times, retrying lost swaps."""
    for _ in range(n):
        while True:
            current = store.load_ref(name)
            try:
                store.save_ref_if_equals(name, str(int(current) + 1).encode(), current)
                break
            except RefConflictError:
                continue
    return n


def _increment_in_process(url, name, n):
    store = open_store(url)
    try:
        return _increment(store, name, n)
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_concurrent_increments_threads(store):
    store.save_ref_if_equals("counter", b"0", None)
    workers, n = 6, 10
    results = []
    threads = [threading.Thread(target=lambda: results.append(_increment(store, "counter", n)))
               for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == workers * n
    assert int(store.load_ref("counter")) == workers * n


@pytest.mark.timeout(60)
def test_concurrent_increments_processes(store, store_url):
    store.save_ref_if_equals("counter", b"0", None)
    workers, n = 3, 15
    # spawn: a fresh interpreter, nothing shared with this one but the URL
    # and the environment (credentials, endpoint).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        done = pool.starmap(_increment_in_process, [(store_url, "counter", n)] * workers)
    assert sum(done) == workers * n
    assert int(store.load_ref("counter")) == workers * n


# --- S3 error translation ---------------------------------------------------------
@pytest.fixture
def fake_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _unused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_bucket(s3_server):
    store = open_store("s3://no-such-bucket-commitfs/repo", endpoint_url=s3_server.endpoint_url)
    for op in (lambda: store.load_object("k"), lambda: store.lookup_size("k"), lambda: list(store.iter_keys()),
               lambda: store.save_object("k", b"x"), lambda: store.load_ref("branches/main"),
               lambda: store.save_ref_if_equals("branches/main", b"c1", None)):
        with pytest.raises(RepositoryNotFoundError, match="bucket no-such-bucket-commitfs does not exist"):
            op()


def test_unreachable_endpoint(fake_credentials):
    store = open_store("s3://bucket/repo", endpoint_url=f"http://127.0.0.1:{_unused_port()}",
                       connect_timeout=0.5, attempts=4, deadline_s=2)
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError, match="cannot reach S3 endpoint http://127.0.0.1:"):
        store.load_object("k")
    assert time.monotonic() - start < 5


def test_silent_endpoint_times_out(fake_credentials):
    # A socket that listens but never answers: connects succeed, reads time out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        store = open_store("s3://bucket/repo", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                           read_timeout=0.3, attempts=2, deadline_s=2)
        start = time.monotonic()
        with pytest.raises(StorageTimeoutError, match="did not answer within 0.3s"):
            store.load_range("k", 0, 10)
        assert time.monotonic() - start < 5


def _stubbed(**opts):
    store = open_store("s3://bucket/repo", endpoint_url="http://127.0.0.1:9", **opts)
    return store, Stubber(store._client)


def test_access_denied(fake_credentials):
    store, stub = _stubbed()
    stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
    with stub, pytest.raises(StorageError, match=r"access denied to s3://bucket/repo .*check credentials"):
        store.load_object("k")
    stub.assert_no_pending_responses()  # not retried


def test_throttling_is_retried(fake_credentials):
    store, stub = _stubbed()
    stub.add_client_error("head_object", service_error_code="SlowDown", http_status_code=503)
    stub.add_client_error("head_object", service_error_code="InternalError", http_status_code=500)
    stub.add_response("head_object", {"ContentLength": 7})
    with stub:
        assert store.lookup_size("k") == 7


def test_server_errors_exhaust_retries(fake_credentials):
    store, stub = _stubbed(attempts=2)
    for _ in range(2):
        stub.add_client_error("put_object", service_error_code="InternalError", http_status_code=500)
    with stub, pytest.raises(StorageError, match=r"PUT s3://bucket/repo/k: S3 answered 500 .*2 attempts") as info:
        store.save_object("k", b"x")
    assert not isinstance(info.value, StorageTimeoutError)


def test_no_credentials(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store("s3://bucket/repo", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StorageError, match="no usable AWS credentials for s3://bucket/repo"):
        store.load_object("k")


def test_cas_whose_answer_was_lost_succeeds(s3_url):
    """A conditional PUT applied by the server whose answer never arrived is
    retried; the retry fails its precondition, yet the swap did happen."""
    store = open_store(s3_url)
    store.save_ref_if_equals("branches/main", b"c1", None)
    put = store._client.put_object
    lost = []

    def put_then_lose_answer(**kwargs):
        result = put(**kwargs)
        if not lost:
            lost.append(True)
            raise bx.ReadTimeoutError(endpoint_url="http://lost")
        return result

    store._client.put_object = put_then_lose_answer
    store.save_ref_if_equals("branches/main", b"c2", b"c1")
    assert lost and store.load_ref("branches/main") == b"c2"
    with pytest.raises(RefConflictError):
        store.save_ref_if_equals("branches/main", b"c3", b"c1")


# --- retry policy ------------------------------------------------------------------
def test_retry_recovers_from_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("hiccup", unreachable=True)
        return "ok"

    assert retry_call(flaky, what="GET x", attempts=5, deadline_s=10) == "ok"
    assert len(calls) == 3


def test_retry_passes_other_errors_through_at_once():
    calls = []

    def missing():
        calls.append(1)
        raise ObjectNotFoundError("gone")

    with pytest.raises(ObjectNotFoundError):
        retry_call(missing, what="GET x", attempts=5, deadline_s=10)
    assert len(calls) == 1


def test_retry_gives_up_at_deadline():
    def down():
        raise ConnectionRefusedError("refused")

    start = time.monotonic()
    with pytest.raises(StorageTimeoutError, match=r"^GET x: refused \(gave up after \d+ attempts"):
        retry_call(down, what="GET x", attempts=1000, deadline_s=0.5)
    assert time.monotonic() - start < 1.5


# --- FaultyStore ---------------------------------------------------------------------
@pytest.fixture
def faulty(tmp_path):
    store = FaultyStore(LocalStore(tmp_path))
    store.save_object("packs/p1", b"0123456789")
    store.save_object("other", b"x")
    store.calls.clear()
    yield store
    store.close()


def test_faulty_counts_and_fails(faulty):
    faulty.fail_on = {"load_range"}
    faulty.fail_keys = lambda key: key.startswith("packs/")
    faulty.fail_count = 2
    for _ in range(2):
        with pytest.raises(StorageError, match=r"injected failure: load_range\(packs/p1\)"):
            faulty.load_range("packs/p1", 0, 4)
    assert faulty.load_range("packs/p1", 0, 4) == b"0123"
    assert faulty.load_object("other") == b"x"
    assert faulty.calls["load_range"] == 3
    assert faulty.calls["load_object"] == 1
    assert faulty.local_path("packs/p1") is None


def test_faulty_stall_becomes_timeout(faulty):
    faulty.stall_s, faulty.stall_timeout_s = 60, 0.2
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError):
        faulty.load_range("packs/p1", 0, 4)
    assert time.monotonic() - start < 2


def test_faulty_release_ends_stall(faulty):
    faulty.stall_s = 60
    result = []
    reader = threading.Thread(target=lambda: result.append(faulty.load_object("packs/p1")))
    reader.start()
    time.sleep(0.1)
    faulty.release()
    reader.join(timeout=5)
    assert result == [b"0123456789"]


def test_an_interrupted_streamed_save_leaves_no_temporary_file(tmp_path):
    """A KeyboardInterrupt (or any exception) in the middle of a streamed save to a local
    store removes its temporary file: nothing under the store's root is left behind."""
    import io
    from commitfs.storage.url import open_store
    store = open_store(str(tmp_path / "store"))
    try:
        class Stop(io.BytesIO):
            def read(self, n=-1):
                if self.tell() >= 1 << 20:
                    raise KeyboardInterrupt
                return super().read(n)

        src = Stop(b"x" * (4 << 20))
        with pytest.raises(KeyboardInterrupt):
            store.save_object_from("index/abc", src, 4 << 20)
        assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file() and ".tmp-" in p.name] == []
    finally:
        store.close()
