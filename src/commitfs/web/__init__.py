"""The review UI (``commitfs ui``): a read-only web front end over a repository.

A front end like the CLI: pages call ops/ and the repository's read API,
never storage/, and do no real work of their own (paging a directory or a
table, thumbnails and diffs live in ops/).  Every blocking repository call
runs in a worker thread under a deadline (app.UI.call), so a slow S3 times
one page out with a message while the server goes on serving the others.

    app.py        the Starlette application, URL scheme, errors -> pages
    routes.py     one handler per page
    thumbnails.py the thumbnail route and its placeholder image
    server.py     binding the port and running uvicorn (Ctrl-C stops it)
    templates/    Jinja2 templates (server-rendered HTML, no JavaScript build)

Needs the ``ui`` extra (Starlette, uvicorn, Jinja2, Pillow).
"""
