"""A size-bounded LRU cache that threads may share.

cachetools' caches are not thread-safe (concurrent evictions raise KeyError),
and the mount reads the repository from its event loop and its worker
threads at once, so every repository-level cache is one of these.
"""

from __future__ import annotations

import threading

from cachetools import LRUCache


class LockedLRU(LRUCache):
    def __init__(self, maxsize: int):
        super().__init__(maxsize=maxsize)
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            return super().get(key, default)

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)
