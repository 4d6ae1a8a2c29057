"""The pages of ``commitfs ui``: each handler resolves, calls ops in a worker
thread (UI.call), and renders a template.  No real work here."""

from __future__ import annotations

import json
import mimetypes
import os
import re

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from commitfs.errors import BadURLError, IsADirectoryError_, NotADirectoryError_, TableError
from commitfs.model.objects import Kind
from commitfs.ops import browse, history, tablepage
from commitfs.ops.diff import diff_trees
from commitfs.ops.tablediff import diff_table
from commitfs.ops.tensordiff import diff_safetensors
from commitfs.ops.thumbnail import is_image_name
from commitfs.web.app import TEMPLATES, UI, rev_and_path, seg, split_segments, url_for

DIR_PAGE = 200          # entries per directory page
GRID_PAGE = 60          # thumbnails per grid page
RECENT = 30             # commits on the repository page
CHANGES_SHOWN = 500     # changed paths listed on a commit or compare page (all are counted)
IMAGES_SHOWN = 24       # before/after image pairs on a compare page
TABLE_PAGE = 100       # rows per table page
TABLES_DIFFED = 10      # changed tables whose rows a compare page shows
TABLE_DIFF_ROWS = 200   # row changes shown per table (all are counted)
TENSORS_DIFFED = 10     # changed safetensors files a compare page shows
TEXT_PREVIEW = 256 * 1024
JSON_PRETTY_MAX = 2 << 20
RAW_WINDOW = 1 << 20    # bytes read per step while streaming a file


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not re.fullmatch(r"\d{1,12}", value):
        raise BadURLError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _breadcrumb(rev: str, path: str) -> list[tuple[str, str]]:
    crumbs = [("/", url_for("tree", rev))]
    parts = [p for p in path.split("/") if p]
    for i, p in enumerate(parts):
        crumbs.append((p, url_for("tree", rev, "/".join(parts[:i + 1]))))
    return crumbs


# --- repository ----------------------------------------------------------------
def _head(repo, cid):
    c = repo.load_commit(cid)
    return {"id": cid.hex(), "summary": c.message.splitlines()[0] if c.message else "", "time": c.time}


def _refs_data(repo, branch: str | None):
    branches = repo.refs.branches()
    tags = repo.refs.tags()
    if branch is None:
        branch = "main" if "main" in branches else (sorted(branches)[0] if branches else None)
    return (branch, {n: _head(repo, c) for n, c in sorted(branches.items())},
            {n: _head(repo, c) for n, c in sorted(tags.items())})


def _recent_commits(repo, branch: str):
    commits = []
    for cid, c in history.log(repo, repo.resolve(branch), RECENT):
        commits.append({"id": cid.hex(), "author": c.author, "time": c.time,
                        "summary": c.message.splitlines()[0] if c.message else "",
                        "size": repo.load_tree(c.tree).size, "parents": len(c.parents)})
    return commits


async def repository(ui: UI, request: Request) -> Response:
    """Two calls, each with its own deadline: the references (nothing to show
    without them: a timeout is a 504 page), then the recent commits (a timeout
    leaves the references shown and a message in their place)."""
    branch = request.query_params.get("branch")
    branch, branches, tags = await ui.call(_refs_data, ui.repo, branch)
    commits, missing = [], None
    if branch is not None:
        commits, missing = await ui.section(f"the recent commits on {branch}", _recent_commits, ui.repo, branch)
    return ui.render("repository.html", title=ui.repo.url, branch=branch, branches=branches, tags=tags,
                     commits=commits or [], missing_commits=missing, partial=missing is not None)


# --- commit --------------------------------------------------------------------
def _changes(repo, old_tree: bytes | None, new_tree: bytes):
    counts = {"added": 0, "removed": 0, "modified": 0}
    shown = []
    for ch in diff_trees(repo, old_tree, new_tree):
        counts[ch.status] += 1
        if len(shown) < CHANGES_SHOWN:
            shown.append(ch)
    return counts, shown


def _commit_meta(repo, rev: str):
    from commitfs.ops import lineage

    cid = repo.resolve(rev)
    c = repo.load_commit(cid)
    parents = []
    for p in c.parents:
        pc = repo.load_commit(p)
        parents.append({"id": p.hex(), "summary": pc.message.splitlines()[0] if pc.message else "",
                        "tree": pc.tree})
    parsed = lineage.parse_lineage(c.metadata)
    inputs = []
    for inp in parsed.inputs:
        here = inp.url == repo.url or repo.has_commit(inp.commit)
        inputs.append({"name": inp.name, "rev": inp.rev, "url": inp.url, "id": inp.commit.hex(), "here": here})
    meta = {k: v for k, v in sorted(c.metadata.items()) if not k.startswith("lineage.input.")}
    return {"id": cid.hex(), "commit": c, "size": repo.load_tree(c.tree).size, "parents": parents,
            "inputs": inputs, "meta": meta, "problems": parsed.problems}


async def commit(ui: UI, request: Request) -> Response:
    """Two calls, each with its own deadline: the metadata (a timeout is a 504
    page), then the changed paths (a timeout leaves the metadata shown and a
    message in their place)."""
    rev, path = rev_and_path(request, "commit")
    if path:
        raise BadURLError("a commit URL is /commit/REV")
    data = await ui.call(_commit_meta, ui.repo, rev)
    parents = data["parents"]
    changed, missing = await ui.section("the list of changed paths", _changes, ui.repo,
                                        parents[0]["tree"] if parents else None, data["commit"].tree)
    counts, shown = changed if changed is not None else ({"added": 0, "removed": 0, "modified": 0}, [])
    return ui.render("commit.html", title=f"commit {data['id'][:12]}", rev=rev, counts=counts, changes=shown,
                     missing_changes=missing, partial=missing is not None, **data)


# --- trees ---------------------------------------------------------------------
def _tree_data(repo, rev: str, path: str, offset: int, grid: bool):
    cid = repo.resolve(rev)
    if grid:
        page = browse.list_page(repo, cid, path, offset, GRID_PAGE,
                                match=lambda e: e.kind.is_file and is_image_name(e.name))
    else:
        page = browse.list_page(repo, cid, path, offset, DIR_PAGE)
    return cid.hex(), page


async def tree(ui: UI, request: Request) -> Response:
    rev, path = rev_and_path(request, "tree")
    grid = request.query_params.get("view") == "grid"
    offset = _int(request, "offset", 0)
    try:
        cid, page = await ui.call(_tree_data, ui.repo, rev, path, offset, grid)
    except NotADirectoryError_:
        return Response(status_code=303, headers={"Location": url_for("file", rev, path)})
    return ui.render("grid.html" if grid else "tree.html", title=f"{path or '/'} at {rev}", rev=rev, path=path,
                     cid=cid, page=page, crumbs=_breadcrumb(rev, path), Kind=Kind,
                     is_image=is_image_name)


# --- files ---------------------------------------------------------------------
TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")


def file_kind(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    if is_image_name(name):
        return "image"
    if ext == ".safetensors":
        return "safetensors"
    if ext in TABLE_EXTENSIONS:
        return "table"
    if ext == ".json":
        return "json"
    return "other"


def _file_entry(repo, rev: str, path: str):
    if not path:
        raise IsADirectoryError_("/ is a directory")
    cid = repo.resolve(rev)
    entry = browse.lookup_path(repo, cid, path)
    if entry.is_dir:
        raise IsADirectoryError_(f"{path} is a directory")
    return cid, entry


def _text_preview(repo, cid: bytes, path: str, limit: int) -> tuple[str | None, bool]:
    """(text, truncated), or (None, False) when the start is not UTF-8 text."""
    f = browse.open_file(repo, cid, path)
    data = f.read(limit + 1)
    truncated = len(data) > limit
    data = data[:limit]
    if b"\x00" in data:
        return None, False
    try:
        return data.decode("utf-8"), truncated
    except UnicodeDecodeError as exc:
        if truncated and exc.start >= len(data) - 3:  # a character cut at the end
            return data[:exc.start].decode("utf-8"), True
        return None, False


def _file_data(repo, rev: str, path: str, table_args: dict):
    cid, entry = _file_entry(repo, rev, path)
    out = {"cid": cid.hex(), "entry": entry, "kind": "symlink" if entry.kind is Kind.SYMLINK else file_kind(path)}
    if out["kind"] == "table":
        try:
            out["table"] = tablepage.table_page(repo, entry, path, limit=TABLE_PAGE, **table_args)
        except TableError as exc:  # a parse error names the file and line: shown on the page
            out["table_error"] = str(exc)
        if table_args.get("column") is not None or "table" in out:
            return out
    if out["kind"] == "safetensors":
        diff = diff_safetensors(repo, None, entry)  # every tensor "added": the header, no tensor bytes read
        if diff.binary:
            out["tensor_error"] = diff.reason.removeprefix("new side: ")
        else:
            out["tensors"] = [c.new for c in diff.changes]
        return out
    if out["kind"] == "json" and entry.size <= JSON_PRETTY_MAX:
        text, _ = _text_preview(repo, cid, path, JSON_PRETTY_MAX)
        try:
            out["text"] = json.dumps(json.loads(text), indent=2, ensure_ascii=False) if text is not None else None
        except ValueError:
            out["kind"], out["text"], out["truncated"] = "text", text, False
    elif out["kind"] in ("json", "other", "table"):
        text, truncated = _text_preview(repo, cid, path, TEXT_PREVIEW)
        if text is not None:
            out["kind"] = "text" if out["kind"] != "table" else "table"
            out["text"], out["truncated"] = text, truncated
    return out


async def file(ui: UI, request: Request) -> Response:
    rev, path = rev_and_path(request, "file")
    column = request.query_params.get("column") or None
    table_args = {"offset": _int(request, "offset", 0), "column": column,
                  "value": request.query_params.get("value", "") if column else None}
    data = await ui.call(_file_data, ui.repo, rev, path, table_args)
    return ui.render("file.html", title=f"{path} at {rev}", rev=rev, path=path, crumbs=_breadcrumb(rev, path),
                     **data)


def content_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv", ".jsonl", ".txt", ".md", ".py", ".yaml", ".yml", ".toml", ".log"):
        return "text/plain; charset=utf-8"
    guess, _ = mimetypes.guess_type(path)
    if guess is None:
        return "application/octet-stream"
    if guess.startswith("text/"):
        return "text/plain; charset=utf-8"  # never render a dataset's HTML as a page
    return guess


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=A-B`` / ``A-`` / ``-N`` range as [start, end); None: serve all
    (several ranges); ValueError: unsatisfiable or malformed."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m:
        if header.strip().startswith("bytes=") and "," in header:
            return None
        raise ValueError(header)
    a, b = m.groups()
    if a == "" and b == "":
        raise ValueError(header)
    if a == "":
        n = int(b)
        if n == 0:
            raise ValueError(header)
        return max(0, size - n), size
    start = int(a)
    end = min(size, int(b) + 1) if b else size
    if start >= size or end <= start:
        raise ValueError(header)
    return start, end


async def raw(ui: UI, request: Request) -> Response:
    """A file's bytes.  The first window is read (and verified) before the
    status line goes out, so a corrupt first chunk is an error page; a corrupt
    later chunk ends the connection early: never wrong bytes."""
    rev, path = rev_and_path(request, "raw")
    cid, entry = await ui.call(_file_entry, ui.repo, rev, path)
    if entry.kind is Kind.SYMLINK:
        raise IsADirectoryError_(f"{path} is a symlink to {entry.target.decode(errors='replace')}")
    etag = f'"{entry.id.hex()}"'
    immutable = rev.lower() == cid.hex()
    headers = {
        "ETag": etag, "Accept-Ranges": "bytes", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox", "X-Commitfs-Commit": cid.hex(),
        "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache",
        "Content-Disposition": f"inline; filename*=UTF-8''{seg(path.rsplit('/', 1)[-1])}",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    size = entry.size
    start, end, status = 0, size, 200
    rng = request.headers.get("range")
    if rng is not None and request.headers.get("if-range", etag) == etag:
        try:
            got = parse_range(rng, size)
        except ValueError:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if got is not None:
            start, end = got
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    media = content_type(path)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media)
    f = await ui.call(browse.open_file, ui.repo, cid, path)

    def read(pos: int, n: int) -> bytes:
        f.seek(pos)
        return f.read(n)

    first = await ui.call(read, start, min(RAW_WINDOW, end - start)) if end > start else b""

    async def body():
        yield first
        pos = start + len(first)
        while pos < end:
            chunk = await ui.call(read, pos, min(RAW_WINDOW, end - pos))
            if not chunk:
                raise OSError(f"{path}: file ended early at {pos}")
            yield chunk
            pos += len(chunk)

    return StreamingResponse(body(), status_code=status, headers=headers, media_type=media)


# --- compare -------------------------------------------------------------------
def _compare_changes(repo, old: str, new: str):
    a, b = repo.resolve(old), repo.resolve(new)
    counts, shown = _changes(repo, repo.load_commit(a).tree, repo.load_commit(b).tree)
    images = [ch for ch in shown if is_image_name(ch.path)][:IMAGES_SHOWN]
    return {"old_id": a.hex(), "new_id": b.hex(), "counts": counts, "changes": shown, "images": images}


def _compare_diffs(repo, shown):
    tables, tensors = [], []
    for ch in shown:
        kind = file_kind(ch.path)
        if kind == "table" and len(tables) < TABLES_DIFFED:
            try:
                tables.append((ch, diff_table(repo, ch.old, ch.new, ch.path, max_rows=TABLE_DIFF_ROWS), None))
            except TableError as exc:
                tables.append((ch, None, str(exc)))
        elif kind == "safetensors" and len(tensors) < TENSORS_DIFFED:
            tensors.append((ch, diff_safetensors(repo, ch.old, ch.new)))
    return tables, tensors


async def compare(ui: UI, request: Request) -> Response:
    """Two calls, each with its own deadline: the changed paths (a timeout is
    a 504 page), then the table and tensor diffs (a timeout leaves the changed
    paths and images shown and a message in place of the diffs)."""
    parts = split_segments(request.scope.get("raw_path") or request.url.path.encode(), "compare")
    if len(parts) != 2:
        raise BadURLError("a compare URL is /compare/OLD/NEW")
    old, new = parts
    data = await ui.call(_compare_changes, ui.repo, old, new)
    diffs, missing = (([], []), None)
    if any(file_kind(ch.path) in ("table", "safetensors") for ch in data["changes"]):
        got, missing = await ui.section("the table and tensor diffs", _compare_diffs, ui.repo, data["changes"])
        diffs = got if got is not None else diffs
    return ui.render("compare.html", title=f"{old}..{new}", old=old, new=new, tables=diffs[0], tensors=diffs[1],
                     missing_diffs=missing, partial=missing is not None, **data)


# --- lineage -------------------------------------------------------------------
async def lineage(ui: UI, request: Request) -> Response:
    from commitfs.web import graph

    rev, path = rev_and_path(request, "lineage")
    if path:
        raise BadURLError("a lineage URL is /lineage/REV")
    report = await ui.call(graph.lineage_report, ui.repo, rev, ui.search)
    svg = graph.draw(report, ui.repo.url)
    return ui.render("lineage.html", title=f"lineage of {rev}", rev=rev, report=report, svg=svg)


# --- the style sheet -----------------------------------------------------------
_CSS = (TEMPLATES / "style.css").read_text()


async def style(request: Request) -> Response:
    return Response(_CSS, media_type="text/css", headers={"Cache-Control": "public, max-age=3600"})
