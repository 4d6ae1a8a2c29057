"""The Starlette application of ``commitfs ui``: URL scheme, deadlines, error pages.

URLs (every one names its revision and path, so a link is shareable):

    /                             the repository: branches, tags, recent commits
    /commit/REV                   one commit
    /tree/REV/PATH[?offset=N]     a directory page (&view=grid: image thumbnails)
    /file/REV/PATH                a file's page (image, text, JSON, table, tensors)
    /raw/REV/PATH                 a file's bytes (ETag = file id, Range requests)
    /thumb/REV/PATH?size=N        an image's thumbnail
    /compare/OLD/NEW              what changed between two revisions
    /lineage/REV                  inputs upstream, commits downstream, as a graph

REV and each component of PATH are one percent-encoded URL segment each (a
branch "team/x" is ``team%2Fx``).  Segments are split on the raw request
path, before decoding, so an encoded slash never becomes a separator; a path
component that is empty, ``.``, ``..``, holds a slash or a NUL is refused
with 400 (tree names can never be those, so nothing is looked up outside a
commit's trees whatever the URL).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

import anyio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from commitfs.errors import (
    BadURLError,
    CommitfsError,
    CorruptObjectError,
    IsADirectoryError_,
    NotADirectoryError_,
    PathNotFoundError,
    RevisionError,
    StorageError,
    StorageTimeoutError,
)
from commitfs.repo.repository import Repository

log = logging.getLogger("commitfs.web")

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_TIMEOUT = 30.0
# Worker threads for repository calls: enough that a few stalled S3 reads
# leave threads for other pages.
THREADS = 32


# --- URLs ----------------------------------------------------------------------
def seg(text: str) -> str:
    return quote(text, safe="")


def path_url(path: str) -> str:
    return "/".join(seg(p) for p in path.split("/") if p)


def url_for(kind: str, rev: str, path: str = "") -> str:
    out = f"/{kind}/{seg(rev)}"
    return out + "/" + path_url(path) if path else out + ("/" if kind == "tree" else "")


def split_segments(raw_path: bytes, prefix: str) -> list[str]:
    """The decoded segments of a raw request path after ``/prefix/``.

    A trailing slash is allowed (a directory); any other empty segment (an
    absolute path, ``a//b``), ``.``, ``..``, an encoded slash or NUL, or bad
    UTF-8 raises BadURLError."""
    text = raw_path.decode("latin-1")
    head = f"/{prefix}/"
    if not text.startswith(head):
        raise BadURLError(f"bad URL {text!r}")
    parts = text[len(head):].split("/")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    out = []
    for raw in parts:
        try:
            part = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise BadURLError(f"bad percent-encoding in {raw!r}") from None
        if part in ("", ".", ".."):
            raise BadURLError(f"bad path component {part!r}: paths name entries of a commit's trees")
        if "/" in part or "\x00" in part:
            raise BadURLError(f"bad path component {part!r} (an encoded slash or NUL)")
        out.append(part)
    return out


def rev_and_path(request: Request, prefix: str) -> tuple[str, str]:
    parts = split_segments(request.scope.get("raw_path") or request.url.path.encode(), prefix)
    if not parts:
        raise BadURLError("the URL names no revision")
    return parts[0], "/".join(parts[1:])


# --- the application -----------------------------------------------------------
class UI:
    """What every page shares: the repository, the search list, the deadline."""

    def __init__(self, repo: Repository, *, search: list[Repository] | None = None, cache_dir=None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.repo = repo
        self.search = search
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.limiter = anyio.CapacityLimiter(THREADS)
        self.env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(url_for=url_for, seg=seg, path_url=path_url, human_size=human_size,
                                short=lambda cid: cid[:12], when=when, repo_url=repo.url)
        # Compile every template now (tens of ms): a server's first page should not pay for it.
        for name in self.env.list_templates(extensions=["html"]):
            self.env.get_template(name)

    async def call(self, fn, *args, **kwargs):
        """``fn(*args)`` in a worker thread; TimeoutError after the deadline
        (the thread is left to finish on its own, the page answers now).

        Each call gets a daemon thread of its own (a few tens of microseconds,
        nothing next to a page): a read stalled on S3 then never holds up the
        process's exit after Ctrl-C, as a pool's non-daemon worker would.  At
        most THREADS calls run at once; a timed-out call gives its slot back."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if abandoned

        def settle(result, error) -> None:
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(result)

        def run() -> None:
            try:
                result, error = fn(*args, **kwargs), None
            except BaseException as exc:  # handed to the page, which names it
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the server stopped meanwhile: nobody waits
                pass

        with anyio.fail_after(self.timeout):
            async with self.limiter:
                threading.Thread(target=run, name="commitfs-ui-call", daemon=True).start()
                return await asyncio.shield(done)

    async def section(self, what: str, fn, *args, **kwargs):
        """``(fn(*args), None)``, or ``(None, message)`` when the repository did
        not answer within the deadline: a page built from several calls shows
        the parts it has and this message where ``what`` would be."""
        try:
            return await self.call(fn, *args, **kwargs), None
        except TimeoutError:
            log.warning("%s: timed out after %.0f s", what, self.timeout)
            return None, (f"the repository did not answer within {self.timeout:g} s: {what} is missing; "
                          "reload to try again")

    def render(self, name: str, status: int = 200, headers=None, **context) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status, headers=headers)

    def error_page(self, status: int, title: str, message: str) -> HTMLResponse:
        return self.render("error.html", status, title=title, message=message, status_code=status)


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def when(ts: int | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _error_response(ui: UI, request: Request, exc: Exception) -> Response:
    if isinstance(exc, (RevisionError, PathNotFoundError, NotADirectoryError_, IsADirectoryError_)):
        return ui.error_page(404, "Not found", str(exc))
    if isinstance(exc, BadURLError):
        return ui.error_page(400, "Bad request", str(exc))
    if isinstance(exc, TimeoutError):
        log.warning("%s: timed out after %.0f s", request.url.path, ui.timeout)
        return ui.error_page(504, "Timed out", f"the repository did not answer within {ui.timeout:g} s "
                                               f"(slow storage?); other pages are still served: try again")
    if isinstance(exc, CorruptObjectError):
        log.error("%s: corrupt data: %s", request.url.path, exc)
        return ui.error_page(500, "Corrupt data", f"corrupt data in the repository: {exc} (run commitfs fsck); "
                                                  "no unverified bytes are shown")
    if isinstance(exc, StorageTimeoutError):
        log.error("%s: %s", request.url.path, exc)
        return ui.error_page(504, "Storage timed out", str(exc))
    if isinstance(exc, StorageError):
        log.error("%s: storage error: %s", request.url.path, exc)
        return ui.error_page(502, "Storage error", str(exc))
    if isinstance(exc, CommitfsError):
        log.error("%s: %s", request.url.path, exc)
        return ui.error_page(500, "Error", str(exc))
    log.exception("%s: unexpected error", request.url.path, exc_info=exc)
    return ui.error_page(500, "Internal error", f"{type(exc).__name__}: {exc}")


def create_app(repo: Repository, *, search: list[Repository] | None = None, cache_dir=None,
               timeout: float = DEFAULT_TIMEOUT) -> Starlette:
    """The UI over ``repo`` (read-only).  ``search``: repositories whose
    commits the lineage page looks through for downstream commits (default:
    ``repo``); ``cache_dir``: where thumbnails are kept (default: under the
    commitfs cache directory)."""
    from commitfs.web import routes, thumbnails

    ui = UI(repo, search=search, cache_dir=cache_dir, timeout=timeout)

    def page(handler):
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(ui, request)
            except Exception as exc:  # every error becomes a page naming it
                return _error_response(ui, request, exc)
        return endpoint

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return ui.error_page(404, "Not found", f"no page {request.url.path!r} in this UI")
        return ui.error_page(exc.status_code, "Error", str(exc.detail))

    methods = ["GET", "HEAD"]
    app = Starlette(routes=[
        Route("/", page(routes.repository), methods=methods),
        Route("/commit/{rest:path}", page(routes.commit), methods=methods),
        Route("/tree/{rest:path}", page(routes.tree), methods=methods),
        Route("/file/{rest:path}", page(routes.file), methods=methods),
        Route("/raw/{rest:path}", page(routes.raw), methods=methods),
        Route("/thumb/{rest:path}", page(thumbnails.thumb), methods=methods),
        Route("/compare/{rest:path}", page(routes.compare), methods=methods),
        Route("/lineage/{rest:path}", page(routes.lineage), methods=methods),
        Route("/style.css", routes.style, methods=methods),
    ], exception_handlers={HTTPException: not_found})
    app.state.ui = ui
    return app
