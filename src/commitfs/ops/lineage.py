"""Lineage: the commits a commit was made from, recorded in its metadata.

A commit's metadata is a str -> str map (docs/FORMAT.md).  Lineage lives in
keys under ``lineage.`` (docs/LINEAGE.md is normative):

    lineage.version          "1"
    lineage.input.<i>        "<repository URL>@<64 hex commit id>"   (i = 0, 1, ...)
    lineage.input.<i>.name   the input's name in ``commitfs run`` (optional)
    lineage.input.<i>.rev    the revision as the user wrote it (informational)
    lineage.run.command      the command, a JSON array of strings
    lineage.run.started      RFC 3339 UTC time the command started
    lineage.run.finished     RFC 3339 UTC time it ended
    lineage.run.exit_code    its exit status (decimal)
    lineage.code.git_commit  HEAD of the git work tree the command ran in
    lineage.code.git_dirty   "true" or "false" (tracked files modified)
    lineage.mlflow.run_id    $MLFLOW_RUN_ID when set
    lineage.wandb.run_id     $WANDB_RUN_ID when set

One key per input, rather than one JSON-valued key, so that ``commitfs log``
and ``show`` print readable lines and a hand-written input is one
``--meta``.  An input is always a full commit id, resolved when the commit
is made: a branch name is recorded only beside it, as ``.rev``, and never
resolved again.  The URL says where the commit was found; since a commit id
is a hash of the commit's content, any repository holding that id holds the
same commit, so readers fall back to other repositories they know when the
URL no longer opens.

Reading lineage never raises on bad metadata: ``parse_lineage`` returns the
problems it found beside what it could read, and the queries report them.
Downstream queries go through ops.lineage_index (a local, incrementally
updated index); upstream queries read the few commits they name directly.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, InputError, RevisionError
from commitfs.model.ids import HEX_SIZE
from commitfs.model.objects import Commit
from commitfs.ops.root import open_repository
from commitfs.repo.repository import Repository

PREFIX = "lineage."
VERSION = "1"
VERSION_KEY = "lineage.version"
INPUT_PREFIX = "lineage.input."

_INPUT_KEY = re.compile(r"lineage\.input\.(0|[1-9][0-9]{0,5})(?:\.(name|rev))?")
_INPUT_VALUE = re.compile(r"(.+)@([0-9a-f]{%d})" % HEX_SIZE)
# Input names become environment variable names: COMMITFS_INPUT_<NAME>.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


# --- inputs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """An input as written: ``[NAME=][URL@]REV`` (URL None: the current repository)."""

    rev: str
    url: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        text = f"{self.url}@{self.rev}" if self.url else self.rev
        return f"{self.name}={text}" if self.name else text


@dataclass(frozen=True)
class Input:
    """A resolved input: a repository URL and a full commit id."""

    url: str
    commit: bytes
    name: str | None = None
    rev: str | None = None

    @property
    def value(self) -> str:
        return f"{self.url}@{self.commit.hex()}"

    def to_json(self) -> dict:
        return {"name": self.name, "repo": self.url, "id": self.commit.hex(), "rev": self.rev}


def parse_input_spec(text: str, *, named: bool = False) -> InputSpec:
    """Parse ``[URL@]REV``, or ``NAME=[URL@]REV`` when ``named``.

    A revision never contains '@' (branch and tag names cannot), so the last
    '@' separates the URL; a local path may itself contain '@'."""
    name = None
    rest = text
    if named:
        name, sep, rest = text.partition("=")
        if not sep:
            raise InputError(f"--input expects NAME=[REPO_URL@]REV, got {text!r}")
        check_input_name(name)
    url, sep, rev = rest.rpartition("@")
    rev = rev.strip()
    if not rev:
        raise InputError(f"input {text!r} names no revision (expected [REPO_URL@]REV)")
    if sep and not url:
        raise InputError(f"input {text!r} has an empty repository URL before '@'")
    return InputSpec(rev=rev, url=url or None, name=name)


def check_input_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InputError(
            f"invalid input name {name!r}: use a letter then letters, digits or '_' (it becomes COMMITFS_INPUT_{name.upper()})"
        )
    return name


def check_unique_names(specs: Iterable[InputSpec]) -> None:
    """Names must give distinct environment variables (case-insensitively, and
    NAME_COMMIT / NAME_REPO must not be another input's variable)."""
    seen: dict[str, str] = {}
    for s in specs:
        if s.name is None:
            continue
        up = s.name.upper()
        if up in seen:
            raise InputError(f"input name {s.name!r} is given twice (names are case-insensitive)")
        seen[up] = s.name
    for up, name in seen.items():
        for suffix in ("_COMMIT", "_REPO"):
            if up.endswith(suffix) and up[: -len(suffix)] in seen:
                raise InputError(f"input name {name!r} clashes with COMMITFS_INPUT_{up} of input "
                                 f"{seen[up[: -len(suffix)]]!r}")


class RepositoryOpener:
    """Opens repositories by URL once each; remembers failures."""

    def __init__(self, store_options: Mapping | None = None, known: Iterable[Repository] = ()):
        self.store_options = dict(store_options or {})
        self._repos: dict[str, Repository] = {}
        self._errors: dict[str, CommitfsError] = {}
        self._owned: list[Repository] = []
        for repo in known:
            self.add(repo)

    def add(self, repo: Repository) -> None:
        self._repos.setdefault(repo.url, repo)

    @property
    def repositories(self) -> list[Repository]:
        return list(self._repos.values())

    def open(self, url: str) -> Repository:
        repo = self._repos.get(url)
        if repo is not None:
            return repo
        err = self._errors.get(url)
        if err is not None:
            raise err
        try:
            repo = open_repository(url, cache_dir=False, endpoint_url=self.store_options.get("endpoint_url"))
        except CommitfsError as exc:
            self._errors[url] = exc
            raise
        # The same repository under another spelling (relative path, file://).
        existing = self._repos.get(repo.url)
        if existing is not None:
            repo.close()
            repo = existing
        else:
            self._owned.append(repo)
            self._repos[repo.url] = repo
        self._repos[url] = repo
        return repo

    def close(self) -> None:
        for repo in self._owned:
            repo.close()
        self._owned.clear()

    def __enter__(self) -> RepositoryOpener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_inputs(specs: Iterable[InputSpec], default: Repository | None, opener: RepositoryOpener) -> list[Input]:
    """Resolve each spec to (repository URL, full commit id), now."""
    out = []
    for spec in specs:
        try:
            if spec.url is None:
                if default is None:
                    raise InputError("no repository given for it: write REPO_URL@REV or use -r/--repo")
                repo = default
            else:
                repo = opener.open(spec.url)
            cid = repo.resolve(spec.rev)
        except CommitfsError as exc:
            raise InputError(f"input {spec}: {exc}") from None
        out.append(Input(url=repo.url, commit=cid, name=spec.name, rev=spec.rev))
    return out


# --- writing metadata ------------------------------------------------------------------
def input_metadata(inputs: Iterable[Input]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for i, inp in enumerate(inputs):
        meta[f"{INPUT_PREFIX}{i}"] = inp.value
        if inp.name:
            meta[f"{INPUT_PREFIX}{i}.name"] = inp.name
        if inp.rev and inp.rev != inp.commit.hex():
            meta[f"{INPUT_PREFIX}{i}.rev"] = inp.rev
    if meta:
        meta[VERSION_KEY] = VERSION
    return meta


def merge_metadata(user: Mapping[str, str] | None, lineage: Mapping[str, str]) -> dict[str, str]:
    """User metadata plus lineage keys; refuses user keys that would be mixed with them."""
    merged = dict(user or {})
    if lineage:
        clash = sorted(k for k in merged if k.startswith(PREFIX))
        if clash:
            raise InputError(f"metadata key {clash[0]!r} is reserved for lineage (it is written from --input)")
        merged.update(lineage)
    return merged


def utc_time(ts: float) -> str:
    """RFC 3339 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_state(cwd: str) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the git work tree containing ``cwd``, or (None, None).

    Dirty means tracked files differ from HEAD; untracked files (outputs
    written inside the work tree, say) do not count."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=60)
        if head.returncode != 0 or not head.stdout.strip():
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip(), dirty


def run_metadata(
    command: list[str],
    started: float,
    finished: float,
    exit_code: int,
    *,
    git_commit: str | None = None,
    git_dirty: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = os.environ if environ is None else environ
    meta = {
        VERSION_KEY: VERSION,
        "lineage.run.command": json.dumps(list(command), ensure_ascii=False),
        "lineage.run.started": utc_time(started),
        "lineage.run.finished": utc_time(finished),
        "lineage.run.exit_code": str(exit_code),
    }
    if git_commit:
        meta["lineage.code.git_commit"] = git_commit
        if git_dirty is not None:
            meta["lineage.code.git_dirty"] = "true" if git_dirty else "false"
    for var, key in (("MLFLOW_RUN_ID", "lineage.mlflow.run_id"), ("WANDB_RUN_ID", "lineage.wandb.run_id")):
        if env.get(var):
            meta[key] = env[var]
    return meta


# --- reading metadata ------------------------------------------------------------------
@dataclass
class RunInfo:
    command: list[str] | None = None
    started: str | None = None
    finished: str | None = None
    exit_code: int | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    mlflow_run_id: str | None = None
    wandb_run_id: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __bool__(self) -> bool:
        return bool(self.to_json())


@dataclass
class Lineage:
    inputs: list[Input] = field(default_factory=list)
    run: RunInfo = field(default_factory=RunInfo)
    problems: list[str] = field(default_factory=list)


def parse_lineage(metadata: Mapping[str, str]) -> Lineage:
    """Read the lineage keys of a commit's metadata; never raises on bad values."""
    out = Lineage()
    version = metadata.get(VERSION_KEY)
    if version is not None and version != VERSION:
        out.problems.append(f"{VERSION_KEY} is {version!r}; this commitfs reads lineage version {VERSION}")
    slots: dict[int, dict[str, str]] = {}
    for key, value in metadata.items():
        if not key.startswith(INPUT_PREFIX):
            continue
        m = _INPUT_KEY.fullmatch(key)
        if not m:
            out.problems.append(f"{key}: not a lineage input key (expected lineage.input.<number>[.name|.rev])")
            continue
        slots.setdefault(int(m.group(1)), {})[m.group(2) or ""] = value
    for i in sorted(slots):
        slot = slots[i]
        value = slot.get("")
        if value is None:
            out.problems.append(f"{INPUT_PREFIX}{i}.{next(iter(slot))} has no {INPUT_PREFIX}{i}")
            continue
        m = _INPUT_VALUE.fullmatch(value) if isinstance(value, str) else None
        if not m:
            out.problems.append(f"{INPUT_PREFIX}{i} is malformed: {value!r} (expected REPO_URL@<64 hex commit id>)")
            continue
        out.inputs.append(Input(url=m.group(1), commit=bytes.fromhex(m.group(2)),
                                name=slot.get("name"), rev=slot.get("rev")))
    r = out.run
    command = metadata.get("lineage.run.command")
    if command is not None:
        try:
            parsed = json.loads(command)
            if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
                raise ValueError
            r.command = parsed
        except ValueError:
            out.problems.append(f"lineage.run.command is not a JSON array of strings: {command!r}")
    r.started = metadata.get("lineage.run.started")
    r.finished = metadata.get("lineage.run.finished")
    code = metadata.get("lineage.run.exit_code")
    if code is not None:
        try:
            r.exit_code = int(code)
        except ValueError:
            out.problems.append(f"lineage.run.exit_code is not an integer: {code!r}")
    r.git_commit = metadata.get("lineage.code.git_commit")
    dirty = metadata.get("lineage.code.git_dirty")
    if dirty is not None:
        if dirty in ("true", "false"):
            r.git_dirty = dirty == "true"
        else:
            out.problems.append(f"lineage.code.git_dirty is neither 'true' nor 'false': {dirty!r}")
    r.mlflow_run_id = metadata.get("lineage.mlflow.run_id")
    r.wandb_run_id = metadata.get("lineage.wandb.run_id")
    return out


def summary(message: str) -> str:
    return message.splitlines()[0] if message else ""


# --- queries ---------------------------------------------------------------------------
@dataclass
class UpstreamNode:
    """An input of a commit, with its own inputs (recursively)."""

    input: Input
    repo: str | None = None  # where it was found (may differ from input.url)
    time: int | None = None
    summary: str | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    inputs: list[UpstreamNode] = field(default_factory=list)
    run: RunInfo = field(default_factory=RunInfo)

    def to_json(self) -> dict:
        out = {"name": self.input.name, "rev": self.input.rev, "repo": self.input.url, "id": self.input.commit.hex(),
               "found_in": self.repo, "time": self.time, "summary": self.summary, "error": self.error,
               "problems": self.problems, "inputs": [n.to_json() for n in self.inputs]}
        if self.run:
            out["run"] = self.run.to_json()
        return out


@dataclass
class DownstreamNode:
    """A commit naming the parent node as an input, with its own downstream."""

    repo: str
    commit: bytes
    name: str | None
    time: int | None
    summary: str | None
    downstream: list[DownstreamNode] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "repo": self.repo, "id": self.commit.hex(), "time": self.time,
                "summary": self.summary, "downstream": [n.to_json() for n in self.downstream]}


def find_commit(opener: RepositoryOpener, url: str, cid: bytes) -> tuple[Repository, Commit]:
    """The commit from ``url``, else from any repository already open that has it."""
    errors = []
    try:
        repo = opener.open(url)
        if repo.has_commit(cid):
            return repo, repo.load_commit(cid)
        errors.append(f"commit {cid.hex()[:12]} is not in {repo.url}")
    except CommitfsError as exc:
        errors.append(str(exc))
    for repo in opener.repositories:
        if repo.url != url:
            try:
                if repo.has_commit(cid):
                    return repo, repo.load_commit(cid)
            except CommitfsError:
                continue
    raise RevisionError("; ".join(errors))


def upstream(opener: RepositoryOpener, commit: Commit, depth: int | None = None,
             _seen: set[bytes] | None = None) -> list[UpstreamNode]:
    """The inputs of ``commit``, each with its inputs, down to ``depth`` levels."""
    seen = set() if _seen is None else _seen
    nodes = []
    for inp in parse_lineage(commit.metadata).inputs:
        node = UpstreamNode(inp)
        nodes.append(node)
        try:
            repo, c = find_commit(opener, inp.url, inp.commit)
        except CommitfsError as exc:
            node.error = str(exc)
            continue
        node.repo, node.time, node.summary = repo.url, c.time, summary(c.message)
        parsed = parse_lineage(c.metadata)
        node.problems, node.run = parsed.problems, parsed.run
        if inp.commit in seen or (depth is not None and depth <= 1):
            continue
        node.inputs = upstream(opener, c, None if depth is None else depth - 1, seen | {inp.commit})
    return nodes


# --- the environment of ``commitfs run`` ---------------------------------------------
ENV_PREFIX = "COMMITFS_INPUT_"
ENV_NAMES = "COMMITFS_INPUTS"
ENV_OUTPUT = "COMMITFS_OUTPUT"


def run_environment(inputs: list[Input], paths: Mapping[str, str], output: str) -> dict[str, str]:
    """The variables ``commitfs run`` gives the command (see docs/LINEAGE.md)."""
    env = {ENV_NAMES: ",".join(i.name for i in inputs if i.name), ENV_OUTPUT: output}
    for inp in inputs:
        var = ENV_PREFIX + inp.name.upper()
        env[var] = paths[inp.name]
        env[var + "_COMMIT"] = inp.commit.hex()
        env[var + "_REPO"] = inp.url
        if inp.rev:
            env[var + "_REV"] = inp.rev
    return env

