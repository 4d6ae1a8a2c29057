"""The S3 store's lean ranged GET (storage/s3.py, _LeanGet): its signature is
botocore's, and its answers are checked and its errors mapped as botocore's are,
against the real moto server through a proxy that injects faults."""

from __future__ import annotations

import collections
import datetime
import random
import socket
import time
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from cutproxy import LocalProxy

from commitfs.errors import ObjectNotFoundError, RepositoryNotFoundError, StorageError
from commitfs.storage import s3 as s3mod
from commitfs.storage.s3 import S3Store

pytestmark = pytest.mark.timeout(60)


class FaultProxy(LocalProxy):
    """An HTTP proxy on 127.0.0.1 in front of the test S3 server.

    Each request is read whole, then answered by the next fault queued in
    ``faults`` (if the request's path contains ``match``), else passed on:

    * ``"500"``, ``"503"``, ``"403"``: that status with an S3 error body (codes
      InternalError, SlowDown, AccessDenied), nothing passed on;
    * ``"cut"``: the server's answer, its body cut in half (the connection
      closed before Content-Length bytes came);
    * ``"short"``: the server's answer with half its body and a Content-Length
      saying so (a consistent-looking short answer: only Content-Range tells).

    ``requests`` holds (request line, User-Agent) of every request seen."""

    _ERRORS = {"500": (500, "InternalError"), "503": (503, "SlowDown"), "403": (403, "AccessDenied")}

    def __init__(self, target_port: int, match: str = ""):
        super().__init__(target_port)
        self.match = match
        self.faults: collections.deque[str] = collections.deque()
        self.requests: list[tuple[str, str]] = []
        self.heads: list[str] = []  # every request's line and headers, as sent
        self.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(20)
        try:
            while True:  # each request on the connection, until the client closes it
                request = self._read_request(client)
                if request is None:
                    return
                answer = self._answer(request)
                client.sendall(answer)
                if b"connection: close" in answer.split(b"\r\n\r\n", 1)[0].lower():
                    return
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            client.close()

    @staticmethod
    def _read_request(client: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            got = client.recv(65536)
            if not got:
                return None
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += client.recv(65536)
        return head + b"\r\n\r\n" + body

    def _answer(self, request: bytes) -> bytes:
        head = request.split(b"\r\n\r\n", 1)[0].decode()
        line = head.split("\r\n", 1)[0]
        agent = next((h.split(":", 1)[1].strip() for h in head.split("\r\n")[1:]
                      if h.lower().startswith("user-agent:")), "")
        with self._lock:
            self.requests.append((line, agent))
            self.heads.append(head)
            fault = self.faults.popleft() if self.faults and self.match in line else None
        if fault in self._ERRORS:
            status, code = self._ERRORS[fault]
            body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    f"<Message>injected {code}</Message></Error>").encode()
            return (f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        answer = self._forward(request)
        if fault is None:
            return answer
        head, _, body = answer.partition(b"\r\n\r\n")
        half = body[:len(body) // 2]
        if fault == "cut":
            return head + b"\r\n\r\n" + half  # and the connection closes (Connection: close added)
        assert fault == "short", fault
        lines = [h for h in head.split(b"\r\n") if not h.lower().startswith(b"content-length:")]
        return b"\r\n".join(lines + [b"Content-Length: %d" % len(half)]) + b"\r\n\r\n" + half

    def _forward(self, request: bytes) -> bytes:
        # The test server speaks HTTP/1.0 and closes after each answer: read to EOF.
        with socket.create_connection(self.target, timeout=20) as server:
            server.sendall(request)
            chunks = []
            while True:
                got = server.recv(65536)
                if not got:
                    break
                chunks.append(got)
        answer = b"".join(chunks)
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = [h for h in head.split(b"\r\n") if not h.lower().startswith(b"connection:")]
        return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body


@pytest.fixture
def lean_store(s3_server, s3_url):
    """(store through a FaultProxy, proxy, the object's bytes) with ``obj`` stored
    and the lean path in use: the first ranged GET went through botocore."""
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    data = random.Random(7).randbytes(200_000)
    S3Store(bucket, "repo", endpoint_url=s3_server.endpoint_url).save_object("obj", data)
    proxy = FaultProxy(s3_server.port, match="/repo/obj")
    store = S3Store(bucket, "repo", endpoint_url=proxy.endpoint_url, attempts=3, deadline_s=10)
    try:
        assert store.load_range("obj", 0, 10) == data[:10]  # botocore's, which shows the lean path the way
        assert store._lean is not None and store._lean.base == f"{proxy.endpoint_url}/{bucket}/"
        yield store, proxy, data
    finally:
        store.close()
        proxy.stop()


def _lean_requests(proxy: FaultProxy) -> list[str]:
    return [line for line, agent in proxy.requests if "Boto3" not in agent and "Botocore" not in agent]


def test_the_lean_path_serves_ranges_exactly_as_botocore(lean_store):
    store, proxy, data = lean_store
    assert store.load_range("obj", 1000, 5000) == data[1000:6000]
    assert store.load_range("obj", 199_990, 100) == data[199_990:]  # short only at the end
    assert store.load_range("obj", 200_000, 5) == b""  # at the end: 416 InvalidRange
    assert store.load_range("obj", 300_000, 5) == b""
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        store.load_range("nothing-here", 0, 10)  # 404 NoSuchKey, not retried
    # Every one of them went by the lean path (one request each), not through botocore.
    assert len(_lean_requests(proxy)) == 5, proxy.requests


def test_a_missing_bucket_through_the_lean_path_is_repository_not_found(s3_server, s3_url):
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    store = S3Store(bucket, "repo", endpoint_url=s3_server.endpoint_url)
    store.save_object("obj", b"x" * 100)
    try:
        assert store.load_range("obj", 0, 10) == b"x" * 10
        assert store._lean.base is not None
        store.bucket = "no-such-bucket-commitfs"  # where the lean path sends now: a missing bucket
        store._lean.base = store._lean.base.replace(bucket, store.bucket)
        with pytest.raises(RepositoryNotFoundError, match="bucket no-such-bucket-commitfs does not exist"):
            store.load_range("obj", 0, 10)
    finally:
        store.close()


@pytest.mark.parametrize("fault", ["500", "503", "cut", "short"])
def test_a_transient_fault_is_retried_and_the_bytes_are_exact(lean_store, fault):
    """A 5xx (InternalError, SlowDown), a body cut short by a closed connection, or
    a short body whose headers agree with it but whose Content-Range does not: each
    is a TransientError (storage/retry.py), and the retry returns the exact bytes."""
    store, proxy, data = lean_store
    proxy.faults.append(fault)
    before = len(_lean_requests(proxy))
    assert store.load_range("obj", 5000, 100_000) == data[5000:105_000]
    assert len(_lean_requests(proxy)) - before == 2  # the fault, then the retry
    assert not proxy.faults


@pytest.mark.parametrize("fault", ["500", "cut", "short"])
def test_a_lasting_fault_is_an_error_never_short_bytes(lean_store, fault):
    store, proxy, data = lean_store
    proxy.faults.extend([fault] * 3)  # every attempt (attempts=3)
    with pytest.raises(StorageError, match=r"GET s3://.*/repo/obj: .*gave up after 3 attempts"):
        store.load_range("obj", 5000, 100_000)
    assert not proxy.faults
    assert store.load_range("obj", 5000, 100_000) == data[5000:105_000]  # and then it works


def test_access_denied_through_the_lean_path_is_not_retried(lean_store):
    store, proxy, _ = lean_store
    proxy.faults.extend(["403", "403"])
    with pytest.raises(StorageError, match=r"access denied to s3://.*check credentials"):
        store.load_range("obj", 0, 10)
    assert len(proxy.faults) == 1  # one request, not retried


def test_a_silent_endpoint_times_out_on_the_lean_path(lean_store):
    store, _, _ = lean_store
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        lean = store._lean
        lean.base = lean.base.replace(urlsplit(lean.base).netloc, f"127.0.0.1:{silent.getsockname()[1]}")
        lean._pool.connection_pool_kw["timeout"] = s3mod.urllib3.Timeout(connect=1, read=0.3)
        lean._read_timeout = 0.3
        start = time.monotonic()
        with pytest.raises(StorageError, match="did not answer within 0.3s"):
            store.load_range("obj", 0, 10)
        assert time.monotonic() - start < 8


@pytest.mark.parametrize("token", [None, "session-token/with+odd=chars"])
def test_a_lean_request_is_signed_for_what_it_sends(lean_store, monkeypatch, token):
    """The lean path's SigV4 signature covers the request as it goes on the
    wire (its Host, path, Range, date, token): botocore's signer, given the
    request the test server received, computes the same Authorization.  With
    and without a session token, for a key that needs percent-encoding."""
    store, proxy, data = lean_store
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    monkeypatch.setattr(store._lean, "_session", type("S", (), {"get_credentials": lambda self: credentials})())
    key = "dir with space/ob+j~1"
    store.save_object(key, data[:500])
    proxy.match = ""
    assert store.load_range(key, 100, 50) == data[100:150]
    head = proxy.heads[-1]
    line, *lines = head.split("\r\n")
    method, path, _ = line.split(" ")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines)}
    assert (method, headers["range"]) == ("GET", "bytes=100-149")
    assert headers.get("x-amz-security-token") == token
    fixed = datetime.datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: fixed)
    wire = AWSRequest(method="GET", url=f"http://{headers['host']}{path}", headers={"Range": headers["range"]})
    S3SigV4Auth(credentials, "s3", store._lean._region).add_auth(wire)
    assert wire.headers["Authorization"] == headers["authorization"]
    assert credentials.access_key in headers["authorization"]
