"""Large directories as trees of tree chunks (pure, no I/O).

A directory of more than ``SPLIT_ENTRIES`` entries is not one tree object but
a *prolly tree* (as Dolt's and Xet's): its sorted entries are cut into
*leaf chunks*, each an ordinary tree (docs/FORMAT.md, "Tree"), and an *index
node* lists the chunks; when one index node would list too many, the index
entries are cut the same way into a level above, until one node remains,
the *root*, whose id is the directory's tree id.

Where to cut depends on the entries alone, never on how the directory came
to be: after an entry whose name's hash meets a mask (``LEAF_BITS`` top bits
zero, ``name_hash``), once the chunk holds ``LEAF_MIN`` entries, and always at ``LEAF_MAX``;
index levels likewise on the hash of a child's first name, other bits
(``INDEX_*``).  So the same directory always splits the same way (its id
depends only on its content), and an edit moves only the boundaries near it:
adding, removing or changing one entry rewrites its leaf, perhaps a
neighbour, and one node per level above: O(log n) small objects.  A
content change of a file never moves a boundary (names decide them).

Index node encoding (the root, and every node above the leaves):

    "CFTIDX1\\n" | varint level >= 1 | varint n >= 1 | n x child
    child := varint name length | first name (UTF-8) | varint entries >= 1
             | varint size | child id: 32 bytes

``level`` 1 lists leaf chunks; level k > 1 lists index nodes of level k-1.
``entries`` and ``size`` are the directory entries below the child and the
sum of their sizes (symlinks not counted, as a tree's size), so a reader
knows the directory's size and count, and an entry's position, from the
index alone.  Children are sorted by first name, strictly.

Readers check every node they load against the index entry that named it
(``check_child``): its kind and level, its first name, its count and size,
and that its names stay below the next child's first name (the bound is
passed down every level).  So a hostile split tree (unsorted or overlapping
chunks, wrong counts, a level that does not descend) is a malformed tree,
never a wrong answer; whether its boundaries are the canonical ones is
fsck's question (``split_nodes`` again and compare ids).

``SplitTree`` is a split directory as the readers see it: ``get`` and
``position`` load only the chunks on one path, ``size`` and ``count`` load
nothing beyond the root, ``entries`` loads every leaf.  It loads through a
function it is given (the repository's cached, verified loads), so this
module does no I/O itself.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from commitfs.errors import CorruptObjectError
from commitfs.model.ids import ID_SIZE, hash_bytes
from commitfs.model.objects import (
    TREE_MAGIC,
    DecodeError,
    Kind,
    Tree,
    TreeEntry,
    _get_uvarint,
    _put_uvarint,
    check_name,
)

TREE_INDEX_MAGIC = b"CFTIDX1\n"

#: A directory of more entries than this is split (a plain tree of 4096
#: entries is ~200 KiB: read whole, one ranged read, a few ms to decode).
#: Directories up to it keep the version-1 encoding and ids exactly.
SPLIT_ENTRIES = 4096
#: Leaf chunks: at least 64 entries, then a cut after an entry whose name's
#: hash has its top 8 bits zero (about 320 entries, ~16 KiB, on average),
#: at most 1024.  Small, so one added file rewrites little; not tiny, so a
#: listing reads few objects.
LEAF_MIN = 64
LEAF_BITS = 8
LEAF_MAX = 1024
#: Index nodes: 16 children at least, then a cut on 6 other bits of the hash
#: of a child's first name (about 80 children, ~5 KiB), at most 256.  A
#: million entries: ~3,100 leaves, ~40 level-1 nodes, one root of level 2.
INDEX_MIN = 16
INDEX_BITS = 6
INDEX_MAX = 256
#: Levels a reader accepts (a million-fold fan-out per two levels: 10M
#: entries need three); a deeper node is malformed.
MAX_LEVEL = 12


class IndexEntry(NamedTuple):
    """One child of an index node."""

    first: str  # the first entry name below it
    count: int  # directory entries below it
    size: int  # their total size (symlinks not counted)
    id: bytes


#: The boundary hash of a name: its CRC-32 (zlib's, as gzip and PNG use),
#: multiplied by this odd constant modulo 2^64 so that its high bits depend
#: on every bit of the name.  Not a cryptographic hash: ids are BLAKE3; this
#: only places boundaries (a hostile set of names can make every chunk its
#: maximum size, nothing worse), and a million names hash in 0.2 s.
_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def name_hash(raw: bytes) -> int:
    """The boundary hash of an entry name (bytes)."""
    return (zlib.crc32(raw) * _MIX) & _MASK64


def _leaf_cut(h: int) -> bool:
    """A leaf chunk may end after an entry whose hash has its top LEAF_BITS bits zero."""
    return not h >> (64 - LEAF_BITS)


def _index_cut(h: int) -> bool:
    """An index node may end after a child whose first name's hash has bits 48.. (INDEX_BITS) zero."""
    return not (h >> 48) & ((1 << INDEX_BITS) - 1)


def _cuts(raws: Sequence[bytes], lo: int, hi: int, cut: Callable[[int], bool]) -> list[int]:
    """End positions of the chunks of ``raws`` (content-defined, left to right)."""
    hashes = list(map(zlib.crc32, raws))
    ends = []
    start = 0
    n = len(raws)
    i = lo - 1  # a chunk never ends before it holds ``lo`` items
    while i < n:
        if i - start + 1 >= hi or cut((hashes[i] * _MIX) & _MASK64):
            ends.append(i + 1)
            start = i + 1
            i = start + lo - 1
        else:
            i += 1
    if start < n:
        ends.append(n)
    return ends


def _tree_size(entries) -> int:
    return sum(e.size for e in entries if e.kind is not Kind.SYMLINK)


@dataclass(frozen=True, slots=True)
class TreeIndex:
    """An index node of a split directory."""

    level: int
    children: tuple[IndexEntry, ...]
    _firsts: list = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    @property
    def count(self) -> int:
        return sum(c.count for c in self.children)

    @property
    def size(self) -> int:
        return sum(c.size for c in self.children)

    @property
    def firsts(self) -> list[bytes]:
        firsts = self._firsts
        if firsts is None:
            firsts = [c.first.encode() for c in self.children]
            object.__setattr__(self, "_firsts", firsts)
        return firsts

    def find(self, raw: bytes) -> int | None:
        """The child whose range may hold the name ``raw``, or None (before the first)."""
        i = bisect.bisect_right(self.firsts, raw) - 1
        return i if i >= 0 else None

    def encode(self) -> bytes:
        out = bytearray(TREE_INDEX_MAGIC)
        _put_uvarint(out, self.level)
        _put_uvarint(out, len(self.children))
        for c in self.children:
            name = c.first.encode()
            _put_uvarint(out, len(name))
            out += name
            _put_uvarint(out, c.count)
            _put_uvarint(out, c.size)
            out += c.id
        return bytes(out)

    @property
    def id(self) -> bytes:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> TreeIndex:
        if not data.startswith(TREE_INDEX_MAGIC):
            raise DecodeError("not a tree index node")
        level, pos = _get_uvarint(data, len(TREE_INDEX_MAGIC))
        if not 1 <= level <= MAX_LEVEL:
            raise DecodeError(f"tree index level {level} is not in 1..{MAX_LEVEL}")
        n, pos = _get_uvarint(data, pos)
        if n < 1 or n > len(data):
            raise DecodeError(f"tree index node of {n} children")
        children = []
        prev = None
        for _ in range(n):
            nlen, pos = _get_uvarint(data, pos)
            raw = data[pos:pos + nlen]
            pos += nlen
            if len(raw) != nlen:
                raise DecodeError("truncated tree index node")
            if prev is not None and not prev < raw:
                raise DecodeError("tree index children not sorted")
            prev = raw
            try:
                name = raw.decode()
                check_name(name)
            except (UnicodeDecodeError, ValueError):
                raise DecodeError(f"invalid first name {raw[:80]!r} in tree index node") from None
            count, pos = _get_uvarint(data, pos)
            size, pos = _get_uvarint(data, pos)
            cid = data[pos:pos + ID_SIZE]
            pos += ID_SIZE
            if len(cid) != ID_SIZE:
                raise DecodeError("truncated tree index node")
            if count < 1:
                raise DecodeError("tree index child of no entries")
            children.append(IndexEntry(name, count, size, cid))
        if pos != len(data):
            raise DecodeError("trailing bytes in tree index node")
        return cls(level, tuple(children))


def decode_tree_node(data: bytes) -> Tree | TreeIndex:
    """A stored tree object: a plain tree (a directory, or a leaf chunk) or an index node."""
    if data.startswith(TREE_INDEX_MAGIC):
        return TreeIndex.decode(data)
    return Tree.decode(data)


def node_children(node: Tree | TreeIndex) -> list[bytes]:
    """The ids of the objects a tree object names: an index node's chunks, a
    tree's directories and files (what gc marks and sync sends)."""
    if isinstance(node, TreeIndex):
        return [c.id for c in node.children]
    return [e.id for e in node.entries if e.kind is not Kind.SYMLINK]


# --- building -----------------------------------------------------------------------
def split_nodes(entries: Sequence[TreeEntry]) -> list[tuple[bytes, bytes, Tree | TreeIndex]]:
    """The objects that store a directory of sorted, valid ``entries``:
    (id, encoding, object), every object after those it names; the last is
    the directory's own (its tree id).  One plain tree up to SPLIT_ENTRIES
    entries, else leaf chunks and index levels (module doc)."""
    return list(iter_split_nodes(entries))


def iter_split_nodes(entries: Sequence[TreeEntry]) -> Iterator[tuple[bytes, bytes, Tree | TreeIndex]]:
    """``split_nodes``, each object yielded as soon as it is made: a writer stores
    each leaf before the next is encoded (all the leaves of a million entries
    are ~50 MB of encodings), and only the index entries are kept meanwhile."""
    entries = entries if isinstance(entries, tuple) else tuple(entries)
    n = len(entries)
    if n <= SPLIT_ENTRIES:
        tree = Tree(entries)
        data = tree.encode()
        yield hash_bytes(data), data, tree
        return
    level: list[IndexEntry] = []
    # _cuts over the names, each name hashed only where a cut may fall.
    start = 0
    i = LEAF_MIN - 1
    while i < n:
        if i - start + 1 >= LEAF_MAX or _leaf_cut(name_hash(entries[i].name.encode())):
            level.append((yield from _iter_leaf(entries[start:i + 1])))
            start = i + 1
            i = start + LEAF_MIN - 1
        else:
            i += 1
    if start < n:
        level.append((yield from _iter_leaf(entries[start:])))
    yield from _iter_index_levels(level)


def _iter_leaf(entries):
    """Yield leaf chunk ``entries``'s object; return its index entry."""
    leaf = Tree(tuple(entries))
    data = leaf.encode()
    oid = hash_bytes(data)
    yield oid, data, leaf
    return IndexEntry(leaf.entries[0].name, len(leaf.entries), _tree_size(leaf.entries), oid)


def _leaf(entries, out: list) -> IndexEntry:
    gen = _iter_leaf(entries)
    out.append(next(gen))
    try:
        next(gen)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("a leaf is one object")


def _index_levels(level: list[IndexEntry], out: list) -> None:
    """The index nodes above leaf chunks ``level``, appended to ``out``, the root last."""
    out.extend(_iter_index_levels(level))


def _iter_index_levels(level: list[IndexEntry]) -> Iterator[tuple[bytes, bytes, TreeIndex]]:
    depth = 1
    while True:  # index levels, until one node remains: the root
        firsts = [c.first.encode() for c in level]
        above: list[IndexEntry] = []
        start = 0
        for end in _cuts(firsts, INDEX_MIN, INDEX_MAX, _index_cut):
            node = TreeIndex(depth, tuple(level[start:end]))
            data = node.encode()
            oid = hash_bytes(data)
            yield oid, data, node
            above.append(IndexEntry(level[start].first, node.count, node.size, oid))
            start = end
        if len(above) == 1:
            break
        level = above
        depth += 1


def split_edit(tree: SplitTree, edits: Mapping[str, TreeEntry | None]) -> list[tuple[bytes, bytes, Tree | TreeIndex]]:
    """``split_nodes`` of ``tree``'s entries with ``edits`` applied (a name to
    its new entry, or None to remove it), reading and re-encoding only the
    leaves the edits fall in and those up to where the boundaries meet the old
    ones again, plus the index nodes (every one is re-encoded: ~1/300 of the
    entries).  Same result as split_nodes on the edited entries, by
    construction: the old boundaries before an edit's leaf are canonical, and
    once a re-cut ends exactly where an old leaf ended, the chunker's state is
    the old one again."""
    for name, e in edits.items():
        if e is not None:
            check_name(e.name)
            if e.name != name:
                raise ValueError(f"edit of {name!r} names {e.name!r}")
    leaves = tree._bounds[0] if tree._bounds is not None else _leaf_entries(tree)  # (edit_pays may have)
    firsts = [c.first.encode() for c in leaves]
    pending = sorted(((n.encode(), e) for n, e in edits.items()), key=lambda p: p[0])
    out: list[tuple[bytes, bytes, Tree | TreeIndex]] = []
    new_leaves: list[IndexEntry] = []
    i = p = 0
    while p < len(pending):
        k = max(0, bisect.bisect_right(firsts, pending[p][0]) - 1)
        new_leaves.extend(leaves[i:k])
        cur: list[TreeEntry] = []
        j = k
        while True:
            upper = firsts[j + 1] if j + 1 < len(leaves) else None
            mine = []
            while p < len(pending) and (upper is None or pending[p][0] < upper):
                mine.append(pending[p])
                p += 1
            for e in _merged(tree.child_at(j).entries, mine):
                cur.append(e)
                n = len(cur)
                if n >= LEAF_MAX or (n >= LEAF_MIN and _leaf_cut(name_hash(e.name.encode()))):
                    new_leaves.append(_leaf(cur, out))
                    cur = []
            j += 1
            if j == len(leaves):
                if cur:
                    new_leaves.append(_leaf(cur, out))
                break
            if not cur:  # cut where an old leaf ended: in step with the old chunking again
                break
        i = j
    new_leaves.extend(leaves[i:])
    total = sum(c.count for c in new_leaves)
    if total <= SPLIT_ENTRIES:
        made = {oid: node for oid, _, node in out}
        entries = [e for c in new_leaves for e in (made.get(c.id) or tree.load_leaf(c)).entries]
        return split_nodes(entries)
    _index_levels(new_leaves, out)
    return out


def edit_pays(tree: SplitTree, names) -> bool:
    """Whether storing ``tree`` with edits of ``names`` (the names added,
    changed or removed) is worth doing as an edit (split_edit) rather than
    encoding the edited directory whole: decided from its index nodes alone
    (loaded and checked; no leaf is read).  An edit reads every leaf an edit
    falls in; when that is more than half of the leaves, encoding the whole
    directory costs less (it reads no old leaf at all: over S3, a touch of
    every file of a million-entry directory would be ~3,100 GETs), and gives
    the same ids either way (ids depend on content only)."""
    leaves = tree._bounds[0] if tree._bounds is not None else _leaf_entries(tree)
    firsts = [c.first.encode() for c in leaves]
    hit = {max(0, bisect.bisect_right(firsts, n.encode()) - 1) for n in names}
    return 2 * len(hit) <= len(leaves)


def _merged(entries, edits):
    """``entries`` (sorted) with ``edits`` [(name bytes, entry or None)] (sorted) applied."""
    if not edits:
        yield from entries
        return
    q = 0
    for e in entries:
        raw = e.name.encode()
        while q < len(edits) and edits[q][0] < raw:
            if edits[q][1] is not None:
                yield edits[q][1]
            q += 1
        if q < len(edits) and edits[q][0] == raw:
            if edits[q][1] is not None:
                yield edits[q][1]
            q += 1
        else:
            yield e
    for _, new in edits[q:]:
        if new is not None:
            yield new


def _leaf_entries(tree: SplitTree) -> list[IndexEntry]:
    """The level-1 index entries of ``tree``, in order (its index nodes loaded
    and checked, no leaf)."""
    out: list[IndexEntry] = []
    bounds: list[bytes | None] = []

    def walk(node: TreeIndex, upper):
        for i, c in enumerate(node.children):
            u = _upper(node, i, upper)
            if node.level == 1:
                out.append(c)
                bounds.append(u)
            else:
                walk(tree.child(node, i, u), u)
    walk(tree.root, None)
    tree._bounds = (out, bounds)
    return out


def tree_id_of(entries: Sequence[TreeEntry]) -> bytes:
    """The canonical tree id of a directory of sorted ``entries``."""
    for oid, _, _ in iter_split_nodes(entries):
        pass
    return oid


class SplitIdBuilder:
    """``tree_id_of`` for sorted entries given one at a time (``add``), holding one
    leaf's entries and the level-1 index entries, never the whole directory (fsck
    checks a split tree's boundaries with it, leaf by leaf). ``count`` entries so far."""

    def __init__(self) -> None:
        self.count = 0
        self._pending: list[TreeEntry] = []  # entries since the last cut
        self._held: list[list[TreeEntry]] = []  # cut, not yet encoded: a plain tree until past SPLIT_ENTRIES
        self._level: list[IndexEntry] = []

    def add(self, entry: TreeEntry) -> None:
        self.count += 1
        pending = self._pending
        pending.append(entry)
        k = len(pending)
        if k >= LEAF_MIN and (k >= LEAF_MAX or _leaf_cut(name_hash(entry.name.encode()))):
            self._held.append(pending)
            self._pending = []
            if self.count > SPLIT_ENTRIES:
                self._encode_held()

    def _encode_held(self) -> None:
        sink: list = []
        for entries in self._held:
            self._level.append(_leaf(entries, sink))
            sink.clear()
        self._held = []

    def finish(self) -> bytes:
        if self.count <= SPLIT_ENTRIES:
            return hash_bytes(Tree(tuple(e for es in self._held for e in es) + tuple(self._pending)).encode())
        if self._pending:
            self._held.append(self._pending)
            self._pending = []
        self._encode_held()
        for oid, _, _ in _iter_index_levels(self._level):
            pass
        return oid


# --- reading -------------------------------------------------------------------------
def check_child(parent: TreeIndex, i: int, node, upper: bytes | None) -> None:
    """DecodeError unless ``node`` is what ``parent``'s child ``i`` says it is:
    a leaf (level 1) or an index node one level down, with that first name,
    count and size, all its names below ``upper`` (the next first name at
    this level or any above it; None: no bound)."""
    c = parent.children[i]
    if parent.level == 1:
        if not isinstance(node, Tree):
            raise DecodeError(f"chunk {c.id.hex()} of a level-1 tree index node is not a leaf tree")
        ents = node.entries
        if not ents or ents[0].name != c.first:
            raise DecodeError(f"leaf chunk {c.id.hex()} does not start at {c.first!r} as its index says")
        if len(ents) != c.count or _tree_size(ents) != c.size:
            raise DecodeError(f"leaf chunk {c.id.hex()} holds {len(ents)} entries of {_tree_size(ents)} bytes; "
                              f"its index says {c.count} of {c.size}")
        last = ents[-1].name.encode()
    else:
        if not isinstance(node, TreeIndex) or node.level != parent.level - 1:
            raise DecodeError(f"node {c.id.hex()} below a level-{parent.level} tree index node is not "
                              f"an index node of level {parent.level - 1}")
        if node.children[0].first != c.first or node.count != c.count or node.size != c.size:
            raise DecodeError(f"tree index node {c.id.hex()} does not match its parent's entry "
                              "(first name, entries or size)")
        last = node.firsts[-1]
    if upper is not None and not last < upper:
        raise DecodeError(f"chunk {c.id.hex()} overlaps the next chunk of its split tree")


def _upper(parent: TreeIndex, i: int, upper: bytes | None) -> bytes | None:
    return parent.firsts[i + 1] if i + 1 < len(parent.children) else upper


# --- the one walk down a split tree ---------------------------------------------------
# "The leaf for a name" and "the leaf at a position" are written once, as generators
# that yield each step down, (parent, i, upper): the node's child ``i``, with the
# upper bound of its names, is wanted next; whoever drives the walk loads that child,
# checks it (check_child) and sends it back in.  So the same walk runs synchronously
# (``walk``: SplitTree, ops) and on the daemon's event loop (vfs/core.py drives it
# with awaits, loading nodes in worker threads); the walk returns (base, leaf):
# the position of the leaf's first entry and the leaf, or (base, None).


def path_to_name(root: Tree | TreeIndex, raw: bytes):
    """The walk to the leaf whose range holds the name ``raw`` (bytes): returns
    (base, leaf), leaf None if the name sorts before every entry."""
    node, upper, base = root, None, 0
    while isinstance(node, TreeIndex):
        i = node.find(raw)
        if i is None:
            return base, None
        base += sum(c.count for c in node.children[:i])
        upper = _upper(node, i, upper)
        node = yield node, i, upper
    return base, node


def path_to_position(root: Tree | TreeIndex, pos: int):
    """The walk to the leaf holding entry ``pos`` (IndexError outside 0..count-1):
    returns (base, leaf)."""
    if not 0 <= pos < (root.count if isinstance(root, TreeIndex) else len(root.entries)):
        raise IndexError(pos)
    node, upper, base = root, None, 0
    while isinstance(node, TreeIndex):
        for i, c in enumerate(node.children):
            if pos < base + c.count:
                break
            base += c.count
        upper = _upper(node, i, upper)
        node = yield node, i, upper
    return base, node


def walk(steps, child: Callable[[TreeIndex, int, "bytes | None"], object]):
    """Drive a walk (``path_to_*``) synchronously: ``child(parent, i, upper)``
    loads and checks each node on the way."""
    try:
        step = next(steps)
        while True:
            step = steps.send(child(*step))
    except StopIteration as done:
        return done.value


class SplitTree:
    """A split directory, read through ``load(id) -> Tree | TreeIndex`` (verified,
    cached by the caller).  Quacks like a Tree for readers: ``get``,
    ``position``, ``size``, ``entries``; plus ``count`` and ``leaf_at``."""

    __slots__ = ("id", "root", "_load", "_bounds")

    def __init__(self, tid: bytes, root: TreeIndex, load: Callable[[bytes], Tree | TreeIndex]):
        self.id = tid
        self.root = root
        self._load = load
        self._bounds = None  # (level-1 entries, their upper bounds): set by split_edit or edit_pays

    def child_at(self, j: int) -> Tree:
        """Leaf ``j`` of the level-1 entries split_edit listed, loaded and checked."""
        entries, bounds = self._bounds
        parent = TreeIndex(1, (entries[j],))
        return _load_checked(self._load, parent, 0, bounds[j], self.id)

    def load_leaf(self, c: IndexEntry) -> Tree:
        entries, _ = self._bounds
        return self.child_at(entries.index(c))

    @property
    def count(self) -> int:
        return self.root.count

    @property
    def size(self) -> int:
        return self.root.size

    def child(self, parent: TreeIndex, i: int, upper: bytes | None):
        """Child ``i`` of ``parent``, loaded and checked (CorruptObjectError if it
        is not what its index entry says: a malformed tree, never a wrong answer)."""
        return _load_checked(self._load, parent, i, upper, self.id)

    def leaf_for(self, name: str) -> Tree | None:
        """The leaf chunk whose range holds ``name`` (loading one chunk per level), or None."""
        return walk(path_to_name(self.root, name.encode()), self.child)[1]

    def get(self, name: str) -> TreeEntry | None:
        leaf = self.leaf_for(name)
        return leaf.get(name) if leaf is not None else None

    def position(self, name: str) -> int | None:
        """The index of ``name`` among all the directory's entries, or None."""
        base, leaf = walk(path_to_name(self.root, name.encode()), self.child)
        p = leaf.position(name) if leaf is not None else None
        return None if p is None else base + p

    def leaf_at(self, pos: int) -> tuple[int, Tree]:
        """(position of its first entry, the leaf chunk) holding entry ``pos``."""
        return walk(path_to_position(self.root, pos), self.child)

    def iter_leaves(self) -> Iterator[Tree]:
        """Every leaf chunk in order, each checked against its index entry."""
        def walk(node, upper):
            if isinstance(node, Tree):
                yield node
                return
            for i in range(len(node.children)):
                u = _upper(node, i, upper)
                yield from walk(self.child(node, i, u), u)
        return walk(self.root, None)

    def iter_entries(self) -> Iterator[TreeEntry]:
        for leaf in self.iter_leaves():
            yield from leaf.entries

    @property
    def entries(self) -> tuple[TreeEntry, ...]:
        """Every entry (loads every leaf; a reader of one name uses ``get``)."""
        return tuple(self.iter_entries())


def differing_leaves(a_id: bytes, a: Tree | TreeIndex, b_id: bytes, b: Tree | TreeIndex,
                     load) -> tuple[list[Tree], list[Tree]]:
    """The leaves of two directories (ids and root objects ``a``, ``b``) not
    shared by id: all a diff of the two must read.  A chunk or index node
    both hold (the same id) holds the same entries on both sides, so it is
    skipped unopened, at any level; a plain (unsplit) directory is its own
    one leaf.  ``load(id)`` as SplitTree's; every node loaded is checked."""
    # Items: [id, level (0: a leaf), the object or None, parent, index in parent, upper bound].
    def root_item(oid, node):
        return [oid, node.level if isinstance(node, TreeIndex) else 0, node, None, 0, None]

    sides = [[root_item(a_id, a)], [root_item(b_id, b)]]
    while True:
        ids = [{it[0] for it in side} for side in sides]
        common = ids[0] & ids[1]
        if common:
            sides = [[it for it in side if it[0] not in common] for side in sides]
        top = max((it[1] for side in sides for it in side), default=0)
        if top == 0:
            break
        for s, side in enumerate(sides):
            expanded = []
            for it in side:
                if it[1] != top:
                    expanded.append(it)
                    continue
                node = _item_node(it, load)
                for i, c in enumerate(node.children):
                    expanded.append([c.id, top - 1, None, node, i, _upper(node, i, it[5])])
            sides[s] = expanded
    return [_item_node(it, load) for it in sides[0]], [_item_node(it, load) for it in sides[1]]


def _item_node(it, load):
    node = it[2]
    if node is None:
        node = _load_checked(load, it[3], it[4], it[5], None)
    return node


def _load_checked(load, parent: TreeIndex, i: int, upper: bytes | None, tid: bytes | None):
    node = load(parent.children[i].id)
    try:
        check_child(parent, i, node, upper)
    except DecodeError as exc:
        what = f"split tree {tid.hex()}" if tid is not None else "a split tree"
        raise CorruptObjectError(f"{what} is malformed: {exc}") from None
    return node
