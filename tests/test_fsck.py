"""fsck: one test per check, each breaking one thing and expecting its report."""

from __future__ import annotations

import random

import pytest

from commitfs.model.ids import hash_bytes
from commitfs.model.objects import Commit, FileManifest, Kind, Tree, TreeEntry, symlink_entry
from commitfs.ops.fsck import fsck
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.index import INDEX_PREFIX, Index
from commitfs.repo.pack import BlobKind, Compression, pack_key
from commitfs.repo.repository import commit_key
from core_fixtures import reopen, write_file

CHUNKY = 300_000  # a file of several chunks


@pytest.fixture
def sample(repo, tmp_path):
    """A repository with two commits on main, a tag, a directory, a multi-chunk file and a symlink."""
    src = tmp_path / "src"
    rng = random.Random(40)
    write_file(src / "data" / "big.bin", rng.randbytes(CHUNKY))
    write_file(src / "data" / "small.txt", b"small")
    write_file(src / "top.txt", b"top")
    c1 = commit_directory(repo, src, message="one").commit_id
    write_file(src / "top.txt", b"top, changed")
    (src / "link").symlink_to("data/small.txt")
    c2 = commit_directory(repo, src, message="two").commit_id
    repo.refs.create_tag("v1", c1)
    return repo, c1, c2


def _problems(url, read_data=False):
    report = fsck(reopen(url), read_data=read_data)
    assert report.ok == (report.problems == [])
    return report.problems


def _manifest(repo, cid, path):
    r = reopen(repo.url)
    tree = r.load_tree(r.load_commit(cid).tree)
    for part in path.split("/")[:-1]:
        tree = r.load_tree(tree.get(part).id)
    entry = tree.get(path.split("/")[-1])
    return entry, r.load_manifest(entry.id), r


def _rewrite(store, key, fn):
    store.save_object(key, fn(store.load_object(key)))


def _commit_tree(repo, tree_entries, branch="broken"):
    """Store a hand-made tree (its blobs via a writer) and point a branch at it."""
    with repo.writer() as w:
        tid = w.add_tree(Tree.build(tree_entries))
    cid = repo.save_commit(Commit(tid, (), "t", 0, "hand-made"))
    repo.refs.set_branch_if_equals(branch, cid, None)
    return cid


def test_clean_repository(sample):
    repo, c1, c2 = sample
    report = fsck(reopen(repo.url), read_data=True)
    assert report.ok and report.problems == []
    assert report.commits == 2
    assert report.trees == 3  # two roots; data/ is the same tree in both
    assert report.files == 4  # big, small, top (twice, different content)
    assert report.chunks >= 5
    assert report.packs >= 2 and report.bytes_checked >= CHUNKY
    quick = fsck(reopen(repo.url))
    assert quick.ok and quick.bytes_checked == 0


def test_corrupt_index_segment(sample):
    repo, _, _ = sample
    key = next(iter(repo.store.iter_keys(INDEX_PREFIX)))
    _rewrite(repo.store, key, lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:])
    problems = _problems(repo.url)
    assert any(p.startswith("index: ") and "checksum" in p for p in problems)


def test_branch_names_a_missing_commit(sample):
    repo, _, c2 = sample
    ghost = hash_bytes(b"no such commit")
    repo.refs.set_branch_if_equals("ghost", ghost, None)
    assert _problems(repo.url) == [f"branch ghost: commit {ghost.hex()}: commit {ghost.hex()} does not exist"]


def test_tag_names_a_tampered_commit(sample):
    repo, c1, _ = sample
    _rewrite(repo.store, commit_key(c1), lambda d: d.replace(b'"one"', b'"ONE"'))
    problems = _problems(repo.url)
    assert problems and all("fails its hash check" in p for p in problems)
    assert any(p.startswith("tag v1: ") for p in problems) or any("parent of" in p for p in problems)


def test_missing_parent_commit(sample):
    repo, c1, c2 = sample
    repo.refs.create_tag("only-two", c2)
    repo.store.remove_object(commit_key(c1))
    problems = _problems(repo.url)
    # Reached first as c2's parent or through tag v1, depending on listing order.
    assert len(problems) == 1
    assert problems[0].startswith((f"parent of {c2.hex()[:12]}: commit {c1.hex()}", f"tag v1: commit {c1.hex()}"))
    assert problems[0].endswith("does not exist")


def test_missing_metadata_pack(sample):
    repo, _, c2 = sample
    r = reopen(repo.url)
    tree_pack = r.locate(r.load_commit(c2).tree).pack
    repo.store.remove_object(pack_key(tree_pack))
    problems = _problems(repo.url)
    assert any(p.startswith("tree ") and f"pack {tree_pack.hex()} is missing" in p for p in problems)


def test_truncated_data_pack(sample):
    repo, c1, _ = sample
    _, manifest, r = _manifest(repo, c1, "data/big.bin")
    last = r.locate(manifest.chunk_ids[-1])
    _rewrite(repo.store, pack_key(last.pack), lambda d: d[:last.offset + 1])
    problems = _problems(repo.url)
    # One line per damaged file, naming the chunk's damage, the commits and the paths.
    big = [p for p in problems if p.startswith("file data/big.bin (")]
    assert len(big) == 1, problems
    assert f"chunk {manifest.chunk_ids[-1].hex()}: pack {last.pack.hex()} is truncated" in big[0]
    assert f"of {len(manifest.chunk_ids)} chunks damaged" in big[0]
    assert "(branch main):data/big.bin" in big[0] and "(tag v1):data/big.bin" in big[0]


def test_chunk_missing_from_the_index(sample):
    repo, _, _ = sample
    ghost = hash_bytes(b"never stored chunk")
    with repo.writer() as w:
        fid = w.add_manifest(FileManifest((ghost,), (18,)))
    _commit_tree(repo, [TreeEntry("f", Kind.FILE, 18, fid)])
    problems = _problems(repo.url)
    assert len(problems) == 1 and problems[0].startswith(f"file f ({fid.hex()}): 1 of 1 chunks damaged")
    assert f"chunk {ghost.hex()}: " in problems[0] and "not in the repository index" in problems[0]


def test_file_size_disagrees_with_its_manifest(sample):
    repo, _, _ = sample
    data = b"twelve bytes"
    with repo.writer() as w:
        w.add(hash_bytes(data), BlobKind.CHUNK, data)
        fid = w.add_manifest(FileManifest((hash_bytes(data),), (len(data),)))
    cid = _commit_tree(repo, [TreeEntry("f", Kind.FILE, 13, fid)])
    assert _problems(repo.url) == [
        f"file f ({fid.hex()}): size 12 != tree's 13; reached from {cid.hex()[:12]} (branch broken):f"]


def test_symlink_target_disagrees_with_its_id(sample):
    repo, _, _ = sample
    good = symlink_entry("fine", b"target")
    bad = TreeEntry("bad", Kind.SYMLINK, 6, hash_bytes(b"other!"), b"target")
    cid = _commit_tree(repo, [good, bad])
    tid = reopen(repo.url).load_commit(cid).tree
    assert _problems(repo.url) == [f"tree {tid.hex()}: symlink 'bad' does not match its id"]


def test_tree_that_does_not_decode(sample):
    repo, _, _ = sample
    garbage = b"CFTREE1\n\x01q-not-a-kind"
    with repo.writer() as w:
        w.add(hash_bytes(garbage), BlobKind.TREE, garbage)
    _commit_tree(repo, [TreeEntry("sub", Kind.DIR, 0, hash_bytes(garbage))])
    problems = _problems(repo.url)
    assert len(problems) == 1 and problems[0].startswith(f"tree {hash_bytes(garbage).hex()}: ")
    assert "malformed" in problems[0]


def test_missing_subtree(sample):
    repo, _, _ = sample
    ghost = hash_bytes(b"no such tree")
    _commit_tree(repo, [TreeEntry("sub", Kind.DIR, 0, ghost)])
    problems = _problems(repo.url)
    assert len(problems) == 1 and problems[0].startswith(f"tree {ghost.hex()}: ")


def test_flipped_chunk_byte_needs_read_data(sample):
    repo, c1, _ = sample
    _, manifest, r = _manifest(repo, c1, "data/big.bin")
    loc = r.locate(manifest.chunk_ids[1])
    pos = loc.offset + 7
    _rewrite(repo.store, pack_key(loc.pack), lambda d: d[:pos] + bytes([d[pos] ^ 0xFF]) + d[pos + 1:])
    assert _problems(repo.url) == []  # lengths are fine: only re-hashing sees it
    problems = _problems(repo.url, read_data=True)
    damage = f"chunk {manifest.chunk_ids[1].hex()}: object {manifest.chunk_ids[1].hex()} fails its hash check " \
             f"(pack {loc.pack.hex()})"
    assert any(p.startswith("file data/big.bin (") and damage in p for p in problems), problems
    assert f"pack {pack_key(loc.pack)}: content does not match its name" in problems


def test_leftovers_of_an_interrupted_commit_are_not_problems(sample):
    repo, _, _ = sample
    before = fsck(reopen(repo.url), read_data=True)
    # What a commit killed before moving its branch leaves behind: a pack,
    # a segment naming its blobs, a commit object nothing references.
    leftover = random.Random(41).randbytes(5000)
    with repo.writer() as w:
        w.add(hash_bytes(leftover), BlobKind.CHUNK, leftover)
    repo.save_commit(Commit(hash_bytes(b"t"), (), "t", 1, "orphan"))
    # ...and a pack no segment names (killed between upload and index).
    from commitfs.repo.pack import PackBuilder
    b = PackBuilder()
    b.add(hash_bytes(b"orphan"), BlobKind.CHUNK, b"orphan", Compression.NONE, 6)
    pid, data = b.finish()
    repo.store.save_object(pack_key(pid), bytes(data))
    after = fsck(reopen(repo.url), read_data=True)
    assert after.ok
    assert before.unreferenced == {"commits": 0, "blobs": 0, "packs": 0}
    assert after.unreferenced["commits"] == 1 and after.unreferenced["blobs"] == 1  # counted, for gc
    assert after.unreferenced["packs"] == 2  # the indexed leftover pack and the unindexed one
    assert (after.commits, after.files, after.chunks) == (before.commits, before.files, before.chunks)
    assert after.packs == before.packs + 2  # read_data hashes every pack, referenced or not
    assert len(Index(repo.store).segments()) >= 2


# --- damage fsck names and repairs (issue 15), damage isolation and stalls (issue 20) -------
def test_a_ref_that_does_not_parse_is_damage_not_a_traceback(sample):
    repo, _, c2 = sample
    repo.store.save_ref_if_equals("branches/bad", b"zz-not-hex\n", None)
    repo.store.save_ref_if_equals("elsewhere/fine", c2.hex().encode() + b"\nmore\n", None)  # first line: fine
    repo.store.save_ref_if_equals("elsewhere/bad", b"nope\n", None)
    problems = _problems(repo.url)
    assert len(problems) == 2, problems
    assert "branches/bad" in problems[0] and "zz-not-hex" in problems[0]
    assert problems[1] == "ref elsewhere/bad: the ref does not parse (its first line is not a commit id: 'nope\\n')"
    from core_fixtures import run_cli
    proc = run_cli("-r", repo.url, "fsck")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert b"branches/bad" in proc.stdout and b"ref elsewhere/bad: the ref does not parse" in proc.stdout


def test_repair_rebuilds_a_lost_index_segment_and_names_what_it_cannot(sample):
    repo, c1, c2 = sample
    segs = sorted(repo.store.iter_keys(INDEX_PREFIX))
    for key in segs:
        repo.store.remove_object(key)
    assert _problems(repo.url)  # everything unindexed
    report = fsck(reopen(repo.url), repair=True, read_data=True)
    assert report.ok, report.problems
    assert any(r.startswith("index: rebuilt ") for r in report.repaired)
    assert fsck(reopen(repo.url), read_data=True).ok
    # A pack that is gone cannot be rebuilt: said so, as such.
    _, manifest, r = _manifest(repo, c1, "data/big.bin")
    lost = r.locate(manifest.chunk_ids[0]).pack
    repo.store.remove_object(pack_key(lost))
    report = fsck(reopen(repo.url), repair=True)
    assert report.problems and all(p.startswith("cannot repair: ") for p in report.problems)
    assert any("data/big.bin" in p for p in report.problems)


def test_a_damaged_index_segment_costs_only_the_lookups_it_holds(repo, tmp_path):
    from commitfs.errors import CorruptObjectError
    rng = random.Random(20)
    src = tmp_path / "src"
    write_file(src / "a.bin", rng.randbytes(CHUNKY))
    c1 = commit_directory(repo, src, message="one").commit_id
    (first,) = list(repo.store.iter_keys(INDEX_PREFIX))
    b = rng.randbytes(CHUNKY)
    write_file(src / "b.bin", b)
    commit_directory(repo, src, message="two")
    _rewrite(repo.store, first, lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:])
    r = reopen(repo.url)
    tree = r.load_tree(r.load_commit(r.refs.lookup_branch("main")).tree)
    assert bytes(r.load_file(tree.get("b.bin").id)) == b  # its lookups are in the healthy segment
    with pytest.raises(CorruptObjectError, match=f"{first}.*fsck --repair"):
        r.load_file(tree.get("a.bin").id)  # a clear error naming the damaged segment
    write_file(tmp_path / "other" / "c.bin", rng.randbytes(5000))
    commit_directory(r, tmp_path / "other", branch="other", message="writes still work")
    report = fsck(reopen(repo.url), repair=True, read_data=True)
    assert report.ok, report.problems
    assert any(f"the damaged segment {first}" in x for x in report.repaired)
    assert reopen(repo.url).load_file(tree.get("a.bin").id) == (src / "a.bin").read_bytes()
    del c1


@pytest.mark.timeout(60)
def test_fsck_under_a_stalled_store_stops_after_one_deadline(repo, tmp_path):
    from core_fixtures import faulty_repository
    rng = random.Random(21)
    src = tmp_path / "src"
    for i in range(60):
        write_file(src / f"f{i:02}.bin", rng.randbytes(3000))
    commit_directory(repo, src, message="sixty files")
    r = faulty_repository(repo.url)
    tree = r.load_tree(r.load_commit(r.refs.lookup_branch("main")).tree)  # warm: commits, trees,
    for e in tree.entries:                                                # manifests, index in memory
        r.load_manifest(e.id)
    r.store.stall_s, r.store.stall_timeout_s = 60, 0.2  # from here every read stalls, then times out
    before = r.store.calls["load_range"] + r.store.calls["load_object"]
    report = fsck(r, read_data=True)
    stalled = r.store.calls["load_range"] + r.store.calls["load_object"] - before
    assert stalled == 1, stalled  # one deadline for the run, not one per object
    assert report.stopped and len(report.problems) == 1
    assert report.problems[0].startswith("storage failed: injected stall") and "fsck stopped" in report.problems[0]
    r.store.release()
