"""The model layer: canonical codecs (property tests) and the chunker."""

from __future__ import annotations

import io
import json
import random

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from commitfs.model import chunker
from commitfs.model.ids import HEX_SIZE, ID_SIZE, from_hex, hash_bytes, is_hex, to_hex
from commitfs.model.objects import (
    COMMIT_TYPE,
    EMPTY_MANIFEST,
    EMPTY_TREE,
    MANIFEST_MAGIC,
    TREE_MAGIC,
    Commit,
    DecodeError,
    FileManifest,
    Kind,
    Tree,
    TreeEntry,
    _put_uvarint,
    check_name,
    symlink_entry,
)

# No per-example deadline anywhere: a loaded machine must not fail a property.
relaxed = settings(deadline=None)

# --- strategies ---------------------------------------------------------------------
ids = st.binary(min_size=ID_SIZE, max_size=ID_SIZE)
names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda n: n not in (".", "..")
)
sizes = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def tree_entries(draw, name=names):
    kind = draw(st.sampled_from(list(Kind)))
    n = draw(name)
    if kind is Kind.SYMLINK:
        # A target symlink(2) could make: not empty, no NUL (Tree.decode rejects others).
        return symlink_entry(n, draw(st.binary(min_size=1, max_size=100).filter(lambda t: b"\0" not in t)))
    return TreeEntry(n, kind, draw(sizes), draw(ids))


trees = st.lists(tree_entries(), max_size=12, unique_by=lambda e: e.name).map(Tree.build)
manifests = st.lists(st.tuples(ids, st.integers(min_value=1, max_value=2**40)), max_size=20).map(
    lambda cs: FileManifest(tuple(c for c, _ in cs), tuple(s for _, s in cs))
)
json_text = st.text(max_size=30)  # any Unicode scalar values, controls included
commits = st.builds(
    Commit,
    tree=ids,
    parents=st.lists(ids, max_size=3).map(tuple),
    author=json_text,
    time=st.integers(min_value=0, max_value=2**40),
    message=st.text(max_size=200),
    metadata=st.dictionaries(json_text, json_text, max_size=5),
)


def _round_trips(cls, obj):
    data = obj.encode()
    back = cls.decode(data)
    assert back == obj
    assert back.encode() == data
    assert hash_bytes(data) == obj.id
    return data


# --- ids -------------------------------------------------------------------------------
def test_ids_are_blake3_hex():
    oid = hash_bytes(b"abc")
    assert len(oid) == ID_SIZE
    assert oid.hex() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert from_hex(to_hex(oid)) == oid and len(to_hex(oid)) == HEX_SIZE
    assert is_hex("00ff") and not is_hex("00FF") and not is_hex("xyz")
    with pytest.raises(ValueError):
        from_hex("abcd")


# --- round trips ----------------------------------------------------------------------
@relaxed
@given(trees)
def test_tree_round_trip(tree):
    data = _round_trips(Tree, tree)
    assert data.startswith(TREE_MAGIC)
    for e in tree.entries:
        assert tree.get(e.name) == e


@relaxed
@given(manifests)
def test_manifest_round_trip(manifest):
    data = _round_trips(FileManifest, manifest)
    assert data.startswith(MANIFEST_MAGIC)
    assert manifest.size == sum(manifest.chunk_sizes)


@relaxed
@given(commits)
def test_commit_round_trip(commit):
    data = _round_trips(Commit, commit)
    json.loads(data)  # canonical JSON is still JSON


def test_empty_objects_round_trip():
    _round_trips(Tree, EMPTY_TREE)
    _round_trips(FileManifest, EMPTY_MANIFEST)
    assert EMPTY_MANIFEST.size == 0


@relaxed
@given(st.lists(tree_entries(), min_size=2, max_size=8, unique_by=lambda e: e.name), st.randoms())
def test_tree_id_independent_of_entry_order(entries, rnd):
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert Tree.build(entries).id == Tree.build(shuffled).id


@relaxed
@given(commits, st.dictionaries(json_text, json_text, min_size=2, max_size=6), st.randoms())
def test_commit_id_independent_of_metadata_order(commit, meta, rnd):
    items = list(meta.items())
    rnd.shuffle(items)
    a = Commit(commit.tree, commit.parents, commit.author, commit.time, commit.message, meta)
    b = Commit(commit.tree, commit.parents, commit.author, commit.time, commit.message, dict(items))
    assert a.encode() == b.encode()


def test_tree_sorts_by_utf8_bytes():
    # UTF-16 / code point order would put U+FF61 after U+10000; UTF-8 bytes do not.
    names_ = ["\U00010000", "\uff61", "B", "a", "é"]
    tree = Tree.build([TreeEntry(n, Kind.FILE, 0, hash_bytes(b"")) for n in names_])
    assert [e.name for e in tree.entries] == sorted(names_, key=lambda n: n.encode())


def test_commit_encoding_is_jcs():
    c = Commit(b"\x01" * 32, (), "a\u00e9\"\\\n\x01", 5, "m", {"b": "1", "a": "2", "\u00e9": "3"})
    text = c.encode().decode()
    assert text.startswith('{"author":"a\u00e9\\"\\\\\\n\\u0001",')
    assert '"metadata":{"a":"2","b":"1","\u00e9":"3"}' in text
    assert " " not in text.replace("\u00e9", "")


def test_commit_metadata_must_be_strings():
    with pytest.raises(TypeError):
        Commit(b"\x01" * 32, (), "a", 1, "m", {"k": 1}).encode()  # type: ignore[dict-item]


# --- canonical-encoding rejection -------------------------------------------------------
def _tree_bytes(*entries: tuple[bytes, bytes, int, bytes], count: int | None = None) -> bytes:
    """A tree encoding from raw (kind, name, size, id) parts, in the given order."""
    out = bytearray(TREE_MAGIC)
    _put_uvarint(out, len(entries) if count is None else count)
    for kind, name, size, oid in entries:
        out += kind
        _put_uvarint(out, len(name))
        out += name
        _put_uvarint(out, size)
        out += oid
    return bytes(out)


OID = hash_bytes(b"x")


def test_tree_rejects_unsorted_and_duplicate_names():
    ok = _tree_bytes((b"f", b"a", 1, OID), (b"f", b"b", 1, OID))
    Tree.decode(ok)
    with pytest.raises(DecodeError):
        Tree.decode(_tree_bytes((b"f", b"b", 1, OID), (b"f", b"a", 1, OID)))
    with pytest.raises(DecodeError):
        Tree.decode(_tree_bytes((b"f", b"a", 1, OID), (b"d", b"a", 1, OID)))


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"\xff"])
def test_tree_rejects_invalid_names(name):
    # A decoded tree must never name '..' or 'a/b': checkout and the mount
    # would write or resolve paths outside the tree.
    with pytest.raises(DecodeError):
        Tree.decode(_tree_bytes((b"f", name, 1, OID)))


@pytest.mark.parametrize("name", [b".", b"..", b"b/c", b"b\0", b"b\xff", b"\xc3", b"\xa9b"])
def test_tree_rejects_an_invalid_name_among_valid_ones(name):
    # Names are checked all at once (joined): a bad one anywhere must still fail,
    # and a multi-byte character may not straddle two names.
    entries = sorted([b"-", b"a\xc3\xa9", name, b"\xe2\x82\xac"])
    with pytest.raises(DecodeError):
        Tree.decode(_tree_bytes(*[(b"f", n, 1, OID) for n in entries]))
    good = Tree.decode(_tree_bytes(*[(b"f", n, 1, OID) for n in sorted([b"-", b"a\xc3\xa9", b"\xe2\x82\xac"])]))
    assert [e.name for e in good.entries] == ["-", "a\u00e9", "\u20ac"]


def test_tree_build_rejects_invalid_names():
    for bad in ["", ".", "..", "a/b", "a\0b", "\udcff"]:
        with pytest.raises(ValueError):
            Tree.build([TreeEntry(bad, Kind.FILE, 0, OID)])
        with pytest.raises(ValueError):
            check_name(bad)
    with pytest.raises(ValueError):
        Tree.build([TreeEntry("a", Kind.FILE, 0, OID), TreeEntry("a", Kind.DIR, 0, OID)])


def test_tree_rejects_unknown_kind_trailing_bytes_and_wrong_magic():
    with pytest.raises(DecodeError):
        Tree.decode(_tree_bytes((b"q", b"a", 1, OID)))
    with pytest.raises(DecodeError):
        Tree.decode(_tree_bytes((b"f", b"a", 1, OID)) + b"\0")
    with pytest.raises(DecodeError):
        Tree.decode(b"CFTREE2\n\0")
    with pytest.raises(DecodeError):
        Tree.decode(EMPTY_MANIFEST.encode())
    with pytest.raises(DecodeError):
        FileManifest.decode(EMPTY_TREE.encode())


def test_non_minimal_varints_are_rejected():
    # Entry count 1 written as 0x81 0x00 instead of 0x01.
    data = TREE_MAGIC + b"\x81\x00" + _tree_bytes((b"f", b"a", 1, OID))[len(TREE_MAGIC) + 1:]
    with pytest.raises(DecodeError):
        Tree.decode(data)
    with pytest.raises(DecodeError):
        FileManifest.decode(MANIFEST_MAGIC + b"\x80\x00")
    with pytest.raises(DecodeError):  # longer than 64 bits
        FileManifest.decode(MANIFEST_MAGIC + b"\xff" * 10 + b"\x01")


def test_manifest_rejects_empty_chunks():
    good = FileManifest((OID,), (5,)).encode()
    FileManifest.decode(good)
    with pytest.raises(DecodeError):
        FileManifest.decode(FileManifest((OID,), (0,)).encode())


def _commit_doc(**changes) -> dict:
    doc = {"type": COMMIT_TYPE, "tree": OID.hex(), "parents": [OID.hex()], "author": "a", "time": 7,
           "message": "m", "metadata": {"k": "v"}}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not _DROP}


_DROP = object()


def _canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_commit_rejects_non_canonical_json():
    Commit.decode(_canonical(_commit_doc()))  # the reference form decodes
    doc = _commit_doc()
    with pytest.raises(DecodeError):
        Commit.decode(json.dumps(doc, sort_keys=True).encode())  # whitespace
    with pytest.raises(DecodeError):
        Commit.decode(json.dumps(doc, separators=(",", ":")).encode())  # member order
    with pytest.raises(DecodeError):
        Commit.decode(_canonical(doc).replace(b'"m"', b'"\\u006d"'))  # needless escape
    with pytest.raises(DecodeError):
        Commit.decode(_canonical(doc) + b"\n")


@pytest.mark.parametrize("changes", [
    {"type": "commitfs-commit-2"},
    {"type": _DROP},
    {"tree": OID.hex().upper()},
    {"tree": "00"},                      # not a full id
    {"tree": "zz" * 32},
    {"parents": ["ab"]},
    {"parents": OID.hex()},              # a string, not a list
    {"parents": [5]},
    {"author": 5},
    {"author": ["a"]},
    {"message": {"a": "b"}},
    {"message": ["m"]},
    {"time": "7"},
    {"time": "later"},
    {"time": True},
    {"time": 7.5},
    {"time": None},
    {"metadata": {"k": 1}},
    {"metadata": {"k": ["v"]}},
    {"metadata": ["k", "v"]},
    {"metadata": "kv"},
    {"metadata": _DROP},
    {"extra": "member"},
])
def test_commit_rejects_malformed_members(changes):
    with pytest.raises(DecodeError):
        Commit.decode(_canonical(_commit_doc(**changes)))


def test_commit_rejects_non_objects_and_non_utf8():
    lone_surrogate = _canonical(_commit_doc(author="@")).replace(b'"@"', b'"\\ud800"')
    for data in [b"", b"[]", b"null", b"7", b'"x"', b"\xff\xfe", b"{", b"{}", lone_surrogate]:
        with pytest.raises(DecodeError):
            Commit.decode(data)


# --- truncated and garbage input: DecodeError, never anything else ----------------------
def _only_decode_error(cls, data: bytes):
    try:
        return cls.decode(data)
    except DecodeError:
        return None


@relaxed
@given(trees.filter(lambda t: t.entries), st.data())
def test_truncated_tree_raises_decode_error(tree, data):
    enc = tree.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(enc) - 1))
    with pytest.raises(DecodeError):
        Tree.decode(enc[:cut])


@relaxed
@given(manifests.filter(lambda m: m.chunk_ids), st.data())
def test_truncated_manifest_raises_decode_error(manifest, data):
    enc = manifest.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(enc) - 1))
    with pytest.raises(DecodeError):
        FileManifest.decode(enc[:cut])


@relaxed
@given(commits, st.data())
def test_truncated_commit_raises_decode_error(commit, data):
    enc = commit.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(enc) - 1))
    with pytest.raises(DecodeError):
        Commit.decode(enc[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([Tree, FileManifest, Commit]), st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: TREE_MAGIC + b),
    st.binary(max_size=300).map(lambda b: MANIFEST_MAGIC + b),
))
def test_garbage_raises_only_decode_error(cls, data):
    _only_decode_error(cls, data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([Tree, FileManifest]), st.one_of(trees, manifests), st.data())
def test_mutated_encodings_raise_only_decode_error(cls, obj, data):
    enc = bytearray(obj.encode())
    assume(len(enc) > 0)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(enc) - 1))
        enc[i] = data.draw(st.integers(0, 255))
    decoded = _only_decode_error(cls, bytes(enc))
    if decoded is not None:  # whatever decodes is canonical: it re-encodes to the same bytes
        assert decoded.encode() == bytes(enc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "type": st.just(COMMIT_TYPE) | json_values,
    "tree": st.just(OID.hex()) | json_values,
    "parents": st.just([OID.hex()]) | json_values,
    "author": st.text(max_size=5) | json_values,
    "time": st.integers(0, 10) | json_values,
    "message": st.text(max_size=5) | json_values,
    "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2) | json_values,
}))
@example({"type": COMMIT_TYPE, "tree": OID.hex(), "parents": [], "author": "a", "time": "x",
          "message": "m", "metadata": {}})
def test_commit_decode_of_any_json_raises_only_decode_error(doc):
    commit = _only_decode_error(Commit, _canonical(doc))
    if commit is not None:  # whatever decodes is a well-typed commit
        assert len(commit.tree) == ID_SIZE and all(len(p) == ID_SIZE for p in commit.parents)
        assert isinstance(commit.author, str) and isinstance(commit.message, str)
        assert type(commit.time) is int
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in commit.metadata.items())


# --- chunker -----------------------------------------------------------------------------
def _data(seed: int, size: int, kind: str = "random") -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    line = b"".join(f"{i},{rng.randrange(1000)}\n".encode() for i in range(2000))
    return (line * (size // len(line) + 1))[:size]


def test_chunker_parameters_and_determinism():
    data = _data(1, 3 << 20)
    a = chunker.chunk_bytes(data)
    assert a == chunker.chunk_bytes(data)
    assert b"".join(a) == data
    assert all(chunker.MIN_SIZE <= len(c) <= chunker.MAX_SIZE for c in a[:-1])
    assert 0 < len(a[-1]) <= chunker.MAX_SIZE
    # About the average size: 3 MiB of random data gives tens of chunks, not 1 or 200.
    assert 3 * 1024 * 1024 // chunker.MAX_SIZE < len(a) < 3 * 1024 * 1024 // chunker.MIN_SIZE


def test_chunker_small_and_empty_inputs():
    assert chunker.chunk_bytes(b"") == []
    assert list(chunker.iter_chunks(io.BytesIO(b""))) == []
    assert chunker.chunk_bytes(b"x") == [b"x"]
    small = _data(2, chunker.MIN_SIZE)
    assert chunker.chunk_bytes(small) == [small]
    assert list(chunker.iter_chunks(io.BytesIO(small))) == [small]


def test_chunker_cuts_zeros_at_max_size():
    chunks = chunker.chunk_bytes(_data(0, 1 << 20, "zeros"))
    assert {len(c) for c in chunks} == {chunker.MAX_SIZE}


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, 3 << 20),
    window=st.integers(1, 1 << 20),
    kind=st.sampled_from(["random", "text", "zeros"]),
)
@example(seed=3, size=chunker.MAX_SIZE * 3, window=chunker.MAX_SIZE, kind="random")
@example(seed=4, size=1 << 20, window=1, kind="text")
def test_streaming_equals_whole_buffer(seed, size, window, kind):
    data = _data(seed, size, kind)
    whole = chunker.chunk_bytes(data)
    streamed = list(chunker.iter_chunks(io.BytesIO(data), window=max(window, 4096)))
    assert streamed == whole
    assert b"".join(streamed) == data


class _TrickleReader(io.RawIOBase):
    """A stream that returns fewer bytes than asked (as pipes and sockets do)."""

    def __init__(self, data: bytes, rng: random.Random):
        self.data, self.pos, self.rng = data, 0, rng

    def readable(self):
        return True

    def read(self, n=-1):
        n = min(n, self.rng.randint(1, 200_000))
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def test_streaming_with_short_reads_equals_whole_buffer():
    data = _data(5, 2 << 20)
    assert list(chunker.iter_chunks(_TrickleReader(data, random.Random(1)), window=1 << 20)) == \
        chunker.chunk_bytes(data)


@pytest.mark.parametrize("where", [0.0, 0.37, 0.5, 0.999])
def test_local_edit_changes_few_chunks(where):
    data = bytearray(_data(6, 8 << 20))
    before = chunker.chunk_bytes(bytes(data))
    pos = int(len(data) * where)
    data[pos:pos + 100] = bytes(100)
    after = chunker.chunk_bytes(bytes(data))
    new = [c for c in after if c not in set(before)]
    assert 1 <= len(new) <= 3
    assert sum(map(len, new)) <= 3 * chunker.MAX_SIZE
    assert len(before) > 60  # the other ~100 chunks are shared


def test_insertion_resynchronises():
    data = _data(7, 4 << 20)
    edited = data[:1_000_000] + b"inserted bytes" + data[1_000_000:]
    before = set(chunker.chunk_bytes(data))
    new = [c for c in chunker.chunk_bytes(edited) if c not in before]
    assert 1 <= len(new) <= 3


# --- the compiled tree decoder (commitfs.model._fastdecode) ---------------------------------
def _compiled():
    from commitfs.model import objects as objects_mod
    assert objects_mod._fastdecode is not None, "commitfs.model._fastdecode is not built (pip install -e .)"
    return objects_mod


def _python_decode(data: bytes) -> Tree | None:
    """Tree.decode's Python loop alone (None for DecodeError)."""
    objects_mod = _compiled()
    fast, objects_mod._fastdecode = objects_mod._fastdecode, None
    try:
        return Tree.decode(data)
    except DecodeError:
        return None
    finally:
        objects_mod._fastdecode = fast


def _compiled_decode(data: bytes):
    objects_mod = _compiled()
    return objects_mod._fastdecode.tree_entries(data, TreeEntry, objects_mod._KIND_BY_BYTE, Kind.SYMLINK)


@relaxed
@given(trees)
def test_compiled_tree_decoder_makes_the_same_entries(tree):
    got = _compiled_decode(tree.encode())
    assert got == tree.entries
    assert all(type(e) is TreeEntry for e in got)
    assert Tree.decode(tree.encode()) == tree


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees.filter(lambda t: t.entries), st.data())
def test_compiled_tree_decoder_accepts_exactly_what_python_accepts(tree, data):
    """Altered encodings (a byte changed, inserted or removed, or cut): the compiled
    decoder gives the Python loop's entries or declines (None) where it raises."""
    enc = bytearray(tree.encode())
    at = data.draw(st.integers(min_value=0, max_value=len(enc) - 1))
    how = data.draw(st.sampled_from(["set", "insert", "delete", "cut"]))
    byte = data.draw(st.integers(min_value=0, max_value=255))
    if how == "set":
        enc[at] = byte
    elif how == "insert":
        enc.insert(at, byte)
    elif how == "delete":
        del enc[at]
    else:
        del enc[at:]
    got, want = _compiled_decode(bytes(enc)), _python_decode(bytes(enc))
    if want is None:
        assert got is None
    elif got is None:  # the one case it leaves to Python: a size of 10 varint bytes
        assert any(e.size >= 2**63 for e in want.entries)
    else:
        assert got == want.entries


def test_compiled_tree_decoder_declines_garbage():
    rng = random.Random(3)
    for n in range(2000):
        data = TREE_MAGIC + rng.randbytes(rng.randrange(0, 200))
        got = _compiled_decode(data)
        assert got is None or got == _python_decode(data).entries
    assert _compiled_decode(b"") is None and _compiled_decode(TREE_MAGIC + b"\x00") == ()


# --- the compiled tree encoder (commitfs.model._fastdecode.tree_encode) ---------------------
def _python_encode(tree: Tree) -> bytes:
    """Tree.encode's Python loop alone."""
    objects_mod = _compiled()
    fast, objects_mod._fastdecode = objects_mod._fastdecode, None
    try:
        return tree.encode()
    finally:
        objects_mod._fastdecode = fast


def _compiled_encode(tree: Tree):
    objects_mod = _compiled()
    return objects_mod._fastdecode.tree_encode(tree.entries, objects_mod._KIND_PAIRS, Kind.SYMLINK)


@relaxed
@given(trees)
def test_compiled_tree_encoder_makes_the_same_bytes(tree):
    got = _compiled_encode(tree)
    assert got is not None and got == _python_encode(tree)
    assert tree.encode() == got and Tree.decode(got) == tree


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**40, 2**63 - 1])
def test_compiled_tree_encoder_writes_every_varint_length(size):
    tree = Tree.build([TreeEntry("é" * 100, Kind.FILE, size, bytes(range(32))),
                       symlink_entry("l" * 200, b"t" * 300), TreeEntry("x", Kind.EXEC, size, bytes(32))])
    assert _compiled_encode(tree) == _python_encode(tree)


@pytest.mark.parametrize("entry, error", [
    (TreeEntry("a", Kind.FILE, -1, bytes(32)), ValueError),  # a negative size
    (TreeEntry("\udc80", Kind.FILE, 1, bytes(32)), UnicodeEncodeError),  # a lone surrogate
])
def test_compiled_tree_encoder_leaves_odd_entries_to_python(entry, error):
    """It declines (None) anything but plain entries, and Tree.encode then raises as the Python loop does."""
    tree = Tree((entry,))
    assert _compiled_encode(tree) is None
    with pytest.raises(error):
        tree.encode()
    big = Tree((TreeEntry("a", Kind.FILE, 2**64, bytes(32)),))  # beyond 63 bits: Python writes it
    assert _compiled_encode(big) is None and big.encode() == _python_encode(big)
