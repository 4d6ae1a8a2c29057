"""The one retry policy of commitfs storage.

A network backend wraps each request in :func:`retry_call`.  The request
signals a failure worth retrying (connection refused or reset, timeout, 5xx,
throttling) by raising :class:`TransientError`; builtin ``ConnectionError`` and
``TimeoutError`` count as transient too.  Anything else (not found, access
denied, a failed precondition...) propagates at once: retrying cannot help.

Attempts are spaced by exponential backoff with full jitter, so clients that
failed together do not retry together, and bounded twice: by a number of
attempts and by an overall deadline.  When both run out the caller gets one
commitfs error with a one-line message naming the operation.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from commitfs.errors import StorageError, StorageTimeoutError

T = TypeVar("T")

#: First backoff ceiling; each further attempt doubles it up to _MAX_DELAY_S.
_BASE_DELAY_S = 0.1
_MAX_DELAY_S = 5.0


class TransientError(Exception):
    """A failure that may go away if the request is repeated.

    ``reason`` is a short human description ("cannot reach S3 endpoint ...").
    ``unreachable`` tells the backend could not be reached or did not answer in
    time (as opposed to answering with a server error); if the last attempt
    failed that way, the caller gets StorageTimeoutError."""

    def __init__(self, reason: str, *, unreachable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


def retry_call(fn: Callable[[], T], *, what: str, attempts: int = 5, deadline_s: float = 60.0) -> T:
    """Call ``fn()`` until it succeeds, retrying transient failures.

    Makes at most ``attempts`` calls and starts none after ``deadline_s``
    seconds (a call in flight is bounded by the backend's own socket timeouts,
    not interrupted).  On giving up, raises StorageTimeoutError if the backend
    was unreachable or too slow, StorageError if it kept answering with errors;
    ``what`` names the operation in the message ("GET s3://bucket/key")."""
    start = time.monotonic()
    deadline = start + deadline_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except (TransientError, ConnectionError, TimeoutError) as exc:
            last = exc
        # Full jitter: a random pause below an exponentially growing ceiling.
        delay = random.uniform(0, min(_MAX_DELAY_S, _BASE_DELAY_S * 2 ** (attempt - 1)))
        if attempt >= attempts or time.monotonic() + delay > deadline:
            break
        time.sleep(delay)

    if isinstance(last, TransientError):
        reason, unreachable = last.reason, last.unreachable
    else:
        reason, unreachable = str(last) or type(last).__name__, True
    elapsed = time.monotonic() - start
    error = StorageTimeoutError if unreachable else StorageError
    raise error(f"{what}: {reason} (gave up after {attempt} attempts in {elapsed:.1f}s)") from last
