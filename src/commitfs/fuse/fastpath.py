"""The fast path of read-only mounts: FUSE's no-open mode, with the pyfuse3 pip installs.

A read-only mount answers the first OPEN with ENOSYS; the kernel then opens
every file of the mount itself: no round trip per ``open()``, page cache kept,
so a warm re-read costs no request at all (fuse/adapter.py, Operations).  In
that mode every READ carries file handle 0, and stock pyfuse3 passes
``read()`` only ``(fh, off, size)``: the inode is lost.  commitfs's own C
module ``commitfs.fuse._noopen`` (built by setup.py, like the other two C
modules, against libfuse3's headers) puts it back: made global before
pyfuse3 is loaded, its ``fuse_session_new`` is the one pyfuse3's ``init()``
calls; it hands libfuse pyfuse3's callbacks with the READ callback wrapped,
and once the daemon ``engage()``\\ s it, a READ with handle 0 reaches
pyfuse3 with the inode as its handle.  pyfuse3 itself is untouched, any
release of it works, and nothing is built or patched at install time beyond
commitfs's own extension.

``load()`` runs when this module is imported, which the daemon
(fuse/daemon.py) does before it imports pyfuse3; only a process that serves
a mount imports it, so no other process gets a ``fuse_session_new`` of
commitfs's in its global symbol scope (where it would also catch, say, a
libfuse 2 binding's own calls).  ``engage()``
runs after ``pyfuse3.init`` and turns the mode on only if the session really
went through the wrapper; otherwise it says why not, and the mount answers
every OPEN (one round trip per file, the same bytes), which the daemon's
log, ``commitfs mount`` and ``commitfs mounts`` all say loudly.

The module is imported in the local symbol scope and made global only once it
has found libfuse's own ``fuse_session_new`` (the function its wrapper calls):
where it cannot (a libfuse linked some other way), pyfuse3 binds libfuse's
function directly and the mount runs in the same fallback, never fails.

``COMMITFS_NO_FASTPATH=1`` forces that fallback (to compare, or to rule the
fast path out when chasing a bug).

Directory listings (``engage_listings()``, read-only mounts): the same wrapper
marks the listings of commit directories cacheable (``cache_readdir`` and
``keep_cache`` on OPENDIR, which pyfuse3's opendir cannot set: a directory
listed again is served from the kernel's page cache, no READDIR), and, asked
for with ``COMMITFS_READDIRPLUS_AUTO=1``, lets the kernel use adaptive
readdirplus (READDIRPLUS_AUTO, which pyfuse3's init turns off: plain READDIR
once a listing is past its first request and nobody looked its entries up, as
in find(1), so the kernel makes no dentry and inode per entry and the daemon
counts no reference; but a tool that lists a large directory before it stats
or opens its files then sends a LOOKUP per file, docs/SEMANTICS.md).  A plain
READDIR reaches ``Operations.readdir`` with ``PLAIN_FH`` set in its handle;
``Operations.opendir`` sets ``CACHE_FH`` in the handle of a listing that never
changes, which the C module turns into the two flags (the kernel never sees
the bit).  Without the C module listings are READDIRPLUS and never cached, as
with pyfuse3 alone (a WARNING says why).  ``granted_capabilities()`` tells
what the INIT agreed to.  (The C module's ``request_capabilities(mask)`` would
ask for more FUSE_CAP_* bits at the same INIT; nothing needs one yet: this
machine's libfuse 3.14 has no HANDLE_KILLPRIV_V2 or DIRECT_IO_ALLOW_MMAP.)

Writes (``engage_writes()``, workspace mounts): a WRITE is pwritten into the overlay's
data file by the C module, between two plain calls of the workspace (which descriptor,
if any, and what the write changed), with no bytes object, coroutine or task switch;
the workspace sends it to its ordinary ``write`` whenever that one would wait.

LOOKUPs (``engage_lookups()``, read-only mounts; ``COMMITFS_C_LOOKUPS=0`` turns it off): the
file system publishes each span of a commit directory it lists or looks a name up in (names,
positions, kinds, sizes, the block's base: vfs/core.py) to the C module, which answers a LOOKUP
of such a file or symlink itself, as it reads the request, before pyfuse3's loop (a trio wait,
task and coroutine per request) sees it, and keeps the references it gave for the inode table
to take (``CLookups``, vfs/inode.py's ``TreeInodeTable.external``): a stat walk after an
adaptive listing, or opens by path, cost no Python per file (docs/SEMANTICS.md).

READs (``engage_reads()``, read-only mounts in no-open mode; ``COMMITFS_C_READS=0`` turns it
off): the C module offers each READ, as it reads the request, to ``FileSystem.read_now``, a
plain call that answers with verified bytes already in memory (a read stream's fetched part,
cached pack pages, a small file read whole) or None; bytes are the reply, sent from the C
module inside libfuse's own processing of the request, with no pyfuse3 coroutine or trio
task; None sends the READ to ``Operations.read`` as before (docs/SEMANTICS.md, "Reading").
Chunk maps (``engage_chunk_maps()``): a large file's random small READs are answered by the C
module alone, from where the file system says each chunk lies in a local pack file, each
chunk read whole from the page cache and hashed against its id before a byte is sent.

Extended attributes (``engage_xattrs()``, read-only mounts): a GETXATTR of a name
outside ``user.commitfs.`` is answered ENODATA by the C module, without pyfuse3's
coroutine (``ls -l`` asks for two such names of every file, docs/SEMANTICS.md).
"""

from __future__ import annotations

import os
import sys

#: Set to anything but "" or "0": mounts run without the fast path.
DISABLE_ENV = "COMMITFS_NO_FASTPATH"
#: Set to anything but "" or "0": read-only mounts ask for adaptive readdirplus (engage_listings).
ADAPTIVE_ENV = "COMMITFS_READDIRPLUS_AUTO"
#: Set to "0": read-only mounts answer every LOOKUP in Python (engage_lookups), to compare.
C_LOOKUPS_ENV = "COMMITFS_C_LOOKUPS"
#: Set to "0": read-only mounts answer every READ through pyfuse3's loop (engage_reads), to compare.
C_READS_ENV = "COMMITFS_C_READS"
#: For tests only: the name under which load() looks for libfuse's own
#: fuse_session_new (one that does not exist stands for a libfuse it cannot find).
LIBFUSE_SYMBOL_ENV = "COMMITFS_TEST_LIBFUSE_SYMBOL"

_shim = None  # the loaded commitfs.fuse._noopen, or None
_why_not: str | None = None  # why it is not loaded (None: loaded, or load() not run)


def load() -> None:
    """Load commitfs.fuse._noopen ahead of pyfuse3 (once; never raises)."""
    global _shim, _why_not
    if _shim is not None or _why_not is not None:
        return
    setting = os.environ.get(DISABLE_ENV, "")
    if setting not in ("", "0"):
        _why_not = f"{DISABLE_ENV}={setting} is set"
        return
    if "pyfuse3" in sys.modules:
        _why_not = "pyfuse3 was imported before commitfs.fuse"
        return
    try:
        from commitfs.fuse import _noopen  # local scope: its fuse_session_new catches nothing yet
    except ImportError:
        _why_not = ("commitfs was installed without its C module commitfs.fuse._noopen, which needs "
                    "a C compiler and libfuse3-dev when pip builds commitfs")
        return
    # Global (so pyfuse3 binds to its wrapper) only once it has libfuse's own function
    # to call: else pyfuse3 keeps libfuse's and the mount runs without the fast path.
    name = os.environ.get(LIBFUSE_SYMBOL_ENV) or "fuse_session_new"
    if not _noopen.bind(name):
        _why_not = f"libfuse's own {name} was not found beside the libfuse3 commitfs.fuse._noopen links"
        return
    if not _noopen.make_global():
        _why_not = "commitfs.fuse._noopen could not join the global symbol scope"
        return
    _shim = _noopen


def engage() -> str | None:
    """After ``pyfuse3.init``: from now on READs with handle 0 carry the inode.
    None when done, else why the fast path is not available (a short phrase)."""
    load()
    if _shim is None:
        return _why_not
    if not _shim.wrapped():
        return "pyfuse3's FUSE session did not go through commitfs.fuse._noopen"
    _shim.enable(True)
    return None


#: What engage_listings and its neighbours call: a module built from an older _noopen.c
#: (an in-place build not redone) has none of them, and then only the no-open mode is used.
_LISTING_API = ("listings", "request_capabilities", "granted", "counts")


def _listing_shim():
    """The loaded module if it has the listing functions, else None."""
    if _shim is None or not all(hasattr(_shim, name) for name in _LISTING_API):
        return None
    return _shim


def adaptive_asked() -> bool:
    """``COMMITFS_READDIRPLUS_AUTO`` is set (to anything but "" or "0")."""
    return os.environ.get(ADAPTIVE_ENV, "") not in ("", "0")


def _shim_missing(*api: str) -> str | None:
    """Why the C module's wrappers of the FUSE session cannot be used for a feature
    needing the functions ``api``, or None: it is not loaded, it was built from an
    older _noopen.c (an in-place build not redone), or pyfuse3's session did not go
    through it."""
    load()
    if _shim is None:
        return _why_not or "commitfs.fuse._noopen is not loaded"
    if not all(hasattr(_shim, name) for name in api):
        return "commitfs.fuse._noopen was built from an older source (rebuild it: setup.py build_ext)"
    if not _shim.wrapped():
        return "pyfuse3's FUSE session did not go through commitfs.fuse._noopen"
    return None


def engage_listings(adaptive: bool = False) -> str | None:
    """After ``pyfuse3.init``, before ``pyfuse3.main`` (the kernel's INIT): Operations may
    mark fixed listings with CACHE_FH; with ``adaptive`` the INIT also asks for adaptive
    readdirplus, and plain READDIRs then reach Operations with PLAIN_FH.  None when
    done, else why not (as ``engage``)."""
    why = _shim_missing(*_LISTING_API)
    if why is None:
        _shim.listings(adaptive)
    return why


def granted_capabilities() -> int | None:
    """The FUSE_CAP_* bits the last INIT agreed to (conn->want), None before it or
    without the C module."""
    shim = _listing_shim()
    return shim.granted() if shim is not None else None


def listing_counts() -> tuple[int, int]:
    """(plain READDIRs, OPENDIRs answered with cache_readdir) so far ((0, 0) without the module)."""
    shim = _listing_shim()
    return shim.counts() if shim is not None else (0, 0)


def engage_xattrs(prefix: bytes) -> str | None:
    """After ``pyfuse3.init`` (read-only mounts): a GETXATTR of a name not starting with
    ``prefix`` (the only one a read-only mount has attributes under) is answered
    ENODATA by the C module, without pyfuse3's coroutine or the file system.  None
    when done, else why not (as ``engage``)."""
    why = _shim_missing("xattrs")
    if why is None:
        _shim.xattrs(prefix)
    return why


class CLookups:
    """The C module's LOOKUP tables, as vfs/core.py (``FileSystem.external_lookups``) and
    vfs/inode.py (``TreeInodeTable.external``) use them: ``publish`` a listed or looked-up
    span of a commit directory, ``take`` the LOOKUPs answered in C since (each a reference
    the inode table counts), ``dropped`` when a directory's block leaves the table."""

    def __init__(self, shim):
        self.publish = shim.publish
        self.take = shim.take_lookups
        self.dropped = shim.drop


def engage_lookups(uid: int, gid: int, blksize: int) -> CLookups | str:
    """After ``pyfuse3.init`` (read-only mounts): a LOOKUP of a file or symlink of a commit
    directory the file system has published is answered by the C module (attributes owned
    by ``uid``:``gid``, st_blksize ``blksize``), without pyfuse3's request loop.  The
    tables to hand the file system (``FileSystem.external_lookups``), else why not."""
    if os.environ.get(C_LOOKUPS_ENV, "") == "0":
        return f"{C_LOOKUPS_ENV}=0 is set"
    why = _shim_missing("lookups")
    if why is not None:
        return why
    from commitfs.model.objects import Kind
    _shim.lookups(True, uid, gid, (Kind.FILE, Kind.EXEC, Kind.SYMLINK), blksize)
    return CLookups(_shim)


def lookup_counts() -> tuple[int, int, int, int, int]:
    """(LOOKUPs answered in C; of them, before pyfuse3's loop saw them; of those, read while the
    C module waited for one after answering another; directory tables; their bytes) so far
    (zeros without the module)."""
    return _shim.lookup_counts() if _shim is not None and hasattr(_shim, "lookup_counts") else (0, 0, 0, 0, 0)


def xattrs_refused() -> int:
    """GETXATTRs the C module answered ENODATA so far (0 without it)."""
    return _shim.xattrs_refused() if _shim is not None and hasattr(_shim, "xattrs_refused") else 0


def engage_writes(write_fd, wrote) -> str | None:
    """After ``pyfuse3.init`` (workspace mounts): a WRITE is pwritten by the C module to
    ``write_fd(fh)`` (a descriptor, or -1: the WRITE goes to ``Operations.write``), then
    ``wrote(fh, off, written)`` is called and the WRITE answered, without pyfuse3's
    bytes copy, coroutine and task switch.  None when done, else why not (as ``engage``)."""
    why = _shim_missing("writes")
    if why is None:
        _shim.writes(write_fd, wrote)
    return why


def writes_in_c() -> int:
    """WRITEs the C module pwrote and answered so far (0 without it)."""
    return _shim.writes_in_c() if _shim is not None and hasattr(_shim, "writes_in_c") else 0


def engage_reads(read_now) -> str | None:
    """After ``engage()`` (read-only mounts in no-open mode): a READ is first offered, as the
    C module reads it from the device, to ``read_now(inode, offset, size)``, a plain call
    (``FileSystem.read_now``): the verified bytes it returns are the reply, with no
    pyfuse3 coroutine, trio task or wait; None sends the READ to ``Operations.read``.
    ``read_now`` calls ``yield_loop()`` when it started work only the event loop runs.
    None when done, else why not (as ``engage``)."""
    if os.environ.get(C_READS_ENV, "") == "0":
        return f"{C_READS_ENV}=0 is set"
    why = _shim_missing("reads")
    if why is None:
        _shim.reads(read_now)
    return why


class ChunkMaps:
    """The C module's chunk maps, as vfs/core.py (``FileSystem.chunk_maps``) uses them:
    ``put(inode, size, paths, ends, ids, fd_index, offsets)`` a large file's map, and
    ``inode in maps`` whether the module holds one for it now (it drops the oldest past
    its caps), so that a file's map is worked out once, not at each new read state."""

    def __init__(self, shim):
        self.put = shim.chunk_map
        self._mapped = shim.chunk_mapped

    def __contains__(self, inode: int) -> bool:
        return self._mapped(inode)


def engage_chunk_maps() -> ChunkMaps | str:
    """After ``engage_reads``: the C module answers a small READ that does not continue
    its file's last READ (a random reader's) from that file's chunk map, with the chunk
    read whole from the pack's page cache and hashed against its id (BLAKE3, the
    repository's ids), with no Python but the hash; anything it cannot answer goes to
    ``read_now``.  The maps to hand ``FileSystem.chunk_maps``, else why not (a str)."""
    if os.environ.get(C_READS_ENV, "") == "0":
        return f"{C_READS_ENV}=0 is set"
    why = _shim_missing("chunk_maps", "chunk_map", "chunk_mapped")
    if why is not None:
        return why
    from commitfs.model.ids import HASHER
    _shim.chunk_maps(HASHER)
    return ChunkMaps(_shim)


def map_counts() -> tuple[int, int]:
    """(READs answered from chunk maps, READs a map could not answer) so far."""
    return _shim.map_counts() if _shim is not None and hasattr(_shim, "map_counts") else (0, 0)


def yield_loop() -> None:
    """From ``read_now``: once this READ is answered, the C module hands control back to
    pyfuse3's loop instead of waiting for the next request (tasks were started)."""
    if _shim is not None:
        _shim.yield_loop()


def read_counts() -> tuple[int, int, int]:
    """(READs offered to read_now, answered with its bytes, refused for an error) so far."""
    return _shim.read_counts() if _shim is not None and hasattr(_shim, "read_counts") else (0, 0, 0)


def disengage() -> None:
    """Back to pyfuse3 as released (after the session is closed)."""
    if _shim is not None:
        _shim.enable(False)
    if _shim is not None and hasattr(_shim, "reads"):
        _shim.reads(None)
    if _shim is not None and hasattr(_shim, "chunk_maps"):
        _shim.chunk_maps(None)
    if _shim is not None and hasattr(_shim, "writes"):
        _shim.writes(None, None)
    if _shim is not None and hasattr(_shim, "xattrs"):
        _shim.xattrs(None)
    if _shim is not None and hasattr(_shim, "lookups"):
        _shim.lookups(False)
        _shim.take_lookups()  # the session is gone: nothing is left to count them
    if _listing_shim() is not None:
        _shim.listings(False)
        _shim.request_capabilities(0)


def reads_by_inode() -> int:
    """READs whose handle 0 was replaced by the inode so far (0 without the module)."""
    return _shim.rewritten() if _shim is not None else 0


load()  # at import: before pyfuse3 (see the module docstring)
