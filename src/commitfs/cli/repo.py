"""The repository a command names (-r/--repo, --endpoint-url), opened through ops/root.py.

Kept apart from cli/core.py (the repository verbs, which import most of
commitfs) so that a verb needing only this, ``mount`` above all, starts fast.
"""

from __future__ import annotations

from commitfs.errors import CommitfsError


def repo_url(args) -> str:
    if not args.repo:
        raise CommitfsError("no repository given: use -r/--repo URL or set COMMITFS_REPO")
    return args.repo


def store_options(args) -> dict:
    return {"endpoint_url": args.endpoint_url} if getattr(args, "endpoint_url", None) else {}


def open_url(args, url: str, endpoint_url: str | None = None):
    """The repository at ``url`` through the one composition root (ops/root.py);
    one-shot commands keep no chunk cache."""
    from commitfs.ops.root import open_repository

    return open_repository(url, cache_dir=False, endpoint_url=endpoint_url or getattr(args, "endpoint_url", None))


def open_repo(args):
    return open_url(args, repo_url(args))
