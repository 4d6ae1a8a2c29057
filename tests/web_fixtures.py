"""Fixtures for the web UI tests (commitfs ui): a sample repository and a real
uvicorn server on a free port, stopped even if the test fails.

* ``ui_site`` (per module and backend): a repository (local, then S3) with
  two commits of images, a table, JSON, text, binary and a 450-entry
  directory, a tag, a merge commit and a commit recording a lineage input
  (``.sample``), and the UI over it (``.client``).
* ``tiny_repo``: a local repository with one commit of two images.
* ``serve_ui(repo, **options)``: a context manager running the UI over
  ``repo`` in a thread; yields a ``Client`` that sends raw request paths
  (no client-side normalisation of ``..``, so traversal attempts reach the
  server as written).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core_fixtures import write_file


from PIL import Image

from commitfs.model.objects import Commit
from commitfs.ops.snapshot import commit_directory
from commitfs.web import server as web_server
from commitfs.web.app import create_app


def png_bytes(color, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A .safetensors file: {name: (dtype, shape, raw bytes)}, written by hand."""
    import json
    import struct

    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def parquet_bytes(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.table(columns), out, row_group_size=64)
    return out.getvalue()


def f32(*values: float) -> bytes:
    import struct

    return struct.pack(f"<{len(values)}f", *values)


@dataclass
class Sample:
    url: str
    v1: str
    v2: str
    merge: str
    model: str
    data: Path
    blob: bytes
    files: dict = field(default_factory=dict)


def make_sample(url: str, tmp_path: Path) -> Sample:
    import commitfs

    rng = random.Random(14)
    data = tmp_path / "data"
    files = {
        "images/cat_0.png": png_bytes((200, 30, 30)),
        "images/cat_1.png": png_bytes((30, 200, 30)),
        "images/cat_2.png": png_bytes((30, 30, 200), (200, 160)),
        "images/broken.png": b"this is not a PNG at all\n",
        "labels.csv": b"path,label,score\nimages/cat_0.png,cat,0.9\nimages/cat_1.png,cat,0.8\nimages/cat_2.png,dog,0.7\n",
        "meta.json": b'{"classes": ["cat", "dog"], "version": 1}',
        "notes.txt": "Notes on the sample ✓\n".encode(),
        "sub dir/é x.txt": b"unicode name\n",
    }
    files["big.csv"] = ("id,label,split\n" + "".join(
        f"{i},{'dog' if i % 3 == 0 else 'cat'},{'val' if i % 5 == 0 else 'train'}\n" for i in range(250))).encode()
    files["rows.jsonl"] = b'{"id": 1, "tags": ["a"]}\n{"id": 2, "note": "second"}\n'
    files["bad.csv"] = b'a,b\n1,2\n3,"x"y\n'
    files["weights.safetensors"] = safetensors_bytes({"layer.weight": ("F32", [2, 2], f32(1, 2, 3, 4)),
                                                      "layer.bias": ("F32", [2], f32(0.5, 0.25))})
    files["broken.safetensors"] = b"\xff" * 16
    files["table.parquet"] = parquet_bytes({"id": list(range(150)), "label": ["cat", "dog", "bird"] * 50})
    blob = rng.randbytes(3 << 20)  # several chunks: ranges cross chunk boundaries
    files["blob.bin"] = blob
    for i in range(450):
        files[f"many/f{i:04d}.txt"] = f"{i}\n".encode()
    for rel, content in files.items():
        write_file(data / rel, content)
    with commitfs.Repository.open(url) as api:
        r = api._repo
        v1 = commit_directory(r, data, message="v1: first labels").commit_id
        r.refs.create_tag("v1", v1)
        write_file(data / "images/cat_1.png", png_bytes((250, 250, 0)))
        write_file(data / "images/new.png", png_bytes((0, 0, 0)))
        (data / "notes.txt").unlink()
        write_file(data / "weights.safetensors", safetensors_bytes({
            "layer.weight": ("F32", [2, 2], f32(1, 2, 3, 5)), "layer.bias": ("F32", [2], f32(0.5, 0.25)),
            "head.weight": ("F32", [1], f32(9))}))
        write_file(data / "labels.csv",
                   b"path,label,score\nimages/cat_0.png,cat,0.9\nimages/cat_1.png,dog,0.8\nimages/cat_2.png,dog,0.7\n")
        v2 = commit_directory(r, data, message="v2: relabel cat_1").commit_id
        # A merge commit with both as parents (the tree of v2), on its own branch.
        c2 = r.load_commit(v2)
        merge = r.save_commit(Commit(c2.tree, (v2, v1), "tester@example", c2.time + 1, "merge v1 into v2", {}))
        r.refs.set_branch_if_equals("merged", merge, None)
        # A commit made from v1, recorded as its lineage input.
        out = tmp_path / "model"
        write_file(out / "weights.bin", b"\x00" * 100)
        model = api.commit(out, branch="model", message="train on v1", inputs=["v1"])
    return Sample(url, v1.hex(), v2.hex(), merge.hex(), model, data, blob, files)


@dataclass
class Site:
    client: "Client"
    sample: Sample
    base: Path


@contextlib.contextmanager
def _site(request, tmp_path_factory, backend: str):
    import boto3

    import commitfs
    from commitfs.repo.repository import Repository

    base = tmp_path_factory.mktemp("ui-site")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(base / "xdg-cache"))
        mp.setenv("COMMITFS_AUTHOR", "tester@example")
        mp.delenv("COMMITFS_REPO", raising=False)
        if backend == "local":
            url = str(base / "repo")
        else:
            s3 = request.getfixturevalue("s3_server")
            bucket = f"test-ui-{uuid.uuid4().hex[:12]}"
            client = boto3.client("s3", endpoint_url=s3.endpoint_url)
            client.create_bucket(Bucket=bucket)
            client.close()
            mp.setenv("COMMITFS_S3_ENDPOINT_URL", s3.endpoint_url)
            mp.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
            url = f"s3://{bucket}/repo"
        commitfs.Repository.init(url).close()
        sample = make_sample(url, base)
        repo = Repository.open(url)
        try:
            with serve_ui(repo, cache_dir=base / "thumbs") as client:
                yield Site(client, sample, base)
        finally:
            repo.close()


@pytest.fixture(scope="module", params=["local", "s3"])
def ui_site(request, tmp_path_factory):
    """The sample repository (local, then S3) and the UI over it, made once per
    test module and backend: the pages are read-only."""
    with _site(request, tmp_path_factory, request.param) as site:
        yield site


@pytest.fixture(scope="module")
def ui_local_site(request, tmp_path_factory):
    """The same on a local repository only (the browser tests)."""
    with _site(request, tmp_path_factory, "local") as site:
        yield site


@pytest.fixture
def tiny_repo(local_url, tmp_path):
    """A local repository with one commit on main: two images (a red, b green), big.bin (3 MiB)."""
    from commitfs.repo.repository import Repository

    write_file(tmp_path / "tiny" / "images" / "a.png", png_bytes((255, 0, 0)))
    write_file(tmp_path / "tiny" / "images" / "b.png", png_bytes((0, 255, 0)))
    write_file(tmp_path / "tiny" / "big.bin", random.Random(3).randbytes(3 << 20))
    with Repository.init(local_url) as r:
        commit_directory(r, tmp_path / "tiny", message="tiny sample")
    return local_url


class Client:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.base = f"http://{host}:{port}"

    def get(self, path: str, headers: dict | None = None, method: str = "GET", timeout: float = 30):
        """(status, headers as a lower-cased dict, body bytes); the path is sent as written."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        finally:
            conn.close()

    def text(self, path: str, status: int = 200, **kw) -> str:
        got, _, body = self.get(path, **kw)
        assert got == status, (path, got, body[:500])
        return body.decode()


@contextlib.contextmanager
def serve_ui(repo, **options):
    """The UI over ``repo`` on 127.0.0.1 and a free port, in a thread; always stopped."""
    sock = web_server.bind("127.0.0.1", 0)
    app = create_app(repo, **options)
    server = web_server.make_server(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the UI server did not start"
            time.sleep(0.01)
        yield Client("127.0.0.1", sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the UI server did not stop"
