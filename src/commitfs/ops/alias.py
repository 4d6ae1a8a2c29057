"""Aliases: set, remove, list, show, and the audit log (the format is repo/aliases.py).

An alias names a commit, as a branch does, but it is not where commits are
made: it is moved by hand (``production`` to the model that passed review),
every move is logged (who, when, from, to, why, forced), and a protected
alias moves only with ``force`` (the log says so).  Every change writes one
log entry, then moves the reference by compare-and-swap from the value read
at the start: of two writers moving one alias at once exactly one wins, the
other gets RefConflictError and its entry is in no log.
"""

from __future__ import annotations

from dataclasses import dataclass

from commitfs.errors import InputError, RefConflictError, RevisionError
from commitfs.ops.lineage import utc_time
from commitfs.ops.snapshot import default_author
from commitfs.repo.aliases import AliasState, LogEntry, check_alias_name
from commitfs.repo.repository import Repository

_READ = object()  # `expected`: read the reference now


@dataclass
class AliasMove:
    """What ``set_alias`` / ``remove_alias`` did.  ``status``: created, moved,
    protected, unprotected, removed or up-to-date."""

    name: str
    status: str
    old: bytes | None
    new: bytes | None
    forced: bool = False
    entry: bytes | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "from": self.old.hex() if self.old else None,
                "to": self.new.hex() if self.new else None, "forced": self.forced,
                "entry": self.entry.hex() if self.entry else None}


def _now() -> str:
    import time

    return utc_time(time.time())


def _check_not_shadowed(repo: Repository, name: str) -> None:
    if repo.refs.lookup_branch(name) is not None:
        raise InputError(f"{name!r} is a branch: an alias cannot have a branch's name (revisions would be ambiguous)")
    if repo.refs.lookup_tag(name) is not None:
        raise InputError(f"{name!r} is a tag: an alias cannot have a tag's name (revisions would be ambiguous)")


def _current(repo: Repository, name: str, expected) -> tuple[AliasState | None, bytes | None]:
    raw = repo.aliases.lookup_raw(name) if expected is _READ else expected
    state = AliasState.decode(name, raw) if raw is not None else None
    return state, raw


def set_alias(repo: Repository, name: str, rev: str, *, reason: str = "", protect: bool | None = None,
              force: bool = False, who: str | None = None, expected=_READ) -> AliasMove:
    """Point alias ``name`` at ``rev`` (created if absent).  ``protect``: True
    protects it, False unprotects it (needs ``force``), None keeps it as it is.
    ``expected``: the raw reference value the move is from (default: read now)."""
    check_alias_name(name)
    _check_not_shadowed(repo, name)
    try:
        cid = repo.resolve(rev)
    except RevisionError as exc:
        raise RevisionError(f"cannot set alias {name!r}: {exc}") from None
    state, raw = _current(repo, name, expected)
    if state is None:
        repo.refs._check_nesting(name, repo.aliases.states(), "alias")
    live = state is not None and not state.removed
    was_protected = live and state.protected
    now_protected = was_protected if protect is None else protect
    moved = not live or state.commit != cid
    if was_protected and not force and (moved or not now_protected):
        what = f"moving it to {cid.hex()[:12]}" if moved else "unprotecting it"
        raise InputError(f"alias {name!r} is protected (it names {state.commit.hex()[:12]}): {what} needs --force, "
                         "and the log records it")
    if not moved and now_protected == was_protected:
        return AliasMove(name, "up-to-date", cid, cid)
    forced = bool(was_protected and force)
    if not live:
        status = "created"
    elif moved:
        status = "moved"
    else:
        status = "protected" if now_protected else "unprotected"
    action = "set" if moved else ("protect" if now_protected else "unprotect")
    entry = LogEntry(alias=name, action=action, old=state.commit if live else None, new=cid,
                     who=who or default_author(), when=_now(), reason=reason, forced=forced,
                     protected=now_protected, previous=state.log if state else None)
    eid = repo.aliases.save_entry(entry)  # first the entry, then the reference
    repo.aliases.swap(name, AliasState(name, cid, eid, now_protected, False), raw)
    return AliasMove(name, status, entry.old, cid, forced, eid)


def remove_alias(repo: Repository, name: str, *, reason: str = "", force: bool = False, who: str | None = None,
                 expected=_READ) -> AliasMove:
    """Remove alias ``name``: it no longer resolves; its log stays (and `alias log` shows it)."""
    check_alias_name(name)
    state, raw = _current(repo, name, expected)
    if state is None or state.removed:
        raise RevisionError(f"no alias {name!r}")
    if state.protected and not force:
        raise InputError(f"alias {name!r} is protected: removing it needs --force, and the log records it")
    entry = LogEntry(alias=name, action="rm", old=state.commit, new=None, who=who or default_author(), when=_now(),
                     reason=reason, forced=state.protected, protected=False, previous=state.log)
    eid = repo.aliases.save_entry(entry)
    # The reference stays (its first line still the last commit, which gc keeps):
    # it holds the log's head, so the audit trail survives the removal.
    repo.aliases.swap(name, AliasState(name, state.commit, eid, False, True), raw)
    return AliasMove(name, "removed", state.commit, None, entry.forced, eid)


@dataclass
class AliasInfo:
    name: str
    commit: bytes
    protected: bool
    removed: bool
    last: LogEntry | None = None
    error: str | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "id": self.commit.hex(), "protected": self.protected, "removed": self.removed}
        if self.last is not None:
            out.update(who=self.last.who, when=self.last.when, reason=self.last.reason)
        if self.error:
            out["error"] = self.error
        return out


def _info(repo: Repository, state: AliasState) -> AliasInfo:
    info = AliasInfo(state.name, state.commit, state.protected, state.removed)
    try:
        info.last = repo.aliases.load_entry(state.log)
    except Exception as exc:  # a missing or corrupt entry is reported, not fatal
        info.error = str(exc)
    return info


def list_aliases(repo: Repository, *, removed: bool = False) -> list[AliasInfo]:
    states = repo.aliases.states()
    return [_info(repo, s) for n, s in sorted(states.items()) if removed or not s.removed]


def show_alias(repo: Repository, name: str) -> AliasInfo:
    check_alias_name(name)
    state = repo.aliases.lookup(name)
    if state is None:
        raise RevisionError(f"no alias {name!r}")
    return _info(repo, state)


def alias_log(repo: Repository, name: str, limit: int | None = None) -> list[tuple[bytes, LogEntry]]:
    """The alias's log, newest first (also of a removed alias)."""
    check_alias_name(name)
    state = repo.aliases.lookup(name)
    if state is None:
        raise RevisionError(f"no alias {name!r}")
    return list(repo.aliases.iter_log(state.log, limit))


def entry_json(eid: bytes, e: LogEntry) -> dict:
    out = e.to_json()
    out.pop("version")
    return {"entry": eid.hex(), **out}


__all__ = ["AliasMove", "AliasInfo", "set_alias", "remove_alias", "list_aliases", "show_alias", "alias_log",
           "entry_json", "RefConflictError"]
