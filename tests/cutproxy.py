"""A TCP proxy on 127.0.0.1 that cuts answers at random points, for tests.

    with CuttingProxy(target_port, probability=0.3, seed=1) as proxy:
        store = S3Store(bucket, prefix, endpoint_url=proxy.endpoint_url)

Each connection's request goes through whole; its answer (the test S3 server
speaks HTTP/1.0 and closes after each answer) is read whole from the server,
then, with ``probability``, only a prefix of it is sent before the connection
is closed cleanly: cut inside the status line or the headers (the client then
sees no Content-Length, no body), or inside the body (a short body, a listing
cut short).  ``max_cuts`` bounds the cuts made; ``cuts``/``connections``
count them.  Every thread is a daemon and ``stop`` closes the listener.
"""

from __future__ import annotations

import random
import socket
import threading


class LocalProxy:
    """A listener on 127.0.0.1 in front of ``target_port``: each connection is
    handed to ``_serve`` in a daemon thread, from ``start`` (or ``with``) to ``stop``."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError


class CuttingProxy(LocalProxy):
    def __init__(self, target_port: int, *, probability: float, seed: int, max_cuts: int | None = None):
        self.probability = probability
        self.max_cuts = max_cuts
        self.cuts = 0
        self.header_cuts = 0
        self.connections = 0
        self._rng = random.Random(seed)
        super().__init__(target_port)

    def _decide(self, answer: bytes, request: bytes = b"") -> int | None:
        """Where to cut ``answer`` (bytes to send), or None to send it whole;
        ``request`` is the request's first bytes (its request line, at least)."""
        with self._lock:
            self.connections += 1
            if self.max_cuts is not None and self.cuts >= self.max_cuts:
                return None
            if self._rng.random() >= self.probability:
                return None
            self.cuts += 1
            head_end = answer.find(b"\r\n\r\n")
            head_end = len(answer) if head_end < 0 else head_end + 4
            if self._rng.random() < 0.5 or head_end >= len(answer):
                self.header_cuts += 1
                return self._rng.randrange(0, head_end)  # in the status line or the headers
            return self._rng.randrange(head_end, len(answer))  # in the body

    def _answer(self, answer: bytes, request: bytes) -> bytes:
        """The answer to send for the server's ``answer`` (a subclass may replace it)."""
        return answer

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=30)
        except OSError:
            client.close()
            return
        client.settimeout(30)
        request: list[bytes] = []

        def pump() -> None:  # the request, whole, as it comes
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    if not request:
                        request.append(data)  # before the server has it: read before its answer
                    server.sendall(data)
            except OSError:
                pass

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        chunks = []
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except OSError:
            pass
        answer = b"".join(chunks)
        head = request[0] if request else b""
        answer = self._answer(answer, head)
        cut = self._decide(answer, head)
        try:
            client.sendall(answer if cut is None else answer[:cut])
            client.shutdown(socket.SHUT_WR)  # a clean end: the client sees EOF, not a reset
        except OSError:
            pass
        finally:
            client.close()
            server.close()


def s3_error_answer(status: str, code: str, message: str) -> bytes:
    """A whole HTTP answer carrying S3's XML error ``code``."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class LosingProxy(CuttingProxy):
    """Every request reaches the server whole; the answers to the first ``times``
    requests whose request line starts with ``method`` and contains ``marker`` are
    lost (the connection closes before a byte of them), as when a network drops an
    answer the server has sent; with ``then``, the answer to each later such
    request is replaced by ``then`` (what a server that does not repeat itself says)."""

    def __init__(self, target_port: int, *, method: bytes, marker: bytes, times: int = 1,
                 then: bytes | None = None):
        self.method = method + b" "
        self.marker = marker
        self.remaining = times
        self.then = then
        self.lost = self.replaced = 0
        super().__init__(target_port, probability=0.0, seed=0)

    def _matches(self, request: bytes) -> bool:
        line = request.split(b"\r\n", 1)[0]
        return line.startswith(self.method) and self.marker in line

    def _answer(self, answer: bytes, request: bytes) -> bytes:
        with self._lock:
            if self.then is not None and self.remaining == 0 and self.lost and self._matches(request):
                self.replaced += 1
                return self.then
        return answer

    def _decide(self, answer: bytes, request: bytes = b"") -> int | None:
        with self._lock:
            self.connections += 1
            if self.remaining > 0 and self._matches(request):
                self.remaining -= 1
                self.lost += 1
                return 0
        return None
