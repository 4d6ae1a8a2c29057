"""The review UI at the HTTP level (commitfs ui): every page, status code and
error case, against a real uvicorn server over a local and an S3 repository.

Requests go out through http.client with their path as written, so ``..``
and encoded slashes reach the server unnormalised.
"""

from __future__ import annotations

import html
import http.client
import io
import logging
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from core_fixtures import cli_env, faulty_repository, reopen
from web_fixtures import png_bytes, serve_ui

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ui(ui_site):
    return ui_site.client


@pytest.fixture
def ui_sample(ui_site):
    return ui_site.sample


def rows(page: str, table_id: str) -> list[str]:
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert m, f"no table {table_id}"
    return re.findall(r"<tr.*?</tr>", m.group(1), re.S)[1:]  # without the header row


def error_message(body: bytes) -> str:
    m = re.search(rb'id="error-message">(.*?)</p>', body, re.S)
    assert m, body[:300]
    return html.unescape(m.group(1).decode())


# --- pages -------------------------------------------------------------------
def test_repository_page_lists_branches_tags_and_recent_commits(ui, ui_sample):
    page = ui.text("/")
    branches = rows(page, "branches")
    assert [re.search(r'branch=(\w+)', r).group(1) for r in branches] == ["main", "merged", "model"]
    assert ui_sample.v1[:12] in "".join(rows(page, "tags")) and ">v1<" in page
    commits = rows(page, "commits")
    assert len(commits) == 2  # main's history, newest first
    assert "v2: relabel cat_1" in commits[0] and "v1: first labels" in commits[1]
    assert "tester@example" in commits[0] and ui_sample.v2[:12] in commits[0]
    assert re.search(r"\d+\.\d MiB", commits[0])  # the commit's size
    other = ui.text("/?branch=model")
    assert "train on v1" in "".join(rows(other, "commits"))


def test_commit_page_metadata_parents_and_changed_paths(ui, ui_sample):
    page = ui.text(f"/commit/{ui_sample.v2}")
    assert ui_sample.v2 in page and "v2: relabel cat_1" in page
    assert f'href="/commit/{ui_sample.v1}"' in page
    assert re.search(r"1 added.*1 removed.*3 modified", page, re.S)
    changes = rows(page, "changes")
    assert [re.search(r">([^<>]+)</a>", r).group(1) for r in changes] == [
        "images/cat_1.png", "images/new.png", "labels.csv", "notes.txt", "weights.safetensors"]
    assert f'href="/file/{ui_sample.v1}/notes.txt"' in changes[3]  # a removed file links to its old side
    # A merge commit shows both parents.
    merge = ui.text("/commit/merged")
    parents = re.search(r'id="parents">(.*?)</td>', merge, re.S).group(1)
    assert ui_sample.v2[:12] in parents and ui_sample.v1[:12] in parents
    assert f"/compare/{ui_sample.v1}/{ui_sample.merge}" in parents
    # Lineage inputs are links to the input commits.
    model = ui.text("/commit/model")
    inputs = re.search(r'id="inputs">(.*?)</td>', model, re.S).group(1)
    assert f'href="/commit/{ui_sample.v1}"' in inputs and "(v1)" in inputs
    assert f'href="/lineage/{ui_sample.model}"' in model


def test_tree_pages_a_large_directory_with_breadcrumb_and_commit_id(ui, ui_sample):
    page = ui.text("/tree/main/many")
    entries = rows(page, "entries")
    assert len(entries) == 200 and "f0000.txt" in entries[0] and "f0199.txt" in entries[-1]
    assert "1–200 of 450" in page and 'href="?offset=200"' in page and 'id="prev"' not in page
    assert ui_sample.v2 in re.search(r'id="commit-id"[^>]*>([0-9a-f]+)<', page).group(1)
    crumbs = re.search(r'id="breadcrumb">(.*?)</div>', page, re.S).group(1)
    assert 'href="/tree/main/"' in crumbs and 'href="/tree/main/many"' in crumbs
    last = ui.text("/tree/main/many?offset=400")
    assert len(rows(last, "entries")) == 50 and "401–450 of 450" in last and 'id="next"' not in last
    assert 'href="?offset=200"' in last
    # The permalink names the commit; a directory with a space and a Unicode name.
    root = ui.text("/tree/main/")
    assert f'href="/tree/{ui_sample.v2}/"' in root
    assert 'href="/tree/main/sub%20dir"' in root
    sub = ui.text("/tree/main/sub%20dir")
    assert 'href="/file/main/sub%20dir/%C3%A9%20x.txt"' in sub
    assert ui.get("/tree/main/many?offset=x")[0] == 400
    # A file's tree URL redirects to its file page.
    status, headers, _ = ui.get("/tree/main/labels.csv")
    assert status == 303 and headers["location"] == "/file/main/labels.csv"


def test_file_page_shows_images_text_json_and_binary(ui, ui_sample):
    img = ui.text("/file/main/images/cat_0.png")
    assert f'<img class="full" id="image" src="/raw/{ui_sample.v2}/images/cat_0.png"' in img
    text = ui.text("/file/main/sub%20dir/%C3%A9%20x.txt")
    assert '<pre id="text">unicode name' in text
    js = ui.text("/file/main/meta.json")
    assert '"classes": [\n    &#34;cat&#34;'.replace("&#34;", "&#34;") in js or "&#34;classes&#34;: [" in js
    binary = ui.text("/file/main/blob.bin")
    assert 'id="binary"' in binary and "3.0 MiB" in binary
    assert f'href="/raw/{ui_sample.v2}/blob.bin" download' in binary


def test_raw_bytes_content_type_etag_and_conditional_get(ui, ui_sample):
    from commitfs.ops import browse

    status, headers, body = ui.get("/raw/main/images/cat_0.png")
    assert status == 200 and body == ui_sample.files["images/cat_0.png"]
    assert headers["content-type"] == "image/png" and headers["accept-ranges"] == "bytes"
    r = reopen(ui_sample.url)
    fid = browse.lookup_path(r, r.resolve("main"), "images/cat_0.png").id.hex()
    assert headers["etag"] == f'"{fid}"' and headers["cache-control"] == "no-cache"
    assert ui.get("/raw/main/images/cat_0.png", {"If-None-Match": f'"{fid}"'})[0] == 304
    # A full commit id in the URL: the bytes never change.
    assert "immutable" in ui.get(f"/raw/{ui_sample.v2}/images/cat_0.png")[1]["cache-control"]
    # A dataset's text never renders as a page.
    _, headers, _ = ui.get("/raw/main/labels.csv")
    assert headers["content-type"].startswith("text/plain") and headers["x-content-type-options"] == "nosniff"
    status, headers, body = ui.get("/raw/main/images/cat_0.png", method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(ui_sample.files["images/cat_0.png"]))


def test_range_requests(ui, ui_sample):
    blob, size = ui_sample.blob, len(ui_sample.blob)
    for header, start, end in [("bytes=0-99", 0, 100), ("bytes=1048000-2200000", 1048000, 2200001),
                               ("bytes=3000000-", 3000000, size), ("bytes=-10", size - 10, size),
                               ("bytes=100-99999999", 100, size)]:
        status, headers, body = ui.get("/raw/main/blob.bin", {"Range": header})
        assert status == 206, header
        assert headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert body == blob[start:end], header
    for bad in ["bytes=5000000-", "bytes=10-5", "bytes=-0", "pages=1-2"]:
        status, headers, _ = ui.get("/raw/main/blob.bin", {"Range": bad})
        assert status == 416 and headers["content-range"] == f"bytes */{size}", bad
    status, _, body = ui.get("/raw/main/blob.bin", {"Range": "bytes=0-1,5-6"})  # several ranges: all of it
    assert status == 200 and body == blob
    # If-Range with another ETag: the whole (changed) file.
    status, _, body = ui.get("/raw/main/blob.bin", {"Range": "bytes=0-9", "If-Range": '"other"'})
    assert status == 200 and len(body) == size


def test_thumbnails_are_made_cached_and_placeholders_for_undecodable(ui, ui_sample, ui_site):
    status, headers, body = ui.get("/thumb/main/images/cat_2.png?size=128")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(body)) as im:
        assert im.size == (128, 102) and im.getpixel((64, 50))[2] > 150  # blue, scaled to fit
    cached = list((ui_site.base / "thumbs").rglob("*-128.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == body
    cached[0].write_bytes(b"from the cache")  # a second request is served from the disk cache
    try:
        assert ui.get("/thumb/main/images/cat_2.png?size=128")[2] == b"from the cache"
    finally:
        cached[0].write_bytes(body)
    status, headers, body = ui.get("/thumb/main/images/broken.png?size=128")
    assert status == 200 and headers["content-type"] == "image/svg+xml"
    assert "cannot decode" in headers["x-commitfs-placeholder"] and b"no preview" in body
    assert ui.get("/thumb/main/images/cat_2.png?size=77")[0] == 400
    grid = ui.text("/tree/main/images?view=grid")
    thumbs = re.findall(r'<img src="([^"]+)"', grid)
    assert thumbs == [f"/thumb/{ui_sample.v2}/images/{n}?size=128"
                      for n in ["broken.png", "cat_0.png", "cat_1.png", "cat_2.png", "new.png"]]
    assert "1–5 of 5" in grid


def test_compare_page_lists_changes_and_images_side_by_side(ui, ui_sample):
    page = ui.text("/compare/v1/main")
    assert re.search(r"1 added.*1 removed.*3 modified", page, re.S)
    pairs = re.findall(r'<div class="pair image-pair">(.*?)</div>\s*</div>|<div class="pair image-pair">(.*?)\n</div>', page, re.S)
    assert f'class="before" src="/raw/{ui_sample.v1}/images/cat_1.png"' in page
    assert f'class="after" src="/raw/{ui_sample.v2}/images/cat_1.png"' in page
    assert f'class="after" src="/raw/{ui_sample.v2}/images/new.png"' in page
    assert pairs
    assert ui.get("/compare/v1")[0] == 400
    assert "unknown revision 'nope'" in error_message(ui.get("/compare/v1/nope")[2])


def test_lineage_page_draws_inputs_and_downstream(ui, ui_sample):
    up = ui.text("/lineage/model")
    svg = re.search(r"<svg.*?</svg>", up, re.S).group(0)
    assert f'<a href="/commit/{ui_sample.v1}">' in svg and f'data-commit="{ui_sample.model}"' in svg
    assert "<path class=\"edge\"" in svg
    down = ui.text("/lineage/v1")
    assert f'<a href="/commit/{ui_sample.model}">' in down and 'class="node down"' in down


def test_table_pages_and_filter(ui, ui_sample):
    first = ui.text("/file/main/big.csv")
    table = rows(first, "table")
    assert len(table) == 100 and "<td>0</td><td>dog</td><td>val</td>" in table[0]
    assert "rows 1–100<" in first and 'href="?offset=100"' in first and 'id="prev"' not in first
    assert re.findall(r"<th>(\w+)</th>", first)[:4] == ["line", "id", "label", "split"]
    last = ui.text("/file/main/big.csv?offset=200")
    assert len(rows(last, "table")) == 50 and "rows 201–250 of 250" in last and 'id="next"' not in last
    dogs = ui.text("/file/main/big.csv?column=label&value=dog")
    cells = [re.findall(r"<td>([^<]*)</td>", r) for r in rows(dogs, "table")]
    assert len(cells) == 84 and all(c[1] == "dog" for c in cells)  # ids 0, 3, ... 249
    assert "rows 1–84 of 84" in dogs and "rows where label = “dog”" in dogs
    page2 = ui.text("/file/main/big.csv?column=split&value=val&offset=40")
    assert [re.findall(r"<td>([^<]*)</td>", r)[0] for r in rows(page2, "table")] == ["200", "205", "210", "215",
                                                                                    "220", "225", "230", "235",
                                                                                    "240", "245"]
    assert "rows 41–50 of 50" in page2
    none = ui.text("/file/main/big.csv?column=label&value=fish")
    assert "no rows match" in none
    missing = ui.text("/file/main/big.csv?column=colour&value=red")
    assert "no column &#39;colour&#39;" in missing and 'id="table-error"' in missing
    bad = ui.text("/file/main/bad.csv")
    assert re.search(r'id="table-error">bad\.csv, line 3: ', bad)
    jsonl = ui.text("/file/main/rows.jsonl")
    assert re.findall(r"<th>(\w+)</th>", jsonl) == ["line", "id", "tags", "note"]
    assert "<td>[&#34;a&#34;]</td>" in jsonl and "<td>second</td>" in jsonl

    parquet = ui.text("/file/main/table.parquet?column=label&value=bird&offset=45")
    assert [re.findall(r"<td>([^<]*)</td>", r) for r in rows(parquet, "table")] == [
        [str(i), "bird"] for i in range(137, 150, 3)]
    assert "rows 46–50 of 50" in parquet


def test_safetensors_header_as_a_table_of_tensors(ui):
    page = ui.text("/file/v1/weights.safetensors")
    tensors = rows(page, "tensors")
    assert len(tensors) == 2
    assert "<code>layer.bias</code></td><td>F32</td><td>[2]</td><td class=\"num\">8 B</td>" in tensors[0]
    assert "<code>layer.weight</code></td><td>F32</td><td>[2, 2]</td>" in tensors[1]
    broken = ui.text("/file/main/broken.safetensors")
    assert 'id="tensor-error">not a readable safetensors file: header length' in broken


def test_compare_shows_row_and_tensor_diffs(ui, ui_sample):
    page = ui.text("/compare/v1/main")
    table = re.search(r'<div class="table-diff">(.*?)</div>', page, re.S).group(1)
    assert "labels.csv" in table and "0 rows added" in table and "1 changed" in table
    assert '<td class="changed" title="was: cat"><del>cat</del> dog</td>' in table
    assert "<td>images/cat_1.png</td>" in table
    tensors = re.search(r'<div class="tensor-diff">(.*?)</div>', page, re.S).group(1)
    assert "1 added" in tensors and "1 changed" in tensors and "1 unchanged" in tensors
    assert re.search(r"<code>head.weight</code></td><td>added", tensors)
    assert re.search(r"<code>layer.weight</code></td><td>changed, values", tensors)
    assert "layer.bias" not in tensors


def test_lineage_downstream_across_search_repositories(ui_sample, cache_home, tmp_path):
    """A commit in another repository made from v1 shows downstream when that
    repository is searched; its node names the repository (no page to link)."""
    import commitfs
    from core_fixtures import write_file

    other_url = str(tmp_path / "other")
    write_file(tmp_path / "out" / "m.bin", b"weights")
    with commitfs.Repository.init(other_url) as other:
        made = other.commit(tmp_path / "out", branch="main", message="a model in another repository",
                            inputs=[f"{ui_sample.url}@{ui_sample.v1}"])
    here = reopen(ui_sample.url)
    with serve_ui(here, search=[here, reopen(other_url)], cache_dir=tmp_path / "thumbs") as ui:
        page = ui.text(f"/lineage/{ui_sample.v1}")
    svg = re.search(r"<svg.*?</svg>", page, re.S).group(0)
    assert f'data-commit="{made}"' in svg and f"{other_url}@{made}" in svg
    assert f'<a href="/commit/{ui_sample.model}">' in svg  # the one in this repository links
    assert other_url in page  # listed as searched


# --- bad input ---------------------------------------------------------------
@pytest.mark.parametrize("path,status,says", [
    ("/tree/nope/", 404, "unknown revision 'nope'"),
    ("/file/main/images/nothing.png", 404, "images/nothing.png: no such path"),
    ("/raw/main/no/such", 404, "no: no such path"),
    ("/commit/0000000000000000000000000000000000000000000000000000000000000000", 404, "unknown revision"),
    ("/nowhere", 404, "no page '/nowhere'"),
    ("/raw/main/images", 404, "images is a directory"),
])
def test_not_found_pages_say_what(ui, path, status, says):
    got, headers, body = ui.get(path)
    assert got == status and headers["content-type"].startswith("text/html")
    assert says in error_message(body)


@pytest.mark.parametrize("path", [
    "/raw/main/../../../../etc/passwd",
    "/raw/main/images/../labels.csv",
    "/raw/main/%2e%2e/%2e%2e/etc/passwd",
    "/raw/main/..%2F..%2Fetc%2Fpasswd",
    "/raw/main/images%2Fcat_0.png",
    "/raw/main//etc/passwd",
    "/raw/main/%2Fetc%2Fpasswd",
    "/raw/main/./labels.csv",
    "/raw/main/labels.csv%00",
    "/raw/main/%ff",
    "/file/main/../../etc/passwd",
    "/tree/main/..",
    "/thumb/main/..%2Fimages/cat_0.png",
])
def test_traversal_attempts_never_leave_the_trees(ui, path):
    status, _, body = ui.get(path)
    assert status == 400, (path, status)
    assert b"root:" not in body and b"path,label" not in body


def test_corrupt_chunk_is_an_error_never_wrong_bytes(tiny_repo, tmp_path, caplog):
    """(A local repository: the test flips a byte of a pack on disk.)"""
    from commitfs.ops import browse
    from commitfs.repo.pack import pack_key

    r = reopen(tiny_repo)
    entry = browse.lookup_path(r, r.resolve("main"), "images/a.png")
    (chunk,) = r.load_manifest(entry.id).chunk_ids
    loc = r.locate(chunk)
    pack = r.store.local_path(pack_key(loc.pack))
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.stored // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR, logger="commitfs.web")
    with serve_ui(reopen(tiny_repo), cache_dir=tmp_path / "thumbs") as ui:
        status, _, body = ui.get("/raw/main/images/a.png")
        assert status == 500 and b"\x89PNG" not in body
        assert "corrupt data" in error_message(body)
        status, headers, body = ui.get("/thumb/main/images/a.png?size=128")
        assert status == 500 and headers["content-type"].startswith("text/html")  # a broken image, not a thumbnail
        assert ui.get("/raw/main/images/b.png")[0] == 200  # the others still serve
    assert any("corrupt" in rec.getMessage() and "a.png" in rec.getMessage() for rec in caplog.records)


def test_corrupt_chunk_late_in_a_file_ends_the_response_early(tiny_repo, tmp_path):
    """Past the first window the status line has gone out: the connection is cut
    short, and what arrived is a true prefix of the file."""
    from commitfs.ops import browse
    from commitfs.repo.pack import pack_key

    truth = (tmp_path / "tiny" / "big.bin").read_bytes()
    r = reopen(tiny_repo)
    entry = browse.lookup_path(r, r.resolve("main"), "big.bin")
    chunk = r.load_manifest(entry.id).chunk_ids[-1]
    loc = r.locate(chunk)
    pack = r.store.local_path(pack_key(loc.pack))
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.stored // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    with serve_ui(reopen(tiny_repo), cache_dir=tmp_path / "thumbs") as ui:
        conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=30)
        try:
            conn.request("GET", "/raw/main/big.bin")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("content-length") == str(len(truth))
            with pytest.raises(http.client.IncompleteRead) as exc:
                resp.read()
            got = exc.value.partial
        finally:
            conn.close()
        assert 0 < len(got) < len(truth) and got == truth[:len(got)]
        assert ui.get("/raw/main/images/b.png")[0] == 200


def test_slow_storage_times_out_the_page_and_serves_others(ui_sample, cache_home, tmp_path):
    repo = faulty_repository(ui_sample.url)
    # 2 s: long enough that a loaded machine answers the other pages in time, short
    # against the 60 s stall.
    with serve_ui(repo, cache_dir=tmp_path / "thumbs", timeout=2) as ui:
        repo.store.stall_s = 60
        try:
            t0 = time.monotonic()
            status, _, body = ui.get("/tree/main/images")
            assert status == 504 and "did not answer within 2 s" in error_message(body)
            assert time.monotonic() - t0 < 15
            # While that read still hangs in its thread, other pages answer.
            assert ui.get("/tree/main/%2e%2e")[0] == 400
            assert ui.get("/style.css")[0] == 200
        finally:
            repo.store.release()
        assert "cat_0.png" in ui.text("/tree/main/images")


@pytest.mark.parametrize("url, first_part, missing_id, missing_what, shown", [
    ("/commit/main", "commit_meta", "missing-changes", "the list of changed paths", 'id="commit-meta"'),
    ("/", "refs", "missing-commits", "the recent commits on main", 'id="branches"'),
    ("/compare/v1/main", "compare_changes", "missing-diffs", "the table and tensor diffs", "labels.csv"),
])
def test_slow_storage_after_the_first_part_shows_it_and_says_what_is_missing(
        ui_sample, cache_home, tmp_path, url, first_part, missing_id, missing_what, shown):
    from commitfs.web import routes

    # The keys the page's first part reads (its metadata, its references); every
    # other read stalls, so the part after it times out.
    probe = faulty_repository(ui_sample.url)
    if first_part == "commit_meta":
        routes._commit_meta(probe, "main")
    elif first_part == "compare_changes":
        routes._compare_changes(probe, "v1", "main")
    else:
        routes._refs_data(probe, None)
    first_keys = set(probe.store.keys_read)
    assert first_keys
    repo = faulty_repository(ui_sample.url)
    with serve_ui(repo, cache_dir=tmp_path / "thumbs", timeout=2) as ui:
        repo.store.stall_keys = lambda key: key not in first_keys
        repo.store.stall_s = 60
        try:
            status, _, body = ui.get(url)
            page = body.decode()
            assert status == 200, page[:300]
            assert 'id="partial-notice"' in page and shown in page
            m = re.search(rf'id="{missing_id}">(.*?)</p>', page, re.S)
            assert m, page
            assert html.unescape(m.group(1)) == (f"the repository did not answer within 2 s: {missing_what} "
                                                 "is missing; reload to try again")
            if url == "/":
                assert "main" in "".join(rows(page, "branches")) and 'id="commits"' not in page
            elif url.startswith("/compare/"):
                assert 'class="rowdiff"' not in page
            else:
                assert ui_sample.v2 in page and 'id="parents"' in page and "v2: relabel cat_1" in page
            assert ui.get("/style.css")[0] == 200  # the stalled read holds up no other page
        finally:
            repo.store.release()
        page = ui.text(url)
        assert 'id="partial-notice"' not in page and missing_id not in page
        if url == "/":
            assert "v1: first labels" in "".join(rows(page, "commits"))
        elif url.startswith("/compare/"):
            assert 'class="rowdiff"' in page
        else:
            assert "labels.csv" in page


def test_slow_storage_under_a_grid_gives_its_thumbnails_a_timed_out_placeholder(ui_sample, cache_home, tmp_path):
    from commitfs.web import routes

    probe = faulty_repository(ui_sample.url)
    routes._tree_data(probe, "main", "images", 0, True)
    listing_keys = set(probe.store.keys_read)  # what the grid page reads: its entries
    repo = faulty_repository(ui_sample.url)
    with serve_ui(repo, cache_dir=tmp_path / "thumbs", timeout=2) as ui:
        repo.store.stall_keys = lambda key: key not in listing_keys  # the images' bytes stall
        repo.store.stall_s = 60
        try:
            page = ui.text("/tree/main/images?view=grid")
            assert "cat_0.png" in page
            status, headers, body = ui.get("/thumb/main/images/cat_0.png?size=128")
            assert status == 504 and headers["content-type"].startswith("image/svg+xml")
            assert b"timed out" in body and "did not answer within 2 s" in headers["x-commitfs-placeholder"]
            assert headers["cache-control"] == "no-store"
        finally:
            repo.store.release()
        status, headers, body = ui.get("/thumb/main/images/cat_0.png?size=128")
        assert status == 200 and headers["content-type"] == "image/jpeg"


# --- the command line --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_prints_the_url_serves_and_stops_on_ctrl_c(tiny_repo):
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "commitfs", "-r", tiny_repo, "ui", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
            assert resp.status == 200 and b"tiny sample" in resp.read()
        # The port is now in use: a second server says so in one line.
        second = subprocess.run([sys.executable, "-m", "commitfs", "-r", tiny_repo, "ui", "--port", str(port)],
                                capture_output=True, text=True, env=cli_env(), timeout=30)
        assert second.returncode == 1
        assert second.stderr.strip() == f"commitfs: port {port} on 127.0.0.1 is in use (choose another with --port)"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_warns_when_listening_beyond_loopback(tiny_repo):
    proc = subprocess.Popen([sys.executable, "-m", "commitfs", "-r", tiny_repo, "ui", "--host", "0.0.0.0",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), text=True)
    try:
        warning = proc.stderr.readline()
        assert warning.startswith("commitfs: warning: listening on 0.0.0.0: the UI has no authentication")
        port = re.search(r"http://0\.0\.0\.0:(\d+)/", proc.stdout.readline()).group(1)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()  # SIGTERM stops it as cleanly as Ctrl-C
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "stopped" in err


def test_cli_bad_host_is_one_line(tiny_repo):
    from core_fixtures import cli_fails

    line = cli_fails("-r", tiny_repo, "ui", "--host", "no.such.host.invalid", "--port", "0")
    assert line.startswith("commitfs: cannot listen on no.such.host.invalid")


def test_empty_repository_page(local_repo, tmp_path):
    with serve_ui(local_repo, cache_dir=tmp_path / "thumbs") as ui:
        page = ui.text("/")
        assert "no branches yet" in page and "no tags" in page
        assert "unknown revision 'main'" in error_message(ui.get("/tree/main/")[2])


def test_cli_without_a_repository_is_one_line(cache_home, tmp_path):
    from core_fixtures import cli_fails

    line = cli_fails("-r", str(tmp_path / "nothing"), "ui", "--port", "0")
    assert line.startswith("commitfs: no commitfs repository at")


@pytest.mark.timeout(90)
def test_a_100k_entry_directory_is_served_page_by_page(tiny_repo, tmp_path):
    """The issue's size: 100,000 entries (one file's id under many names, the
    tree built directly); each page lists 200, the last page the rest."""
    from commitfs.model.objects import Commit, Kind, Tree, TreeEntry
    from commitfs.ops import browse

    r = reopen(tiny_repo)
    head = r.resolve("main")
    one = browse.lookup_path(r, head, "images/a.png")
    n = 100_000
    with r.writer() as w:
        big = w.add_tree(Tree.build(TreeEntry(f"f{i:06d}.png", Kind.FILE, one.size, one.id) for i in range(n)))
        root = w.add_tree(Tree.build([TreeEntry("big", Kind.DIR, one.size * n, big)]))
    cid = r.save_commit(Commit(root, (head,), "tester@example", 1, "100k entries", {}))
    r.refs.set_branch_if_equals("wide", cid, None)
    with serve_ui(reopen(tiny_repo), cache_dir=tmp_path / "thumbs") as ui:
        status, _, body = ui.get("/tree/wide/big")
        page = body.decode()
        assert status == 200 and len(rows(page, "entries")) == 200 and "1–200 of 100000" in page
        assert len(body) < 200_000  # a page, not the directory
        last = ui.text("/tree/wide/big?offset=99900")
        assert len(rows(last, "entries")) == 100 and "f099999.png" in last and 'id="next"' not in last
        grid = ui.text("/tree/wide/big?view=grid&offset=60")
        assert len(re.findall(r'<img src="/thumb/', grid)) == 60 and "61–120 of 100000" in grid


def test_ctrl_c_stops_at_once_while_a_read_hangs(tiny_repo):
    """A read stuck in storage (here a pack replaced by a FIFO no one writes:
    open() blocks) times its page out, and Ctrl-C still ends the process."""
    import os
    import urllib.error
    import urllib.request

    from commitfs.ops import browse
    from commitfs.repo.pack import pack_key

    r = reopen(tiny_repo)
    entry = browse.lookup_path(r, r.resolve("main"), "big.bin")
    pack = r.store.local_path(pack_key(r.locate(r.load_manifest(entry.id).chunk_ids[-1]).pack))
    pack.unlink()
    os.mkfifo(pack)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "commitfs", "-r", tiny_repo, "ui", "--port", str(port),
                             "--timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            text=True)
    try:
        assert f":{port}/" in proc.stdout.readline()
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/raw/main/big.bin", timeout=30)
        assert exc.value.code == 504
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        try:  # a reader still stuck in open(): let it return (it reads nothing)
            os.close(os.open(pack, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        pack.unlink()
