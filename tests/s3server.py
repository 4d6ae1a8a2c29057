"""A real moto S3 server in a child process, for tests.

Run as ``python tests/s3server.py PORT`` it serves moto on 127.0.0.1:PORT.
It is single-threaded on purpose: moto checks S3 conditions (If-Match,
If-None-Match) and then writes without a lock, so only one request at a time
makes conditional writes atomic, as they are on real S3.  A single-threaded
werkzeug server speaks HTTP/1.0 and closes each connection after its answer,
so concurrent clients queue rather than block one another.

Imported, it offers :class:`MotoServer`, which starts and stops that process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time


class MotoServer:
    """A moto server process on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # the server's stderr, shown if it fails to start

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and wait until it accepts connections."""
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise RuntimeError(f"moto server exited with {self._proc.returncode}:\n{err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto server did not listen on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        """Terminate the process and reap it; safe to call more than once."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(port: int) -> None:
    import logging
    import signal

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    # Exit cleanly on terminate() instead of dying mid-request.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        "127.0.0.1",
        port,
        app,
        threaded=False,
        use_reloader=False,
        request_handler=MotoRequestHandler,  # keeps S3 metadata headers with '_'
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
