"""The thumbnail route: /thumb/REV/PATH?size=N.

Thumbnails are made and cached by ops.thumbnail.  An image Pillow cannot
decode gets a placeholder (200, ``X-Commitfs-Placeholder`` says why) rather
than an error; a corrupt chunk is an error (a broken image in the grid, the
reason in the log): never a thumbnail of unverified bytes.  A thumbnail
whose reads time out is a "timed out" placeholder with status 504 (the grid
page around it is already shown; reloading tries again).
"""

from __future__ import annotations

import logging
from html import escape

from starlette.requests import Request
from starlette.responses import Response

from commitfs.errors import BadURLError, UndecodableImageError
from commitfs.ops import thumbnail as thumbs
from commitfs.web.app import UI, rev_and_path

log = logging.getLogger("commitfs.web")


def placeholder(size: int, reason: str, label: str = "no preview") -> bytes:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 100 100">'
            f'<title>{escape(reason)}</title><rect width="100" height="100" fill="#eee" stroke="#bbb"/>'
            f'<text x="50" y="55" font-size="12" text-anchor="middle" fill="#888">{escape(label)}</text></svg>').encode()


def _thumb(ui: UI, rev: str, path: str, size: int):
    from commitfs.web.routes import _file_entry

    cid, entry = _file_entry(ui.repo, rev, path)
    if not entry.kind.is_file:
        raise UndecodableImageError(f"{path} is not a file")
    return entry, thumbs.thumbnail(ui.repo, entry, size, ui.cache_dir)


async def thumb(ui: UI, request: Request) -> Response:
    rev, path = rev_and_path(request, "thumb")
    size_text = request.query_params.get("size", str(thumbs.SIZES[-1]))
    if not size_text.isdigit() or int(size_text) not in thumbs.SIZES:
        raise BadURLError(f"size must be one of {', '.join(map(str, thumbs.SIZES))}")
    size = int(size_text)
    try:
        entry, data = await ui.call(_thumb, ui, rev, path, size)
    except TimeoutError:
        reason = f"the repository did not answer within {ui.timeout:g} s; reload to try again"
        log.warning("%s: thumbnail timed out after %.0f s", path, ui.timeout)
        return Response(placeholder(size, reason, "timed out"), status_code=504, media_type="image/svg+xml",
                        headers={"X-Commitfs-Placeholder": reason, "Cache-Control": "no-store"})
    except UndecodableImageError as exc:
        log.info("%s: placeholder thumbnail: %s", path, exc)
        return Response(placeholder(size, str(exc)), media_type="image/svg+xml",
                        headers={"X-Commitfs-Placeholder": str(exc).encode("ascii", "replace").decode()[:200],
                                 "Cache-Control": "no-cache"})
    return Response(data, media_type="image/jpeg",
                    headers={"ETag": f'"{entry.id.hex()}-{size}"', "Cache-Control": "public, max-age=3600"})
