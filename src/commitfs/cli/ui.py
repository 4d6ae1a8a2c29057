"""``commitfs ui``: the review UI in the browser (commitfs.web), read-only."""

from __future__ import annotations

import sys

from commitfs.cli.core import open_repo, store_options
from commitfs.cli.output import warn
from commitfs.errors import CommitfsError

DEFAULT_PORT = 8470


def cmd_ui(args) -> int:
    try:
        from commitfs.web import server
        from commitfs.web.app import create_app
    except ImportError as exc:
        raise CommitfsError(f"the UI needs the ui extra (pip install 'commitfs[ui]'): {exc.name} is missing") from None
    repo = open_repo(args)
    search = None
    if args.search:
        from commitfs.ops.lineage import RepositoryOpener

        opener = RepositoryOpener(store_options(args), [repo])
        search = [repo] + [opener.open(u) for u in args.search]
    sock = server.bind(args.host, args.port)
    if not server.is_loopback(args.host):
        warn(f"listening on {args.host}: the UI has no authentication, anyone who can reach "
             f"this address can read the repository")
    app = create_app(repo, search=search, timeout=args.timeout)
    url = server.url_of(sock)
    print(f"commitfs ui: serving {repo.url} at {url} (Ctrl-C stops)", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    server.serve(app, sock)
    print("commitfs ui: stopped", file=sys.stderr)
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("ui", parents=[common], help="browse, compare and trace commits in a web browser",
                       description="Serve a read-only web UI over the repository; print its URL.")
    p.set_defaults(handler=cmd_ui)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; anything else warns: there is no authentication)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--open", action="store_true", help="open the URL in a web browser")
    p.add_argument("--search", action="append", metavar="URL",
                   help="also look for downstream commits in this repository (lineage page; repeatable)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a page that waits longer on the repository answers 504 (default 30)")
