"""Aliases: movable names for commits (``production``), with an append-only audit log.

The format (docs/FORMAT.md, "Aliases") is two kinds of things:

* the alias reference ``refs/aliases/<name>``, moved only by compare-and-swap::

      <64 hex commit id>\\n          the commit the alias names (first line: gc marks it)
      log <64 hex entry id>\\n       the newest entry of its audit log
      protected\\n                   (optional) moves only with --force
      removed\\n                     (optional) `alias rm`: no longer resolves; the log stays

* log entries, immutable objects ``aliaslog/<2 hex>/<64 hex id>`` whose id is
  the BLAKE3 hash of their bytes (canonical JSON: sorted keys, no spaces,
  UTF-8).  Each names the entry before it (``previous``), so the log of an
  alias is the chain from the reference's ``log`` line back to an entry
  without ``previous``.

Write order: the entry object first, then the reference by compare-and-swap
from the value the writer read.  A writer that loses the swap leaves an
entry object nothing names: it is not in the log (the log is exactly the
chain from the current reference value, so it always agrees with it), and
the writer is told.  A crash between the two writes leaves the same harmless
orphan.  Because entries are content-addressed and name their predecessor, a
chain copied to another repository is the same chain there (sync), and
whether one log extends another is a walk back from its head.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from commitfs.errors import (
    CommitfsError,
    CorruptObjectError,
    ObjectNotFoundError,
    RefConflictError,
    RevisionError,
    StorageError,
)
from commitfs.model.ids import HEX_SIZE, hash_bytes, is_hex
from commitfs.repo.refs import check_ref_name
from commitfs.storage.base import Store

ALIASES = "aliases/"
LOG_PREFIX = "aliaslog/"
LOG_VERSION = 1


def log_key(eid: bytes) -> str:
    h = eid.hex()
    return f"{LOG_PREFIX}{h[:2]}/{h}"


@dataclass(frozen=True)
class AliasState:
    """What an alias reference holds."""

    name: str
    commit: bytes
    log: bytes             # id of its newest log entry
    protected: bool = False
    removed: bool = False

    def encode(self) -> bytes:
        lines = [self.commit.hex(), f"log {self.log.hex()}"]
        if self.protected:
            lines.append("protected")
        if self.removed:
            lines.append("removed")
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def decode(cls, name: str, value: bytes) -> AliasState:
        try:
            lines = value.decode("ascii").split("\n")
            if lines[-1] != "":
                raise ValueError
            lines = lines[:-1]
            commit, log_line, flags = lines[0], lines[1], lines[2:]
            if not (len(commit) == HEX_SIZE and is_hex(commit) and commit == commit.lower()):
                raise ValueError
            tag, _, log = log_line.partition(" ")
            if tag != "log" or not (len(log) == HEX_SIZE and is_hex(log)):
                raise ValueError
            if any(f not in ("protected", "removed") for f in flags) or len(set(flags)) != len(flags):
                raise ValueError
        except (ValueError, IndexError, UnicodeDecodeError):
            raise CorruptObjectError(f"alias {name!r}: malformed reference value {value[:200]!r}") from None
        return cls(name, bytes.fromhex(commit), bytes.fromhex(log), "protected" in flags, "removed" in flags)


@dataclass(frozen=True)
class LogEntry:
    """One move of an alias.  ``action``: set (create or move), rm, protect, unprotect."""

    alias: str
    action: str
    old: bytes | None      # the commit before (None: the alias did not exist or was removed)
    new: bytes | None      # the commit after (None: removed)
    who: str
    when: str              # RFC 3339 UTC
    reason: str = ""
    forced: bool = False
    protected: bool = False  # the alias's protection after this entry
    previous: bytes | None = None

    def to_json(self) -> dict:
        return {"version": LOG_VERSION, "alias": self.alias, "action": self.action,
                "from": self.old.hex() if self.old else None, "to": self.new.hex() if self.new else None,
                "who": self.who, "when": self.when, "reason": self.reason, "forced": self.forced,
                "protected": self.protected, "previous": self.previous.hex() if self.previous else None}

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> LogEntry:
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("version") != LOG_VERSION:
                raise ValueError("unknown version")

            def oid(v):
                if v is None:
                    return None
                if not (isinstance(v, str) and len(v) == HEX_SIZE and is_hex(v)):
                    raise ValueError("bad id")
                return bytes.fromhex(v)

            e = cls(alias=str(d["alias"]), action=str(d["action"]), old=oid(d["from"]), new=oid(d["to"]),
                    who=str(d["who"]), when=str(d["when"]), reason=str(d["reason"]), forced=bool(d["forced"]),
                    protected=bool(d["protected"]), previous=oid(d["previous"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptObjectError(f"malformed alias log entry: {exc}") from None
        if e.encode() != bytes(data):
            raise CorruptObjectError("alias log entry is not in canonical form")
        return e


class Aliases:
    """Alias references and their log entries in one store."""

    def __init__(self, store: Store, before_publish=None):
        self.store = store
        #: Called with the commit id just before an alias is set to it
        #: (Repository.check_publishable: a concurrent gc is not removing it).
        self.before_publish = before_publish

    def lookup(self, name: str) -> AliasState | None:
        """The alias's state (also a removed one), or None if it never existed."""
        try:
            check_ref_name(name, "alias")
        except CommitfsError:
            return None
        value = self.lookup_raw(name)
        return AliasState.decode(name, value) if value is not None else None

    def lookup_raw(self, name: str) -> bytes | None:
        key = ALIASES + check_ref_name(name, "alias")
        try:
            return self.store.load_ref(key)
        except StorageError:
            # On a local store "team" is a directory when "team/prod" exists: no such alias.
            if any(True for _ in self.store.iter_refs(key + "/")):
                return None
            raise

    def resolve(self, name: str) -> bytes | None:
        """The commit a live alias names, or None."""
        state = self.lookup(name)
        return state.commit if state is not None and not state.removed else None

    def states(self) -> dict[str, AliasState]:
        """Every alias, removed ones included, by name."""
        out = {}
        for ref, value in self.store.iter_refs(ALIASES):
            name = ref[len(ALIASES):]
            out[name] = AliasState.decode(name, value)
        return out

    def live(self) -> dict[str, bytes]:
        """name -> commit of every alias not removed."""
        return {n: s.commit for n, s in self.states().items() if not s.removed}

    def swap(self, name: str, new: AliasState, expected: bytes | None) -> None:
        """Set the reference to ``new`` iff it holds exactly ``expected`` (raw bytes, None: absent)."""
        if self.before_publish is not None and new.commit is not None:
            self.before_publish(new.commit)
        try:
            self.store.save_ref_if_equals(ALIASES + name, new.encode(), expected)
        except RefConflictError:
            raise RefConflictError(f"alias {name!r} was moved by someone else meanwhile; nothing changed "
                                   "(look at `commitfs alias log " + name + "`, then try again)") from None

    # --- the log ---------------------------------------------------------------
    def has_entry(self, eid: bytes) -> bool:
        return self.store.lookup_size(log_key(eid)) is not None

    def save_entry(self, entry: LogEntry) -> bytes:
        data = entry.encode()
        eid = hash_bytes(data)
        self.store.save_object(log_key(eid), data)
        return eid

    def save_entry_bytes(self, eid: bytes, data: bytes) -> None:
        if hash_bytes(data) != eid:
            raise CorruptObjectError(f"alias log entry {eid.hex()[:12]} does not match its id")
        self.store.save_object(log_key(eid), data)

    def load_entry_bytes(self, eid: bytes) -> bytes:
        try:
            data = self.store.load_object(log_key(eid))
        except ObjectNotFoundError:
            raise CorruptObjectError(f"alias log entry {eid.hex()[:12]} is missing") from None
        if hash_bytes(data) != eid:
            raise CorruptObjectError(f"alias log entry {eid.hex()[:12]} does not match its id (corrupt)")
        return data

    def load_entry(self, eid: bytes) -> LogEntry:
        try:
            return LogEntry.decode(self.load_entry_bytes(eid))
        except CorruptObjectError as exc:
            raise CorruptObjectError(f"alias log entry {eid.hex()[:12]}: {exc}") from None

    def iter_log(self, head: bytes, limit: int | None = None) -> Iterator[tuple[bytes, LogEntry]]:
        """(id, entry) from ``head`` back to the first entry, newest first."""
        eid: bytes | None = head
        seen = set()
        while eid is not None and (limit is None or len(seen) < limit):
            if eid in seen:
                raise CorruptObjectError(f"alias log loops at entry {eid.hex()[:12]}")
            seen.add(eid)
            entry = self.load_entry(eid)
            yield eid, entry
            eid = entry.previous


def check_alias_name(name: str) -> str:
    try:
        return check_ref_name(name, "alias")
    except CommitfsError as exc:
        raise RevisionError(str(exc)) from None
