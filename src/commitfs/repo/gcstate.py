"""What garbage collection publishes for the other writers: its lease and its records.

docs/FORMAT.md ("Garbage collection") is normative; in short:

* ``refs/gc/lease`` (a reference, so it changes by compare-and-swap) names the
  one gc that may run, until the time it holds; the holder renews it while it
  works, and a crashed holder's lease simply expires.  Writers do not merge
  index segments while a lease is live (gc rewrites the index).
* ``gc/records/<id>`` (an immutable object) is a *condemnation*: the packs and
  commits a gc will delete once its grace period is over, unless something
  reaches them by then.  Writers read the condemned packs (cached for
  ``CONDEMNED_TTL`` seconds) and store a blob again rather than deduplicate
  against a condemned copy; before a branch or tag moves, they check (fresh)
  that nothing they deduplicated against is condemned or gone from the index.

Nothing here deletes anything: ops/gc.py does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, GcLeaseError, ObjectNotFoundError, RefConflictError
from commitfs.storage.base import Store

GC_PREFIX = "gc/"
RECORDS_PREFIX = "gc/records/"
LEASE_REF = "gc/lease"
RECORD_TYPE = "commitfs-gc-record-1"
#: How long a writer trusts its copy of the condemned packs before re-listing.
CONDEMNED_TTL = 10.0


@dataclass
class Record:
    """A condemnation: what one gc run will delete after ``time + grace``."""

    key: str
    time: float
    grace: float
    owner: str
    packs: set[bytes] = field(default_factory=set)  # condemned packs
    commits: set[bytes] = field(default_factory=set)  # condemned commit objects
    removed_segments: list[str] = field(default_factory=list)  # index segments it replaced
    written_segments: list[str] = field(default_factory=list)  # the segments it wrote instead
    written_packs: list[bytes] = field(default_factory=list)  # repacked live blobs
    #: False until its index segment is written: a record left incomplete (gc
    #: killed) is dropped by the next run, which deletes nothing it names.
    complete: bool = False
    #: Kept packs some of whose (dead) blobs the new index no longer names:
    #: the sweep looks there too for what a writer resurrected.
    dropped_from: set[bytes] = field(default_factory=set)

    @property
    def due(self) -> float:
        return self.time + self.grace

    def encode(self) -> bytes:
        doc = {"type": RECORD_TYPE, "time": self.time, "grace": self.grace, "owner": self.owner,
               "packs": sorted(p.hex() for p in self.packs), "commits": sorted(c.hex() for c in self.commits),
               "removed_segments": self.removed_segments, "written_segments": self.written_segments,
               "written_packs": [p.hex() for p in self.written_packs], "complete": self.complete,
               "dropped_from": sorted(p.hex() for p in self.dropped_from)}
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, key: str, data: bytes) -> Record:
        try:
            doc = json.loads(data)
            if doc.get("type") != RECORD_TYPE:
                raise ValueError
            return cls(key, float(doc["time"]), float(doc["grace"]), str(doc["owner"]),
                       {bytes.fromhex(p) for p in doc["packs"]}, {bytes.fromhex(c) for c in doc["commits"]},
                       [str(k) for k in doc["removed_segments"]], [str(k) for k in doc["written_segments"]],
                       [bytes.fromhex(p) for p in doc["written_packs"]], doc.get("complete") is True,
                       {bytes.fromhex(p) for p in doc.get("dropped_from", ())})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CommitfsError(f"gc record {key} is unreadable (remove it to let gc run again)") from None


def new_record_key() -> str:
    # Time first, so records list in the order they were made.
    return f"{RECORDS_PREFIX}{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:12]}"


class GcState:
    """A store's live gc records, as writers and readers see them."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}  # immutable objects: each read once
        self._condemned: frozenset[bytes] = frozenset()
        self._condemned_commits: frozenset[bytes] = frozenset()
        self._checked_at = -CONDEMNED_TTL - 1.0

    def records(self) -> list[Record]:
        """Every live record, freshly listed (one LIST, plus one GET per new record)."""
        keys = sorted(self.store.iter_keys(RECORDS_PREFIX))
        out = []
        for key in keys:
            rec = self._records.get(key)
            if rec is None:
                try:
                    rec = Record.decode(key, self.store.load_object(key))
                except ObjectNotFoundError:
                    continue  # finished and removed since listed
                self._records[key] = rec
            out.append(rec)
        with self._lock:
            self._records = {r.key: r for r in out}
            self._condemned = frozenset().union(*(r.packs for r in out))
            self._condemned_commits = frozenset().union(*(r.commits for r in out))
            self._checked_at = time.monotonic()
        return out

    def condemned_packs(self, fresh: bool = False) -> frozenset[bytes]:
        """Packs some live record condemns (at most CONDEMNED_TTL seconds old unless ``fresh``)."""
        if fresh or time.monotonic() - self._checked_at > CONDEMNED_TTL:
            self.records()
        return self._condemned

    def condemned_commits(self, fresh: bool = False) -> frozenset[bytes]:
        if fresh or time.monotonic() - self._checked_at > CONDEMNED_TTL:
            self.records()
        return self._condemned_commits


# --- the lease ------------------------------------------------------------------
@dataclass
class LeaseValue:
    owner: str
    host: str
    pid: int
    expires: float
    #: One more at every gc run: a writer that sees it change knows a gc ran
    #: meanwhile, even one that started and finished between two of its looks.
    generation: int = 0

    def encode(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid,
                           "expires": self.expires, "generation": self.generation},
                          sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> LeaseValue | None:
        try:
            doc = json.loads(data)
            return cls(str(doc["owner"]), str(doc["host"]), int(doc["pid"]), float(doc["expires"]),
                       int(doc.get("generation", 0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # unreadable: treated as expired


def lease_state(store: Store) -> tuple[int, bool]:
    """(generation, held): how many gc runs started so far, and whether one
    holds an unexpired lease now (one GET)."""
    raw = store.load_ref(LEASE_REF)
    if raw is None:
        return 0, False
    value = LeaseValue.decode(raw)
    if value is None:
        return -1, False
    return value.generation, value.expires > time.time()


def lease_active(store: Store) -> bool:
    """Whether some gc holds a lease that has not expired (one GET)."""
    return lease_state(store)[1]


class Lease:
    """The gc lease: taken by compare-and-swap, renewed while held, released at the end.

    ``ttl`` is how long a holder that stops renewing (crashed, killed, cut off)
    keeps others out."""

    def __init__(self, store: Store, ttl: float):
        self.store = store
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self._value: bytes | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self.generation = 0

    def acquire(self) -> None:
        raw = self.store.load_ref(LEASE_REF)
        held = LeaseValue.decode(raw) if raw is not None else None
        self.generation = (held.generation if held is not None else 0) + 1
        if raw is not None:
            if held is not None and held.expires > time.time():
                left = held.expires - time.time()
                raise GcLeaseError(
                    f"another gc is running (pid {held.pid} on {held.host}; its lease expires in {left:.0f}s "
                    "unless renewed): not starting a second one")
        new = self._new_value()
        try:
            self.store.save_ref_if_equals(LEASE_REF, new, raw)
        except RefConflictError:
            raise GcLeaseError("another gc took the lease just now: not starting a second one") from None
        self._value = new
        self._thread = threading.Thread(target=self._renew_loop, name="commitfs-gc-lease", daemon=True)
        self._thread.start()

    def _new_value(self, expires: float | None = None) -> bytes:
        return LeaseValue(self.owner, socket.gethostname(), os.getpid(),
                          time.time() + self.ttl if expires is None else expires, self.generation).encode()

    def renew(self) -> None:
        with self._lock:
            if self.lost:
                raise GcLeaseError(self.lost)
            new = self._new_value()
            try:
                self.store.save_ref_if_equals(LEASE_REF, new, self._value)
            except RefConflictError:
                self.lost = "the gc lease was lost (it expired and another gc took it): stopped"
                raise GcLeaseError(self.lost) from None
            self._value = new

    def check(self) -> None:
        """Raise unless the lease is still ours with time left (call before deleting)."""
        if self.lost:
            raise GcLeaseError(self.lost)
        value = LeaseValue.decode(self._value or b"")
        if value is None or value.expires - time.time() < self.ttl / 3:
            self.renew()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except GcLeaseError:
                return
            except CommitfsError:
                continue  # a storage hiccup: try again (check() refuses once it is short)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._value is not None and not self.lost:
                try:  # expired at once, the generation kept (see LeaseValue)
                    self.store.save_ref_if_equals(LEASE_REF, self._new_value(expires=0.0), self._value)
                except (RefConflictError, CommitfsError):
                    pass  # it expires by itself
            self._value = None
