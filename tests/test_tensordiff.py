"""Tensor diffs of real safetensors files (ops/tensordiff.py): added, removed,
reshaped, edited in place; unchanged tensors are not read (bytes counted)."""

from __future__ import annotations

import struct

import pytest
from core_fixtures import faulty_repository

from commitfs.ops.browse import lookup_path
from commitfs.ops.snapshot import commit_directory
from commitfs.ops.tensordiff import diff_safetensors

np = pytest.importorskip("numpy")  # in the test extra, with safetensors
st_numpy = pytest.importorskip("safetensors.numpy")

pytestmark = pytest.mark.timeout(60)
MiB = 1024 * 1024



def weights(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((1024, 1024)).astype(np.float32),      # 4 MiB, unchanged
        "layer1.weight": rng.standard_normal((1024, 1024)).astype(np.float32),  # 4 MiB, edited in place
        "layer2.weight": rng.standard_normal((512, 512)).astype(np.float32),    # reshaped
        "head.weight": rng.standard_normal((2048, 512)).astype(np.float16),      # 2 MiB, unchanged
        "old.bias": rng.standard_normal(64).astype(np.float32),                   # removed
    }


def test_tensors_added_removed_reshaped_edited_and_unchanged_unread(local_url, local_repo, versions):
    w = weights()
    old = versions("model.safetensors", st_numpy.save(w))
    w2 = dict(w)
    w2["layer1.weight"] = w["layer1.weight"].copy()
    w2["layer1.weight"][500, :8] += 1.0            # in place: 32 bytes in the middle
    w2["layer2.weight"] = w["layer2.weight"].reshape(256, 1024)
    w2["new.bias"] = np.ones(16, np.float32)
    del w2["old.bias"]
    new = versions("model.safetensors", st_numpy.save(w2))

    repo = faulty_repository(local_url)
    d = diff_safetensors(repo, old, new)
    assert not d.binary
    by = {c.name: c for c in d.changes}
    assert sorted(by) == ["layer1.weight", "layer2.weight", "new.bias", "old.bias"]
    assert by["new.bias"].status == "added" and by["old.bias"].status == "removed"
    l1, l2 = by["layer1.weight"], by["layer2.weight"]
    assert (l1.bytes_changed, l1.shape_changed, l1.dtype_changed) == (True, False, False)
    assert (l2.shape_changed, l2.bytes_changed) == (True, False)
    assert l2.new.shape == (256, 1024) and l2.old.shape == (512, 512)
    assert sorted(d.unchanged) == ["embed", "head.weight"]
    assert d.counts == {"added": 1, "removed": 1, "changed": 2, "unchanged": 2}
    # Headers and a few boundary chunks only: far less than one unchanged tensor.
    read = repo.store.bytes_read
    assert 0 < read < 2 * MiB, read
    assert d.bytes_read < 2 * MiB
    assert d.to_json()["counts"]["unchanged"] == 2

    # values: reads the edited tensor (both sides), gives the differences
    before = repo.store.bytes_read
    v = diff_safetensors(repo, old, new, values=True)
    c = next(c for c in v.changes if c.name == "layer1.weight")
    assert c.max_abs_diff == pytest.approx(1.0, abs=1e-5)
    expected = np.linalg.norm(np.ones(8)) / np.linalg.norm(w["layer1.weight"].astype(np.float64))
    assert c.rel_l2 == pytest.approx(expected, rel=1e-4)
    assert c.bytes_equal is False
    assert repo.store.bytes_read - before >= 8 * MiB


def test_bf16_values(local_repo, versions):
    a = np.arange(8, dtype=np.float32)
    bf = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    raw = lambda x: _safetensors({"t": ("BF16", [8], bf(x).tobytes())})  # noqa: E731
    d = diff_safetensors(local_repo, versions("m.safetensors", raw(a)), versions("m.safetensors", raw(a * 2)),
                         values=True)
    (c,) = d.changes
    assert c.max_abs_diff == 7.0 and c.rel_l2 == pytest.approx(1.0)


def _safetensors(tensors: dict) -> bytes:
    import json

    header, off, body = {}, 0, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        body += data
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@pytest.mark.parametrize("data,reason", [
    (b"short", "too short"),
    (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
    (struct.pack("<Q", 4) + b"nope", "not JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (_safetensors({"t": ("F32", [4], b"\0" * 8)}), "needs 16 bytes"),
])
def test_broken_header_is_a_binary_change(local_repo, versions, data, reason):
    good = versions("m.safetensors", _safetensors({"t": ("F32", [2], b"\0" * 8)}))
    bad = versions("m.safetensors", data)
    d = diff_safetensors(local_repo, good, bad)
    assert d.binary and d.reason.startswith("new side:") and reason in d.reason
    assert d.to_json()["binary"] is True


def test_added_and_removed_files(local_repo, versions):
    e = versions("m.safetensors", _safetensors({"t": ("F32", [2], b"\0" * 8)}))
    assert [c.status for c in diff_safetensors(local_repo, None, e).changes] == ["added"]
    assert [c.status for c in diff_safetensors(local_repo, e, None).changes] == ["removed"]


def test_on_both_backends(repo, tmp_path):
    """The same diffs over S3 (ranged reads through the moto server) as locally."""
    from commitfs.ops.tablediff import diff_table

    def commit(files: dict, n: int):
        d = tmp_path / f"b{n}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        return commit_directory(repo, d, message=str(n)).commit_id

    w = {"a": np.zeros((256, 256), np.float32), "b": np.ones((512, 256), np.float32)}
    c1 = commit({"m.safetensors": st_numpy.save(w), "t.csv": b"k,v\n1,a\n2,b\n"}, 1)
    w["a"] = w["a"] + 1
    c2 = commit({"m.safetensors": st_numpy.save(w), "t.csv": b"k,v\n1,a\n2,c\n"}, 2)
    e1, e2 = lookup_path(repo, c1, "m.safetensors"), lookup_path(repo, c2, "m.safetensors")
    d = diff_safetensors(repo, e1, e2, values=True)
    assert [c.name for c in d.changes] == ["a"] and d.unchanged == ["b"] and d.changes[0].max_abs_diff == 1.0
    t = diff_table(repo, lookup_path(repo, c1, "t.csv"), lookup_path(repo, c2, "t.csv"), "t.csv", keys=["k"])
    assert [(r.key, r.cells[0].new) for r in t.rows] == [(("2",), "c")]


def test_values_read_in_slices_give_the_same_figures(local_repo, versions, monkeypatch):
    from commitfs.ops import tensordiff

    rng = np.random.default_rng(3)
    x = rng.standard_normal(50_000).astype(np.float32)
    y = x.copy()
    y[[5, 20_000, 49_999]] += [0.25, -3.0, 1.0]
    old, new = versions("m.safetensors", st_numpy.save({"x": x})), versions("m.safetensors", st_numpy.save({"x": y}))
    whole = diff_safetensors(local_repo, old, new, values=True).changes[0]
    monkeypatch.setattr(tensordiff, "_VALUE_SLICE", 4096)
    sliced = diff_safetensors(local_repo, old, new, values=True).changes[0]
    assert whole.max_abs_diff == sliced.max_abs_diff == pytest.approx(3.0, abs=1e-6)
    expected = np.linalg.norm(y.astype(np.float64) - x.astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
    assert whole.rel_l2 == pytest.approx(expected, rel=1e-9) and sliced.rel_l2 == pytest.approx(expected, rel=1e-9)
