"""Running the UI: bind the port (a port in use is a one-line error), then uvicorn.

The socket is bound here rather than by uvicorn so that a failure to bind
raises ServerError before anything is printed, and so that ``port=0`` (tests)
tells the caller the port it got.  uvicorn's own signal handling makes
Ctrl-C (SIGINT) and SIGTERM a clean stop: it finishes the requests in
flight, then ``serve`` returns.
"""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket

from commitfs.errors import ServerError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on {host}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServerError(f"port {port} on {host} is in use (choose another with --port)") from None
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def make_server(app, sock: socket.socket, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(app, sock: socket.socket) -> None:
    """Serve until Ctrl-C / SIGTERM, then return.

    uvicorn stops on either signal and then raises it again for the handler
    it found installed: SIGINT's raises KeyboardInterrupt, and SIGTERM's is
    made to do the same, so both end here as a clean stop."""
    server = make_server(app, sock)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
