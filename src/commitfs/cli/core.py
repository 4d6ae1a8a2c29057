"""Repository verbs: init, commit, log, show, ls, cat, branch, tag, checkout, fsck (diff: cli/inspect.py)."""

from __future__ import annotations

import datetime as dt
import sys

from commitfs.cli.output import ProgressBar, count_of, human_size, print_json, warn
from commitfs.cli.repo import open_repo, open_url, repo_url, store_options  # noqa: F401 (verbs import them from here)
from commitfs.errors import CommitfsError, InputError, NothingToCommitError, RevisionError, UsageError

# The operations are imported by the handlers that use them, not here: the
# parser is built from this module for every one of its verbs, and a
# `commitfs commit` should not pay for fsck's, diff's and checkout's imports
# (tests/test_cli.py, test_a_verb_imports_only_what_it_needs).


def parse_meta(items: list[str] | None) -> dict[str, str]:
    from commitfs.ops.snapshot import check_commit_text

    meta = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--meta expects KEY=VALUE, got {item!r}")
        meta[key] = value
    check_commit_text("", meta)
    return meta


def _time(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


# --- verbs ------------------------------------------------------------------------
def cmd_init(args) -> int:
    from commitfs.ops.root import init_repository

    repo = init_repository(repo_url(args), endpoint_url=getattr(args, "endpoint_url", None))
    print(f"initialized commitfs repository at {repo.url}")
    return 0


def cmd_commit(args) -> int:
    from commitfs.cli.workspace import commit_workspace
    from commitfs.ops.snapshot import bound_allocator, check_commit_text, commit_directory

    check_commit_text(args.message)
    if (code := commit_workspace(args, parse_meta(args.meta))) is not None:
        return code  # DIR is a writable workspace mount: its daemon commits the overlay
    bound_allocator()  # (this process's memory: docs/CLI.md, commit)
    repo = open_repo(args)
    metadata = parse_meta(args.meta)
    if args.input:
        from commitfs.ops import lineage

        with lineage.RepositoryOpener(store_options(args), [repo]) as opener:
            inputs = lineage.resolve_inputs([lineage.parse_input_spec(s) for s in args.input], repo, opener)
        metadata = lineage.merge_metadata(metadata, lineage.input_metadata(inputs))
    bar = ProgressBar("commit")
    try:
        result = commit_directory(
            repo, args.dir, branch=args.branch or "main", message=args.message, metadata=metadata,
            author=args.author,
            progress=lambda p: bar.update(p.bytes_done, p.bytes_total, p.files_done, p.files_total),
        )
    except NothingToCommitError as exc:
        bar.close()
        for w in exc.warnings:
            warn(w)
        if args.json:
            print_json({"id": exc.commit_id.hex(), "created": False, "warnings": exc.warnings})
        else:
            print(str(exc), file=sys.stderr)
            print(exc.commit_id.hex())
        return 0
    finally:
        bar.close()
    for w in result.warnings:
        warn(w)
    if args.json:
        print_json({
            "id": result.commit_id.hex(), "created": True, "tree": result.tree_id.hex(),
            "files": result.files, "files_read": result.files_read, "bytes_read": result.bytes_read,
            "bytes_stored": result.write.bytes_stored, "blobs_new": result.write.blobs_new,
            "tree_deltas": result.write.tree_deltas, "warnings": result.warnings,
        })
    else:
        print(result.commit_id.hex())
    return 0


def cmd_log(args) -> int:
    from commitfs.ops import history

    repo = open_repo(args)
    if args.rev is None and not args.all and not repo.refs.branches():
        # A fresh repository: an empty history, not an unknown revision.
        print("commitfs: no commits yet (commit a directory: commitfs commit DIR -m MESSAGE)", file=sys.stderr)
        if args.json:
            print_json([])
        return 0
    # A..B and --all walk every parent, newest first; REV alone its first parents.
    span = history.parse_range(repo, args.rev) if args.rev else None
    if args.all:
        if args.rev:
            raise UsageError("log --all takes no REV")
        span = (history.all_heads(repo), [])
    if args.graph:
        if args.json or args.stat or args.paths:
            raise UsageError("log --graph takes no --json, --stat or -- PATH")
        include, exclude = span if span is not None else ([repo.resolve(args.rev or "main")], [])
        for prefix, item in history.graph(history.topo_walk(repo, include, exclude), args.limit):
            if item is None:
                print(prefix)
            else:
                cid, c = item
                print(f"{prefix} {cid.hex()[:12]} {c.message.splitlines()[0] if c.message else ''}".rstrip())
        return 0
    if span is not None:
        start = None
        items = history.walk(repo, span[0], span[1], args.limit)
    else:
        start = repo.resolve(args.rev or "main")
        items = None
    if args.stat or args.paths:
        from commitfs.cli.inspect import print_log

        return print_log(args, repo, start, _print_commit, items)
    if items is None:
        items = history.log(repo, start, args.limit)
    if args.json:
        print_json([history.commit_json(cid, c) for cid, c in items])
        return 0
    for cid, c in items:
        if args.oneline:
            print(f"{cid.hex()[:12]} {c.message.splitlines()[0] if c.message else ''}")
            continue
        _print_commit(cid, c)
        print()
    return 0


def cmd_show(args) -> int:
    from commitfs.cli.inspect import show_changes_for
    from commitfs.ops import history

    repo = open_repo(args)
    cid = repo.resolve(args.rev)
    c = repo.load_commit(cid)
    tree = repo.load_tree(c.tree)
    if args.json:
        out = history.commit_json(cid, c)
        out["size"] = tree.size
        out["changes"] = show_changes_for(repo, cid, c, (), True)
        print_json(out)
        return 0
    _print_commit(cid, c, ids=[f"tree   {c.tree.hex()}"] + [f"parent {p.hex()}" for p in c.parents],
                  fields=[f"Size:   {human_size(tree.size)}"])
    print()
    show_changes_for(repo, cid, c, (), False)  # as `diff --stat REV` lists them
    return 0


def _print_commit(cid: bytes, c, ids: list[str] = (), fields: list[str] = ()) -> None:
    """A commit as log and show print it: id lines, header fields, message."""
    print(f"commit {cid.hex()}")
    if len(c.parents) > 1:  # a merge: its parents, the branch merged into first
        print("Merge:  " + " ".join(p.hex()[:12] for p in c.parents))
    for line in ids:
        print(line)
    print(f"Author: {c.author}")
    print(f"Date:   {_time(c.time)}")
    for line in fields:
        print(line)
    for k, v in sorted(c.metadata.items()):
        print(f"Meta:   {k}={v}")
    print()
    for line in c.message.splitlines() or [""]:
        print(f"    {line}")


def _entry_json(path: str, e) -> dict:
    from commitfs.model.objects import Kind

    out = {"path": path, "name": e.name, "kind": "file" if e.kind.is_file else e.kind.name.lower(),
           "executable": e.executable, "size": e.size, "id": e.id.hex()}
    if e.kind is Kind.SYMLINK:
        out["target"] = e.target.decode("utf-8", "backslashreplace")  # JSON output stays valid UTF-8
    return out


def _entry_line(path: str, e) -> str:
    from commitfs.model.objects import Kind

    mode = {Kind.DIR: "drwxr-xr-x", Kind.EXEC: "-rwxr-xr-x", Kind.FILE: "-rw-r--r--",
            Kind.SYMLINK: "lrwxrwxrwx"}[e.kind]
    suffix = "/" if e.is_dir else ""
    if e.kind is Kind.SYMLINK:
        suffix = " -> " + e.target.decode("utf-8", "backslashreplace")
    return f"{mode} {e.size:>12} {e.id.hex()[:12]} {path}{suffix}"


def cmd_ls(args) -> int:
    from commitfs.ops import browse

    repo = open_repo(args)
    rev, path = browse.split_rev_path(args.spec)
    cid = repo.resolve(rev)
    items = browse.walk(repo, cid, path) if args.recursive else browse.list_dir(repo, cid, path)
    if args.json:
        print_json([_entry_json(i.path, i.entry) for i in items])
    else:
        for i in items:
            print(_entry_line(i.path, i.entry))
    return 0


def cmd_cat(args) -> int:
    from commitfs.ops import browse

    repo = open_repo(args)
    rev, path = browse.split_rev_path(args.spec)
    if not path:
        raise UsageError("cat needs REV:PATH (a file inside a revision, e.g. main:data/labels.csv)")
    f = browse.open_file(repo, repo.resolve(rev), path)
    out = sys.stdout.buffer
    for chunk in f._reader.iter_chunks():
        out.write(chunk)
    out.flush()
    return 0


def cmd_branch(args) -> int:
    from commitfs.ops import refnames

    repo = open_repo(args)
    if args.move:
        if args.delete or args.name is None or args.rev_given is None:
            raise UsageError("branch -m needs OLD and NEW (commitfs branch -m OLD NEW)")
        cid = refnames.rename_branch(repo, args.name, args.rev_given)
        print(f"renamed branch {args.name} to {args.rev_given} (at {cid.hex()[:12]})")
        return 0
    if args.delete:
        if repo.refs.remove_damaged_branch(args.delete):
            print(f"deleted damaged branch {args.delete}")
            return 0
        current = repo.refs.lookup_branch(args.delete)
        if current is None:
            raise RevisionError(f"no branch {args.delete!r}")
        repo.refs.set_branch_if_equals(args.delete, None, current)
        print(f"deleted branch {args.delete} (was {current.hex()[:12]})")
        return 0
    if args.name:
        cid = repo.resolve(args.rev_given or "main")
        repo.refs.set_branch_if_equals(args.name, cid, None)
        print(f"created branch {args.name} at {cid.hex()[:12]}")
        return 0
    branches = repo.refs.branches()
    if args.json:
        print_json({n: c.hex() for n, c in sorted(branches.items())})
    else:
        for n, c in sorted(branches.items()):
            print(f"{n} {c.hex()}")
    return 0


def cmd_tag(args) -> int:
    from commitfs.ops import refnames

    repo = open_repo(args)
    if args.delete:
        if args.name is not None:
            raise UsageError("tag -d takes one NAME (commitfs tag -d NAME)")
        cid = refnames.delete_tag(repo, args.delete)
        print(f"deleted tag {args.delete} (was {cid.hex()[:12]})")
        return 0
    if args.name is None:
        tags = repo.refs.tags()
        if args.json:
            print_json({n: c.hex() for n, c in sorted(tags.items())})
        else:
            for n, c in sorted(tags.items()):
                print(f"{n} {c.hex()}")
        return 0
    if args.rev is None:
        raise UsageError("tag needs NAME and REV (commitfs tag NAME REV)")
    cid = repo.resolve(args.rev)
    repo.refs.create_tag(args.name, cid)
    print(f"tagged {cid.hex()[:12]} as {args.name}")
    return 0


def cmd_checkout(args) -> int:
    from commitfs.ops import browse
    from commitfs.ops.checkout import checkout

    repo = open_repo(args)
    rev, path = browse.split_rev_path(args.spec)
    cid = repo.resolve(rev)
    bar = ProgressBar("checkout")
    try:
        n = checkout(repo, cid, args.dest, path, progress=lambda d, t: bar.update(d, t))
    finally:
        bar.close()
    print(f"checked out {n} files of {cid.hex()[:12]} into {args.dest}", file=sys.stderr)
    return 0


def cmd_fsck(args) -> int:
    from commitfs.ops.fsck import fsck

    repo = open_repo(args)
    report = fsck(repo, read_data=args.read_data, repair=args.repair)
    if args.json:
        print_json(report.to_json())
    else:
        for p in report.repaired:
            print(f"repaired: {p}")
        for p in report.problems:
            print(p)
        unref = report.unreferenced
        print(f"checked {report.commits} commits, {report.trees} trees, {report.files} files, "
              f"{report.chunks} chunks in {report.packs} packs"
              + (f", re-hashed {human_size(report.bytes_checked)}" if args.read_data else "")
              + (f"; unreferenced (left for gc): {unref['commits']} commits, {unref['blobs']} blobs, "
                 f"{unref['packs']} packs" if any(unref.values()) else "")
              + (": no problems" if report.ok else f": {len(report.problems)} problems"))
    return 0 if report.ok else 1


def register(sub, common) -> None:
    from commitfs.cli.inspect import add_log_options

    def add(name, handler, help_, **kw):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_, **kw)
        p.set_defaults(handler=handler)
        return p

    add("init", cmd_init, "create a repository")

    p = add("commit", cmd_commit, "commit a directory to a branch, print the commit id")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-b", "--branch", help="the branch to commit to (default: main; for a workspace "
                   "mount, its own branch, the only one allowed)")
    p.add_argument("-m", "--message", required=True)
    p.add_argument("--author", metavar="NAME", help="the commit's author (default: $COMMITFS_AUTHOR, then "
                   "the configuration files' author, then user@host)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata (repeatable)")
    p.add_argument("--input", action="append", metavar="[REPO_URL@]REV",
                   help="record a lineage input, resolved to its commit id now (repeatable; see docs/LINEAGE.md)")
    p.add_argument("--json", action="store_true")

    p = add("log", cmd_log, "show the history of a revision")
    p.add_argument("rev", nargs="?", metavar="REV",
                   help="where history starts (default: main), following first parents; or A..B: the "
                        "commits B reaches and A does not, through every parent, newest first")
    p.add_argument("--all", action="store_true", help="every commit a branch or tag reaches, newest first")
    p.add_argument("-n", "--limit", type=count_of("commits"), metavar="N", help="at most N commits")
    p.add_argument("--oneline", action="store_true")
    p.add_argument("--graph", action="store_true",
                   help="every parent, drawn as lanes (one line per commit; merges open a lane)")
    p.add_argument("--json", action="store_true")
    add_log_options(p)  # --stat, -- PATH

    p = add("show", cmd_show, "show one commit")
    p.add_argument("rev", metavar="REV")
    p.add_argument("--json", action="store_true")

    p = add("ls", cmd_ls, "list a directory of a commit")
    p.add_argument("spec", metavar="REV[:PATH]")
    p.add_argument("-R", "--recursive", action="store_true")
    p.add_argument("--json", action="store_true")

    p = add("cat", cmd_cat, "write a file of a commit to stdout")
    p.add_argument("spec", metavar="REV:PATH")

    p = add("branch", cmd_branch, "list, create, rename or delete branches")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("rev_given", nargs="?", metavar="REV", help="where a new branch starts (default: main); "
                   "with -m, the new name")
    p.add_argument("-d", "--delete", metavar="NAME")
    p.add_argument("-m", "--move", action="store_true",
                   help="rename branch NAME to the second operand (refused if that name exists)")
    p.add_argument("--json", action="store_true")

    p = add("tag", cmd_tag, "list tags, tag a revision (tags never move), or delete a tag")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("rev", nargs="?", metavar="REV")
    p.add_argument("-d", "--delete", metavar="NAME", help="delete tag NAME")
    p.add_argument("--json", action="store_true")

    p = add("checkout", cmd_checkout, "materialise a revision (or REV:PATH) into a new directory")
    p.add_argument("spec", metavar="REV[:PATH]")
    p.add_argument("dest", metavar="DEST")

    p = add("fsck", cmd_fsck, "check the repository's integrity")
    p.add_argument("--read-data", action="store_true", help="also re-hash every chunk and pack")
    p.add_argument("--repair", action="store_true",
                   help="rebuild a lost or damaged index from the packs' tables; report what cannot be repaired")
    p.add_argument("--json", action="store_true")
