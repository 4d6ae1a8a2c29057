"""The control channel of a writable workspace mount: ``status``, ``reset``, ``commit``.

The daemon listens on a Unix socket (its path is in the mount's runtime
record, fuse/lifecycle.py) and answers one JSON request per connection with
one JSON line: ``{"op": "status"}``, ``{"op": "reset", "paths": [...]}``,
``{"op": "commit", "message": ..., "metadata": {...}, "author": ...}``.
Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE,
"kind": ...}`` (kind ``conflict`` carries ``paths``; ``nothing`` means nothing
to commit).  The workspace does the work (vfs.workspace); this module only
frames requests and, after a reset or a commit, tells the kernel to drop what
it cached of the inodes that changed (in a worker thread, outside any
request handler, as pyfuse3 requires).
"""

from __future__ import annotations

import json
import logging
import os
import socket

import trio

from commitfs.errors import CommitfsError, NothingToCommitError
from commitfs.fuse.adapter import invalidate
from commitfs.ops.changeset import ConflictError
from commitfs.vfs.workspace import WorkspaceFS

log = logging.getLogger(__name__)

#: Bound on a request line (paths to reset, a commit message).
MAX_REQUEST = 16 * 1024 * 1024


async def serve(fs: WorkspaceFS, path: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_connection, fs, trio.SocketStream(conn))
    finally:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass


async def _connection(fs: WorkspaceFS, stream: trio.SocketStream) -> None:
    async with stream:
        buf = b""
        try:
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                part = await stream.receive_some(65536)
                if not part:
                    break
                buf += part
            request = json.loads(buf.split(b"\n", 1)[0])
            answer = await handle(fs, request)
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}", "kind": "usage"}
        try:
            await stream.send_all(json.dumps(answer).encode() + b"\n")
        except trio.BrokenResourceError:
            log.info("control: the client went away before the answer")


async def handle(fs: WorkspaceFS, request: dict) -> dict:
    op = request["op"]
    try:
        if op == "status":
            entries = await fs.status()
            return {"ok": True, "branch": fs.branch, "base": fs.base.hex(),
                    "changes": [e.to_json() for e in entries]}
        if op == "reset":
            changed = await fs.reset(list(request.get("paths") or []))
            await trio.to_thread.run_sync(invalidate, changed)
            return {"ok": True, "base": fs.base.hex()}
        if op == "commit":
            outcome = await fs.commit(request["message"], dict(request.get("metadata") or {}),
                                      request.get("author"))
            await trio.to_thread.run_sync(invalidate, outcome.invalidate)
            log.info("committed %s to %s (%d changes%s)", outcome.commit_id.hex(), fs.branch, outcome.changes,
                     ", rebased" if outcome.rebased else "")
            return {"ok": True, "id": outcome.commit_id.hex(), "created": True,
                    "parent": outcome.parent.hex() if outcome.parent else None,
                    "rebased": outcome.rebased, "changes": outcome.changes, "branch": fs.branch}
    except ConflictError as exc:
        return {"ok": False, "error": str(exc), "kind": "conflict", "paths": exc.paths}
    except NothingToCommitError as exc:
        cid = exc.commit_id
        return {"ok": False, "error": str(exc), "kind": "nothing",
                "id": cid.hex() if isinstance(cid, bytes) else str(cid)}
    except CommitfsError as exc:
        return {"ok": False, "error": str(exc), "kind": "error"}
    except Exception as exc:
        log.exception("control request %s failed", op)
        return {"ok": False, "error": f"the workspace daemon failed: {exc}", "kind": "error"}
    raise KeyError(f"unknown op {op!r}")
