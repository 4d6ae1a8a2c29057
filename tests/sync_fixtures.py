"""Fixtures and helpers for the sync and S3 fault tests.

* ``TcpProxy``: a threaded TCP forwarder on 127.0.0.1 in front of a server,
  which a test can cut (every connection reset, new ones refused: the server
  is gone), restore on the same port, or stall (connections accepted, nothing
  forwarded: a server that does not answer).  It counts the bytes it carries
  each way, and can cut itself once a number of bytes went through, which
  puts the cut deterministically "in the middle of" a push or a pull.
  Killing the moto server itself would not do: its state is in memory, so a
  restarted server would have lost the bucket.
* ``proxied_s3``: a dedicated moto server with a TcpProxy in front, and a
  bucket; ``.url`` is an S3 URL and ``.endpoint_url`` the proxy's endpoint.
* ``CountingStore``: a FaultyStore that also counts the bytes saved per key
  prefix, and can run a hook before a call (to stage races).
* ``small_packs``: packs of 256 KiB, sync batches of 512 KiB and a small read-ahead, so a few MiB
  of test data make many packs and index segments.
* ``pack_mode``: runs a test twice, with blobs re-packed one by one and with
  data packs copied whole whenever possible.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import boto3
import pytest

from commitfs.repo.repository import CONFIG_KEY, Repository
from commitfs.storage.base import Store
from commitfs.storage.url import open_store
from commitfs.storage.faulty import FaultyStore
from s3server import MotoServer


class TcpProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``target_port``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.up_bytes = 0  # client -> server
        self.down_bytes = 0  # server -> client
        #: Cut (as ``cut()``) once this many bytes went up / down.
        self.cut_after_up: int | None = None
        self.cut_after_down: int | None = None
        self.stalled = False
        self.cuts = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.port = 0
        self._listen()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listener = sock
        t = threading.Thread(target=self._accept, args=(sock,), daemon=True, name="proxy-accept")
        t.start()
        self._threads.append(t)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    server.close()
                    return
                self._conns.update((client, server))
                generation = self.cuts
            pair = [2]  # pumps still running on this connection
            for a, b, up in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(a, b, up, generation, pair), daemon=True,
                                     name="proxy-pump")
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, generation: int, pair: list[int]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.stalled and self.cuts == generation:  # hold the bytes: silence
                    time.sleep(0.05)
                if self.cuts != generation:
                    break
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.up_bytes += len(data)
                        trip = self.cut_after_up is not None and self.up_bytes >= self.cut_after_up
                    else:
                        self.down_bytes += len(data)
                        trip = self.cut_after_down is not None and self.down_bytes >= self.cut_after_down
                if trip:
                    self.cut()
                    break
        except OSError:
            pass
        # Half-close what this pump read and wrote: wakes the other pump.
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            pair[0] -= 1
            last = pair[0] == 0
            if last:
                self._conns.discard(src)
                self._conns.discard(dst)
        if last:
            src.close()
            dst.close()

    def cut(self) -> None:
        """The server is gone: reset every connection, refuse new ones."""
        with self._lock:
            self.cut_after_up = self.cut_after_down = None
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            self.cuts += 1
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
            except OSError:
                pass
            listener.close()
        for sock in conns:
            try:
                # Linger 0: the peer gets a reset, as when a server dies.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pumps blocked on it
            except OSError:
                pass

    def restore(self) -> None:
        """The server is back, on the same port."""
        with self._lock:
            if self._listener is not None:
                return
        self._listen()

    def reset_counts(self) -> None:
        with self._lock:
            self.up_bytes = self.down_bytes = 0

    def close(self) -> None:
        self.stalled = False
        self.cut()
        for t in self._threads:
            t.join(timeout=5)


class CountingStore(FaultyStore):
    """A FaultyStore that counts saved bytes by key prefix (``packs``,
    ``index``, ``commits``) and can call ``before(method, key)`` first."""

    def __init__(self, inner: Store):
        super().__init__(inner)
        self.saved: Counter[str] = Counter()
        self.saved_count: Counter[str] = Counter()
        self.before: Callable[[str, str], None] | None = None
        #: (key, data) of every object saved whose key this accepts, in order.
        self.keep: Callable[[str], bool] | None = None
        self.kept: list[tuple[str, bytes]] = []

    def _enter(self, method: str, key: str) -> None:
        if self.before is not None:
            self.before(method, key)
        super()._enter(method, key)

    def save_object(self, key: str, data: bytes) -> None:
        super().save_object(key, data)
        with self._lock:
            if self.keep is not None and self.keep(key):
                self.kept.append((key, data))
            self.saved[key.split("/", 1)[0]] += len(data)
            self.saved_count[key.split("/", 1)[0]] += 1

    def reset(self) -> None:
        with self._lock:
            self.saved.clear()
            self.saved_count.clear()
            self.calls.clear()


def counting_repository(url: str, **store_options) -> Repository:
    """A Repository on ``url`` whose store (``repo.store``) is a CountingStore."""
    store = CountingStore(open_store(url, **store_options))
    return Repository(store, json.loads(store.inner.load_object(CONFIG_KEY)))


class ProxiedS3:
    def __init__(self, server: MotoServer, proxy: TcpProxy, bucket: str):
        self.server = server
        self.proxy = proxy
        self.bucket = bucket
        self.endpoint_url = proxy.endpoint_url
        self.url = f"s3://{bucket}/repo"


@pytest.fixture
def proxied_s3(s3_server, monkeypatch):
    """A dedicated moto server behind a TcpProxy, with a fresh bucket.

    The endpoint (the proxy) is set in the environment, as ``s3_url`` does,
    so Repository.open and CLI subprocesses use it without options.  Depends
    on ``s3_server`` for its fake-credential environment."""
    server = MotoServer()
    server.start()
    proxy = None
    try:
        client = boto3.client("s3", endpoint_url=server.endpoint_url)
        bucket = f"test-{uuid.uuid4().hex[:16]}"
        client.create_bucket(Bucket=bucket)
        client.close()
        proxy = TcpProxy(server.port)
        monkeypatch.setenv("COMMITFS_S3_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        yield ProxiedS3(server, proxy, bucket)
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()


@pytest.fixture
def small_packs(monkeypatch):
    """Packs of 256 KiB, index segments every 512 KiB and a read-ahead of
    128 KiB per thread during sync: at this scale the default read-ahead
    would hold the whole data set, and what was read ahead but not yet
    indexed when the connection dies is read again on resume (how much,
    under load, depends on timing)."""
    import commitfs.ops.sync as sync
    import commitfs.repo.repository as repository

    monkeypatch.setattr(repository, "TARGET_PACK_SIZE", 256 * 1024)
    monkeypatch.setattr(sync, "BATCH_BYTES", 512 * 1024)
    monkeypatch.setattr(sync, "_WINDOW_PER_THREAD", 128 * 1024)


@pytest.fixture(params=["repack", "whole packs"])
def pack_mode(request, monkeypatch):
    """Blobs re-packed one by one, or data packs copied whole whenever possible."""
    import commitfs.ops.sync as sync

    if request.param == "whole packs":
        monkeypatch.setattr(sync, "_WHOLE_PACK_MIN", 0)
        monkeypatch.setattr(sync, "_WHOLE_PACK_SHARE", 0.0)
    else:
        monkeypatch.setattr(sync, "_WHOLE_PACK_MIN", float("inf"))
    return request.param
