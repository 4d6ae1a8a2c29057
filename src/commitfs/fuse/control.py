"""The control channel of a writable workspace mount: ``status``, ``reset``, ``commit``.

The daemon listens on a Unix socket (its path is in the mount's runtime
record, fuse/lifecycle.py) and answers one JSON request per connection with
one JSON line: ``{"op": "status"}``, ``{"op": "reset", "paths": [...]}``,
``{"op": "commit", "message": ..., "metadata": {...}, "author": ...}``.
Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE,
"kind": ...}`` (kind ``conflict`` carries ``paths``; ``nothing`` means nothing
to commit).

The workspace (vfs.workspace) keeps the edits; this module composes the
commit: it pauses the workspace's changes, takes its Draft, has
ops.changeset.commit_draft store it and move the branch (in a worker thread;
the workspace's ``set_pending`` is the callback that records the commit id
just before the compare-and-swap), then settles the workspace on the new
commit.  After a reset or a commit it tells the kernel to drop what it
cached of the inodes that changed (in a worker thread, outside any request
handler, as pyfuse3 requires).
"""

from __future__ import annotations

import json
import logging
import os
import socket

import trio

from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, ConflictError, NothingToCommitError
from commitfs.fuse.adapter import invalidate
from commitfs.ops.changes import dir_entry, unchanged
from commitfs.ops.changeset import StatusEntry, commit_draft, status_of
from commitfs.ops.merge import (META_BASE, META_SOURCE, MergeError, MergeOptions, hold_merge, hold_name,
                               prepare_workspace_merge, release_merge, unresolved)
from commitfs.vfs.workspace import WorkspaceFS

log = logging.getLogger(__name__)

#: Bound on a request line (paths to reset, a commit message).
MAX_REQUEST = 16 * 1024 * 1024


@dataclass
class CommitOutcome:
    commit_id: bytes
    parent: bytes | None
    rebased: bool
    changes: int
    invalidate: list[int] = field(default_factory=list)


def _unchanged(repo, base_tree: bytes, draft) -> bool:
    return draft is None or unchanged(repo, dir_entry(base_tree), draft)


def open_workspace(repo, workspace_dir: str, branch: str, options) -> WorkspaceFS:
    """The workspace of a writable mount, with the change engine deciding whether leftover
    rows are edits (a clean workspace starts from the branch's current head)."""
    return WorkspaceFS.open_workspace(repo, workspace_dir, branch, options, unchanged=_unchanged)


async def status(fs: WorkspaceFS) -> list[StatusEntry]:
    """What the workspace changed against its base commit."""
    return (await _status(fs))[0]


async def _status(fs: WorkspaceFS) -> tuple[list[StatusEntry], dict | None]:
    async with fs.paused():
        draft = fs.draft()
        state = json.loads(fs.merge_state) if fs.merge_state else None
        base_tree = (await fs.loader.io("base commit", fs.repo.load_commit, fs.base)).tree

        def run():
            entries = status_of(fs.repo, base_tree, draft)
            if state is not None:
                state["unresolved"] = unresolved(fs.repo, draft if draft is not None else dir_entry(base_tree),
                                                 state["conflicts"])
            return entries, state
        return await trio.to_thread.run_sync(run)


async def merge(fs: WorkspaceFS, source_rev: str, options: MergeOptions) -> dict:
    """Apply the merge of ``source_rev`` to the workspace as pending edits (conflicts
    spelled out in files: ops/merge.prepare_workspace_merge); the next commit records it
    with two parents."""
    async with fs.paused():
        if fs.merge_state:
            raise MergeError("a merge is already in progress in this workspace: commit it, or reset to abandon it")
        draft = fs.draft()
        base_tree = (await fs.loader.io("base commit", fs.repo.load_commit, fs.base)).tree
        if not await trio.to_thread.run_sync(_unchanged, fs.repo, base_tree, draft):
            raise MergeError("the workspace has edits: commit or reset them before merging into it")
        plan = await trio.to_thread.run_sync(prepare_workspace_merge, fs.repo, fs.base, source_rev, fs.branch,
                                             options)
        changed: list[int] = []
        if plan.status != "up-to-date":
            state = plan.state(source_rev)
            state["hold"] = hold_name(str(fs.overlay.path))
            await trio.to_thread.run_sync(hold_merge, fs.repo, state["hold"], plan.tree, fs.base, plan.source)
            changed = await fs.show_merge(plan.tree, json.dumps(state))
    await trio.to_thread.run_sync(invalidate, changed)
    return {"status": plan.status, "source": plan.source.hex(), "base": plan.base.hex() if plan.base else None,
            "bases": [b.hex() for b in plan.bases], "conflicts": plan.conflicts,
            "resolved": [r.to_json() for r in plan.resolved], "branch": fs.branch}


async def commit(fs: WorkspaceFS, message: str, metadata: dict[str, str] | None = None,
                 author: str | None = None) -> CommitOutcome:
    """Commit the workspace's edits to its branch; afterwards it has none pending."""
    async with fs.paused():
        draft = fs.draft()
        base, repo = fs.base, fs.repo
        state = json.loads(fs.merge_state) if fs.merge_state else None

        def run():
            base_tree = repo.load_commit(base).tree
            nchanges = len(status_of(repo, base_tree, draft))
            extra: tuple[bytes, ...] = ()
            meta = dict(metadata or {})
            if state is not None:
                left = unresolved(repo, draft if draft is not None else dir_entry(base_tree), state["conflicts"])
                if left:
                    raise ConflictError(
                        f"a merge of {state['source_rev']} is in progress with {len(left)} unresolved path"
                        f"{'s' if len(left) != 1 else ''}: {', '.join(left[:10])}{' ...' if len(left) > 10 else ''}"
                        " (remove the conflict markers, and the .theirs and .base files)", left)
                extra = (bytes.fromhex(state["source"]),)
                meta.setdefault(META_BASE, state["base"])
                meta.setdefault(META_SOURCE, state["source_rev"])
            try:
                return commit_draft(repo, fs.branch, base, draft, message=message, metadata=meta,
                                    author=author, on_pending=fs.set_pending, extra_parents=extra), nchanges
            except Exception:  # not moved (conflict, storage): nothing pending
                fs.set_pending(None)
                raise

        result, nchanges = await trio.to_thread.run_sync(run)
        changed = await fs.settle(result.commit_id)
        if state is not None and state.get("hold"):
            await _release(fs, state["hold"])
        return CommitOutcome(result.commit_id, result.parent, result.rebased, nchanges, changed)


async def _release(fs: WorkspaceFS, name: str) -> None:
    try:
        await trio.to_thread.run_sync(release_merge, fs.repo, name)
    except CommitfsError as exc:  # only keeps a tree alive longer than needed
        log.warning("cannot release the merge reference %s: %s", name, exc)


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
            entries, state = await _status(fs)
            answer = {"ok": True, "branch": fs.branch, "base": fs.base.hex(),
                      "changes": [e.to_json() for e in entries]}
            if state is not None:
                answer["merge"] = state
            return answer
        if op == "merge":
            options = MergeOptions(request.get("strategy"), [tuple(r) for r in request.get("rules") or []],
                                   [(g, tuple(c)) for g, c in request.get("keys") or []])
            return {"ok": True, **await merge(fs, request["source"], options)}
        if op == "reset":
            state = json.loads(fs.merge_state) if fs.merge_state else None
            changed = await fs.reset(list(request.get("paths") or []))
            if state is not None and state.get("hold") and not fs.merge_state:
                await _release(fs, state["hold"])  # the merge was abandoned
            await trio.to_thread.run_sync(invalidate, changed)
            return {"ok": True, "base": fs.base.hex()}
        if op == "commit":
            outcome = await commit(fs, request["message"], dict(request.get("metadata") or {}),
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
