"""A size-bounded LRU cache that threads may share.

cachetools' caches are not thread-safe (concurrent evictions raise KeyError),
and the mount reads the repository from its event loop and its worker
threads at once, so every repository-level cache is one of these.
"""

from __future__ import annotations

import threading

from cachetools import LRUCache


class LockedLRU(LRUCache):
    """``maxsize`` counts entries, or with ``getsizeof`` (an estimate of an
    entry's bytes) bytes: a cache of trees must not hold 4,096 trees of a
    million entries each.  An entry larger than the whole cache is not kept."""

    def __init__(self, maxsize: int, getsizeof=None):
        super().__init__(maxsize=maxsize, getsizeof=getsizeof)
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            return super().get(key, default)

    def __setitem__(self, key, value) -> None:
        with self._lock:
            if self.getsizeof(value) > self.maxsize:
                return
            super().__setitem__(key, value)
