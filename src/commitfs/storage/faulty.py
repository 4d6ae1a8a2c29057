"""A store wrapper that injects faults and counts calls, for tests.

    store = FaultyStore(LocalStore(path))
    store.fail_on = {"load_range"}             # every ranged read fails...
    store.fail_keys = lambda key: key.startswith("packs/")   # ...of these keys
    store.fail_count = 2                       # ...twice, then works again
    store.stall_s, store.stall_timeout_s = 60, 0.2   # reads hang, then time out
    store.stall_keys = lambda key: key in slow     # ...only the reads of these keys
    store.calls["load_range"]                  # how many ranged reads happened
    store.keys_read                            # which keys were read (objects and ranges)
    store.cut_probability = 0.3                # reads return a random prefix of the truth
                                               # (a response cut short, unnoticed)
    store.bytes_read                           # bytes returned by load_object/load_range

Every attribute may be changed at any time, from any thread.  local_path() is
always None, even over a local store, so that every read goes through here.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator

from commitfs.errors import StorageError, StorageTimeoutError
from commitfs.storage.base import Store

_READS = frozenset({"load_object", "load_range"})


class FaultyStore(Store):
    def __init__(self, inner: Store):
        self.inner = inner
        self.url = inner.url
        #: Calls made so far, by method name (faulty ones included).
        self.calls: Counter[str] = Counter()
        #: Keys read so far (load_object, load_range, faulty ones included).
        self.keys_read: set[str] = set()
        #: Bytes returned by load_object and load_range so far.
        self.bytes_read = 0
        #: Method names that raise ``error``; ``fail_keys`` narrows them to
        #: some keys/reference names, ``fail_count`` to the next N such calls
        #: (None: forever).
        self.fail_on: set[str] = set()
        self.fail_keys: Callable[[str], bool] | None = None
        self.fail_count: int | None = None
        self.error: Callable[[str], Exception] = StorageError
        #: Reads (load_object, load_range) sleep ``stall_s`` first.  With
        #: ``stall_timeout_s`` set below it they give up after that long and
        #: raise StorageTimeoutError, as a client's read timeout would.
        self.stall_s = 0.0
        self.stall_timeout_s: float | None = None
        #: Narrows the stalls to the reads of these keys (None: every read).
        self.stall_keys: Callable[[str], bool] | None = None
        #: Reads (load_object, load_range, load_ref) return a random prefix of
        #: their answer with this probability (seeded by ``cut_seed``): what a
        #: backend that missed a cut connection would hand on.  calls["cut"]
        #: counts them.
        self.cut_probability = 0.0
        self.cut_seed = 0
        self._cut_rng = None
        self._lock = threading.Lock()
        self._unstall = threading.Event()

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    def release(self) -> None:
        """End every stall now and disable further ones."""
        self.stall_s = 0.0
        self._unstall.set()

    def _enter(self, method: str, key: str) -> None:
        with self._lock:
            self.calls[method] += 1
            if method in _READS:
                self.keys_read.add(key)
            fail = method in self.fail_on and (self.fail_keys is None or self.fail_keys(key))
            if fail and self.fail_count is not None:
                if self.fail_count > 0:
                    self.fail_count -= 1
                else:
                    fail = False
        if fail:
            raise self.error(f"injected failure: {method}({key})")
        if method in _READS and self.stall_s > 0 and (self.stall_keys is None or self.stall_keys(key)):
            limit = self.stall_s if self.stall_timeout_s is None else min(self.stall_s, self.stall_timeout_s)
            if not self._unstall.wait(limit) and limit < self.stall_s:
                raise StorageTimeoutError(f"injected stall: {method}({key}) timed out after {limit:g}s")

    def _cut(self, data):
        if self.cut_probability <= 0 or data is None:
            return data
        import random

        with self._lock:
            if self._cut_rng is None or self._cut_rng[0] != self.cut_seed:
                self._cut_rng = (self.cut_seed, random.Random(self.cut_seed))
            rng = self._cut_rng[1]
            if rng.random() >= self.cut_probability or not len(data):
                return data
            self.calls["cut"] += 1
            return bytes(data[:rng.randrange(len(data))])

    # --- objects -------------------------------------------------------------
    def save_object(self, key: str, data: bytes) -> None:
        self._enter("save_object", key)
        self.inner.save_object(key, data)

    def save_object_from(self, key: str, f, size: int) -> None:
        self._enter("save_object", key)  # the same fault point as save_object
        self.inner.save_object_from(key, f, size)

    def load_object(self, key: str) -> bytes:
        self._enter("load_object", key)
        data = self.inner.load_object(key)
        with self._lock:
            self.bytes_read += len(data)
        return data

    def load_range(self, key: str, offset: int, length: int) -> bytes:
        self._enter("load_range", key)
        data = self.inner.load_range(key, offset, length)
        with self._lock:
            self.bytes_read += len(data)
        return data

    def lookup_size(self, key: str) -> int | None:
        self._enter("lookup_size", key)
        return self.inner.lookup_size(key)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        self._enter("iter_keys", prefix)
        return self.inner.iter_keys(prefix)

    def iter_objects(self, prefix: str = ""):
        self._enter("iter_keys", prefix)
        return self.inner.iter_objects(prefix)

    def remove_object(self, key: str) -> None:
        self._enter("remove_object", key)
        self.inner.remove_object(key)

    # --- references ----------------------------------------------------------
    def load_ref(self, name: str) -> bytes | None:
        self._enter("load_ref", name)
        return self._cut(self.inner.load_ref(name))

    def save_ref_if_equals(self, name: str, new: bytes | None, expected: bytes | None) -> None:
        self._enter("save_ref_if_equals", name)
        self.inner.save_ref_if_equals(name, new, expected)

    def iter_refs(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        self._enter("iter_refs", prefix)
        return self.inner.iter_refs(prefix)

    def close(self) -> None:
        self.release()
        self.inner.close()
