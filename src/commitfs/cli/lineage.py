"""Lineage verbs: run (a command on mounted inputs, committing its output), lineage.

The work of ``run`` (resolving inputs, mounts, the child, signals, the
commit) is ops/run.py; this module parses and prints.
"""

from __future__ import annotations

import shlex
import signal
import sys

from commitfs.cli.core import repo_url, store_options
from commitfs.cli.output import ProgressBar, print_json, warn
from commitfs.errors import InputError, UsageError
from commitfs.fuse.runmounts import Mounts
from commitfs.ops import lineage
from commitfs.ops import run as run_op
from commitfs.ops import readset
from commitfs.ops.lineage_index import LineageReport, query_lineage, trained_on


def cmd_run(args) -> int:
    spec = run_op.RunSpec(command=list(args.command), output=args.output, to=args.to, inputs=args.input or [],
                          repo=args.repo or None, message=args.message, commit_on_failure=args.commit_on_failure,
                          record_reads=args.record_reads, env_names=args.env or [], use_cache=not args.no_cache,
                          cache_from=args.cache_from or [], log_to=args.log_to or [])
    bar = ProgressBar("commit")
    try:
        result = run_op.run(spec, lambda: Mounts(args.endpoint_url), store_options=store_options(args),
                            progress=lambda p: bar.update(p.bytes_done, p.bytes_total, p.files_done, p.files_total),
                            warn=warn)
    finally:
        bar.close()
    if result.status == "interrupted":
        print(f"commitfs: run interrupted ({signal.Signals(result.signal).name}); nothing committed", file=sys.stderr)
        return result.exit_code
    if result.status == "cached":
        how = "the same read files" if result.cached_by == "readset" else "the same inputs"
        print(f"commitfs: run cache hit: {result.commit_id.hex()[:12]} in {result.cached_repo} ran this command "
              f"with {how}, code and --env values; not run again (--no-cache runs it)", file=sys.stderr)
    elif result.status == "failed":
        print(f"commitfs: command exited with {result.exit_code}; nothing committed", file=sys.stderr)
        return result.exit_code
    if args.json:
        out = result.to_json()
        keys = ["id", "repo", "branch", "exit_code", "inputs", "files", "bytes_stored"]
        keys += ["cache", "cached_by", "cached_repo"] + (["logged_to"] if args.log_to else [])
        print_json({k: out[k] for k in keys + (["readset", "files_read"] if args.record_reads else [])})
    else:
        print(result.commit_id.hex())
    return result.exit_code


# --- the query ---------------------------------------------------------------------
def cmd_lineage(args) -> int:
    if args.trained_on:
        if args.rev or args.files:
            raise UsageError("--trained-on takes no REV and no --files")
        return _cmd_trained_on(args)
    if not args.rev:
        raise UsageError("lineage needs a REV (or --trained-on REV:PATH)")
    if args.files:
        return _cmd_files(args)
    spec = lineage.parse_input_spec(args.rev)
    with lineage.RepositoryOpener(store_options(args)) as opener:
        if spec.url is None:
            repo = opener.open(repo_url(args))
        else:
            repo = opener.open(spec.url)
        cid = repo.resolve(spec.rev)
        search = [opener.open(u) for u in args.search] if args.search else [repo]
        if args.depth is not None and args.depth < 1:
            raise InputError("--depth must be at least 1")
        report = query_lineage(repo, cid, opener, search, depth=args.depth,
                               up=not args.downstream, down=not args.upstream)
    if args.json:
        print_json(report.to_json())
    else:
        print_report(report, up=not args.downstream, down=not args.upstream)
    return 0


def _cmd_files(args) -> int:
    spec = lineage.parse_input_spec(args.rev)
    with lineage.RepositoryOpener(store_options(args)) as opener:
        repo = opener.open(spec.url if spec.url else repo_url(args))
        cid = repo.resolve(spec.rev)
        files = readset.commit_files(repo, cid)
        if args.json:
            print_json(files.to_json())
            return 0
        inputs = {i.name: i for i in files.inputs}
        for e in files.entries:
            inp = inputs.get(e.input)
            where = f"{inp.url}@{inp.commit.hex()[:12]}" if inp else "?"
            print(f"{e.input}\t{where}\t{e.file_id.hex()}\t{e.path}")
    return 0


def _cmd_trained_on(args) -> int:
    from commitfs.ops.browse import split_rev_path

    rev, path = split_rev_path(args.trained_on)
    if not path:
        raise UsageError("--trained-on expects [REPO_URL@]REV:PATH (a file)")
    spec = lineage.parse_input_spec(rev)
    with lineage.RepositoryOpener(store_options(args)) as opener:
        repo = opener.open(spec.url if spec.url else repo_url(args))
        cid = repo.resolve(spec.rev)
        if args.search:
            search = [opener.open(u) for u in args.search]
        else:  # default: the -r repository (where the models are), else the dataset's
            search = [opener.open(repo_url(args))] if args.repo else [repo]
        report = trained_on(repo, cid, path, search)
    if args.json:
        print_json(report.to_json())
    else:
        print(f"file {report.path} ({report.file_id.hex()[:12]}) of {report.dataset_repo}@"
              f"{report.dataset_commit.hex()[:12]} was read by:" + ("" if report.readers else " (no recorded run)"))
        for r in report.readers:
            via = f"{r.input_name} {r.input_repo}@{r.input_commit.hex()[:12]}" if r.input_commit else "?"
            print(f"  {r.repo}@{r.commit.hex()[:12]}  as {via}:{r.path}" + (f"  {r.summary}" if r.summary else ""))
    for p in report.problems:
        warn(p)
    return 0


def _short(cid_hex: str) -> str:
    return cid_hex[:12]


def print_report(r: LineageReport, *, up: bool = True, down: bool = True) -> None:
    print(f"commit {r.commit.hex()}  {r.repo}")
    if r.summary:
        print(f"    {r.summary}")
    run = r.run
    if run.command is not None:
        status = f"exit {run.exit_code}" if run.exit_code is not None else ""
        when = f"{run.started} .. {run.finished}" if run.started else ""
        print(f"run:    {shlex.join(run.command)}" + (f"  ({', '.join(x for x in (status, when) if x)})"
                                                       if status or when else ""))
    if run.git_commit:
        print(f"code:   git {run.git_commit}" + (" (dirty work tree)" if run.git_dirty else ""))
    if run.mlflow_run_id:
        print(f"mlflow: {run.mlflow_run_id}")
    if run.wandb_run_id:
        print(f"wandb:  {run.wandb_run_id}")
    if up:
        print("upstream:" + ("" if r.upstream else " (none)"))
        _print_up(r.upstream, 1)
    if down:
        print(f"downstream (in {', '.join(r.searched)}):" + ("" if r.downstream else " (none)"))
        _print_down(r.downstream, 1)
    for p in r.problems:
        warn(p)


def _print_up(nodes, level: int) -> None:
    for n in nodes:
        pad = "  " * level
        name = f"{n.input.name} " if n.input.name else ""
        rev = f" ({n.input.rev})" if n.input.rev else ""
        text = f"  {n.summary}" if n.summary else ""
        print(f"{pad}{name}{n.input.url}@{_short(n.input.commit.hex())}{rev}{text}")
        if n.repo and n.repo != n.input.url:
            print(f"{pad}  found in {n.repo}")
        if n.error:
            print(f"{pad}  error: {n.error}")
        for p in n.problems:
            print(f"{pad}  problem: {p}")
        _print_up(n.inputs, level + 1)


def _print_down(nodes, level: int) -> None:
    for n in nodes:
        pad = "  " * level
        name = f" (as {n.name})" if n.name else ""
        text = f"  {n.summary}" if n.summary else ""
        print(f"{pad}{n.repo}@{_short(n.commit.hex())}{name}{text}")
        _print_down(n.downstream, level + 1)


def register(sub, common) -> None:
    p = sub.add_parser(
        "run", parents=[common], help="run a command on mounted inputs and commit its output with lineage",
        description="Mount each input read-only at its commit, run COMMAND, and if it succeeds commit DIR "
                    "to BRANCH with the inputs, command, code version and times as lineage.",
        usage="commitfs run [--input NAME=[REPO_URL@]REV]... --output DIR --to [REPO_URL@]BRANCH [-m MSG] "
              "[--commit-on-failure] [--json] -- COMMAND...")
    p.set_defaults(handler=cmd_run)
    p.add_argument("--input", action="append", metavar="NAME=[REPO_URL@]REV",
                   help="an input, mounted at $COMMITFS_INPUT_<NAME> (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR", help="the directory to commit after the command")
    p.add_argument("--to", required=True, metavar="[REPO_URL@]BRANCH", help="where to commit DIR")
    p.add_argument("-m", "--message", help="commit message (default: the command line)")
    p.add_argument("--commit-on-failure", action="store_true",
                   help="commit DIR even if the command fails (its exit code is recorded)")
    p.add_argument("--record-reads", action="store_true",
                   help="record which files of the inputs the command read (first read of each file) and "
                        "store the set with the output commit (commitfs lineage REV --files)")
    p.add_argument("--env", action="append", metavar="NAME",
                   help="an environment variable whose value is part of the run's cache key (repeatable)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the command even if an earlier run had the same key")
    p.add_argument("--cache-from", action="append", metavar="URL",
                   help="also look for earlier runs in the branches of this repository (repeatable)")
    p.add_argument("--log-to", action="append", choices=["mlflow", "wandb"],
                   help="log the input and output commit ids to this tracker's run ($MLFLOW_RUN_ID / "
                        "$WANDB_RUN_ID, else a new one) if its library is installed (repeatable)")
    p.add_argument("--json", action="store_true")
    p.add_argument("command", nargs="...", metavar="-- COMMAND")

    p = sub.add_parser("lineage", parents=[common], help="show the inputs and the users of a commit",
                       description="Upstream: the commit's inputs, recursively, across repositories. "
                                   "Downstream: commits naming it as an input in the searched repositories.")
    p.set_defaults(handler=cmd_lineage)
    p.add_argument("rev", nargs="?", metavar="[REPO_URL@]REV")
    p.add_argument("--files", action="store_true",
                   help="the files of its inputs REV's run read (run --record-reads)")
    p.add_argument("--trained-on", metavar="[REPO_URL@]REV:PATH",
                   help="the commits (in the --search repositories) whose run read this file")
    p.add_argument("--search", action="append", metavar="URL",
                   help="a repository to search for downstream commits (repeatable; default: the current one)")
    p.add_argument("--depth", type=int, metavar="N", help="follow at most N levels each way (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--upstream", action="store_true", help="only the upstream")
    g.add_argument("--downstream", action="store_true", help="only the downstream")
    p.add_argument("--json", action="store_true")
