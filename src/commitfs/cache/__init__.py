"""The verified on-disk chunk cache (used only for non-local repositories)."""

from commitfs.cache.disk import DEFAULT_MAX_BYTES, DiskChunkCache, default_cache_dir, parse_size

__all__ = ["DEFAULT_MAX_BYTES", "DiskChunkCache", "default_cache_dir", "parse_size"]
