"""Thumbnails of image files, made with Pillow and cached on disk.

A thumbnail is a pure function of a file's content and a size, so its cache
key is the file id (the hash of its manifest) and the size: a cached
thumbnail never goes stale and needs no invalidation.  Files live under
``<cache dir>/thumbnails/<2 hex>/<file id>-<size>.jpg``, written to a
temporary name and renamed, so a reader never sees half a file and two
processes making the same thumbnail both succeed.

The source bytes come through the repository's verified read path (a corrupt
chunk raises CorruptObjectError, never decodes); what Pillow cannot decode
raises UndecodableImageError, which the UI turns into a placeholder.
Pillow is imported when a thumbnail is first made (the ``ui`` extra).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from commitfs.cache.disk import default_cache_dir
from commitfs.errors import UndecodableImageError
from commitfs.model.objects import TreeEntry
from commitfs.repo.repository import Repository

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SIZES = (128, 256)           # the sizes the UI asks for (a fixed set keeps the cache small)
# Larger sources are not decoded for a thumbnail: a 64 MiB image file is a
# scan or a bomb, not a dataset sample, and the page shows a placeholder.
MAX_SOURCE_BYTES = 64 << 20
MAX_PIXELS = 64_000_000


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def thumbnail_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "thumbnails"


def cache_path(entry: TreeEntry, size: int, cache_dir=None) -> Path:
    h = entry.id.hex()
    return thumbnail_dir(cache_dir) / h[:2] / f"{h}-{size}.jpg"


def make_thumbnail(data: bytes, size: int) -> bytes:
    """JPEG bytes of an image scaled to fit ``size`` x ``size``; raise UndecodableImageError."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise UndecodableImageError(f"image of {img.width}x{img.height} pixels is too large")
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            img.thumbnail((size, size))
            if img.mode in ("RGBA", "LA", "P", "PA"):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, "white")
                img.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode != "RGB":
                img = img.convert("RGB")
            out = io.BytesIO()
            img.save(out, "JPEG", quality=85)
            return out.getvalue()
    except UndecodableImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UndecodableImageError(f"cannot decode the image: {exc}") from None


def thumbnail(repo: Repository, entry: TreeEntry, size: int = 256, cache_dir=None) -> bytes:
    """The thumbnail of a file entry, from the disk cache or made (and cached) now."""
    if size not in SIZES:
        raise ValueError(f"thumbnail size must be one of {SIZES}")
    path = cache_path(entry, size, cache_dir)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    if entry.size > MAX_SOURCE_BYTES:
        raise UndecodableImageError(f"image of {entry.size} bytes is too large for a thumbnail")
    data = bytes(repo.load_file(entry.id))
    thumb = make_thumbnail(data, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(thumb)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return thumb
