"""The command line (exit codes, --json shapes of docs/CLI.md, one-line errors)
and the Python API.

Most checks call ``commitfs.cli.main(argv)`` in-process (same code path, much
faster); the ones about the process itself (``python -m commitfs``, the
environment, binary stdout, dropped capabilities, a full disk) run it as a
subprocess.
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import commitfs
from commitfs.cli import main
from commitfs.errors import CommitfsError, RevisionError
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import Commit
from core_fixtures import (
    age_tree,
    assert_fsck_clean,
    assert_one_line_error,
    cli_fails,
    cli_ok,
    describe,
    make_random_tree,
    reopen,
    run_cli,
    write_file,
)

# The --json shapes documented in docs/CLI.md.
COMMIT_KEYS = {"id", "created", "tree", "files", "files_read", "bytes_read", "bytes_stored", "blobs_new", "tree_deltas", "warnings"}
COMMIT_OBJECT_KEYS = {"id", "tree", "parents", "author", "time", "message", "metadata"}
LS_KEYS = {"path", "name", "kind", "executable", "size", "id"}
DIFF_KEYS = {"status", "path", "old", "new"}
FSCK_KEYS = {"ok", "problems", "repaired", "commits", "trees", "files", "chunks", "packs", "bytes_checked",
             "unreferenced", "stopped"}


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys, cache_home):
    """Run ``main(argv)`` in-process; check the exit code; on 1 or 2, the one-line error."""

    def run(*argv, code: int = 0) -> Run:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: usage errors and --help
            rc = exc.code
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc}, expected {code}\nstdout: {out}\nstderr: {err}"
        if code in (1, 2) and not (argv and "fsck" in map(str, argv)):
            assert_one_line_error(rc, err, code)
        return Run(rc, out, err)

    return run


@pytest.fixture
def url(local_url, cli):
    """An initialised local repository.  The verbs do not depend on the
    backend (test_repo/test_snapshot/test_fsck run on both); the tests taking
    ``store_url`` run the command line against S3 too."""
    cli("-r", local_url, "init")
    return local_url


@pytest.fixture
def any_url(store_url, cli):
    """An initialised repository on both backends."""
    cli("-r", store_url, "init")
    return store_url


@pytest.fixture
def dataset(tmp_path):
    """A small dataset directory with a subdirectory, an executable and a symlink."""
    d = tmp_path / "dataset"
    write_file(d / "labels.csv", b"id,label\n1,cat\n2,dog\n")
    write_file(d / "train" / "img0.bin", random.Random(50).randbytes(100_000))
    write_file(d / "train" / "img1.bin", random.Random(51).randbytes(2_000))
    write_file(d / "tools" / "prep.sh", b"#!/bin/sh\n", executable=True)
    os.symlink("train/img0.bin", d / "first")
    return d


# --- the verbs and their --json shapes -----------------------------------------------------------
def test_init(cli, store_url):
    out = cli("-r", store_url, "init").out
    assert out.startswith("initialized commitfs repository at ")
    assert reopen(store_url).refs.branches() == {}
    assert "already" in cli("-r", store_url, "init", code=1).err


def test_commit_json_and_nothing_to_commit(cli, any_url, dataset):
    url = any_url
    first = cli("-r", url, "commit", dataset, "-m", "v1", "--meta", "source=test", "--json").json()
    assert set(first) == COMMIT_KEYS
    assert first["created"] is True and first["files"] == 4 and first["files_read"] == 4
    assert first["bytes_read"] == 102_000 + len(b"id,label\n1,cat\n2,dog\n") + len(b"#!/bin/sh\n")
    assert first["bytes_stored"] > 0 and first["blobs_new"] > 0 and first["warnings"] == []
    assert reopen(url).resolve("main").hex() == first["id"]

    again = cli("-r", url, "commit", dataset, "-m", "same", "--json").json()
    assert again == {"id": first["id"], "created": False, "warnings": []}
    plain = cli("-r", url, "commit", dataset, "-m", "same")
    assert plain.out.strip() == first["id"]
    assert plain.err.startswith("nothing to commit")
    assert reopen(url).load_commit(bytes.fromhex(first["id"])).metadata == {"source": "test"}

    write_file(dataset / "labels.csv", b"id,label\n1,cat\n2,cow\n")
    second = cli("-r", url, "commit", dataset, "-m", "v2", "-b", "main")
    cid = second.out.strip()
    assert len(cid) == 64 and cid != first["id"]
    assert cli("-r", url, "commit", dataset, "-m", "x", "--meta", "novalue", code=1).err.startswith("commitfs: --meta")


def test_log_show_ls_diff_json(cli, url, dataset):
    c1 = cli("-r", url, "commit", dataset, "-m", "first\n\nbody", "--meta", "k=v").out.strip()
    write_file(dataset / "labels.csv", b"changed")
    (dataset / "train" / "img1.bin").unlink()
    write_file(dataset / "new.txt", b"new")
    c2 = cli("-r", url, "commit", dataset, "-m", "second").out.strip()

    log = cli("-r", url, "log", "--json").json()
    assert [c["id"] for c in log] == [c2, c1]
    assert all(set(c) == COMMIT_OBJECT_KEYS for c in log)
    assert log[0]["parents"] == [c1] and log[1]["parents"] == []
    assert log[1]["metadata"] == {"k": "v"} and log[1]["message"] == "first\n\nbody"
    assert log[1]["author"] == "tester@example" and isinstance(log[1]["time"], int)
    assert [c["id"] for c in cli("-r", url, "log", "-n", "1", "--json").json()] == [c2]
    assert [c["id"] for c in cli("-r", url, "log", c1, "--json").json()] == [c1]
    oneline = cli("-r", url, "log", "--oneline").out.splitlines()
    assert oneline == [f"{c2[:12]} second", f"{c1[:12]} first"]
    text = cli("-r", url, "log").out
    assert f"commit {c1}" in text and "Meta:   k=v" in text and "    body" in text

    show = cli("-r", url, "show", "main~1", "--json").json()
    assert set(show) == COMMIT_OBJECT_KEYS | {"size", "changes"} and show["id"] == c1
    assert show["size"] == 102_000 + len(b"id,label\n1,cat\n2,dog\n") + len(b"#!/bin/sh\n")
    assert f"commit {c2}" in cli("-r", url, "show", c2[:8]).out

    top = cli("-r", url, "ls", "main", "--json").json()
    assert all(set(e) - {"target"} == LS_KEYS for e in top)
    by_name = {e["name"]: e for e in top}
    assert by_name["first"]["kind"] == "symlink" and by_name["first"]["target"] == "train/img0.bin"
    assert by_name["train"]["kind"] == "dir" and by_name["train"]["size"] == 100_000
    assert by_name["labels.csv"]["kind"] == "file" and by_name["labels.csv"]["executable"] is False
    assert "target" not in by_name["labels.csv"]
    deep = cli("-r", url, "ls", "main~1", "-R", "--json").json()
    paths = {e["path"]: e for e in deep}
    assert paths["tools/prep.sh"]["executable"] is True and "train/img1.bin" in paths
    assert [e["path"] for e in cli("-r", url, "ls", "main:train/img0.bin", "--json").json()] == ["train/img0.bin"]
    lines = cli("-r", url, "ls", "main").out.splitlines()
    assert any(line.startswith("drwxr-xr-x") and line.endswith("train/") for line in lines)
    assert any(line.startswith("lrwxrwxrwx") and line.endswith("first -> train/img0.bin") for line in lines)

    diff = cli("-r", url, "diff", "main~1", "main", "--json").json()
    assert all(set(c) == DIFF_KEYS for c in diff)
    assert {c["path"]: c["status"] for c in diff} == {
        "labels.csv": "modified", "new.txt": "added", "train/img1.bin": "removed"}
    mod = next(c for c in diff if c["status"] == "modified")
    assert set(mod["old"]) == set(mod["new"]) == {"kind", "size", "id"} and mod["new"]["size"] == 7
    assert next(c for c in diff if c["status"] == "added")["old"] is None
    text = cli("-r", url, "diff", "main~1", "main").out.splitlines()
    assert "M labels.csv (21 -> 7)" in text and "A new.txt (3)" in text and "D train/img1.bin (2000)" in text
    assert cli("-r", url, "diff", "main", "main", "--json").json() == []


def test_branch_and_tag(cli, url, dataset):
    c1 = cli("-r", url, "commit", dataset, "-m", "one").out.strip()
    assert cli("-r", url, "branch", "--json").json() == {"main": c1}
    cli("-r", url, "branch", "exp", "main")
    assert cli("-r", url, "branch", "--json").json() == {"main": c1, "exp": c1}
    assert "already exists" in cli("-r", url, "branch", "exp", "main", code=1).err
    write_file(dataset / "x", b"x")
    c2 = cli("-r", url, "commit", dataset, "-m", "two", "-b", "exp").out.strip()
    assert cli("-r", url, "branch", "--json").json() == {"main": c1, "exp": c2}
    assert cli("-r", url, "branch").out.splitlines() == [f"exp {c2}", f"main {c1}"]
    cli("-r", url, "branch", "-d", "exp")
    assert cli("-r", url, "branch", "--json").json() == {"main": c1}
    assert "no branch" in cli("-r", url, "branch", "-d", "exp", code=1).err
    assert "invalid branch name" in cli("-r", url, "branch", "bad..name", code=1).err

    cli("-r", url, "tag", "v1", "main")
    assert cli("-r", url, "tag", "--json").json() == {"v1": c1}
    assert "never move" in cli("-r", url, "tag", "v1", c2, code=1).err
    assert cli("-r", url, "tag", "--json").json() == {"v1": c1}
    assert cli("-r", url, "show", "v1", "--json").json()["id"] == c1
    assert "NAME and REV" in cli("-r", url, "tag", "v2", code=2).err


def test_fsck_json(cli, url, dataset):
    cli("-r", url, "commit", dataset, "-m", "one")
    report = cli("-r", url, "fsck", "--read-data", "--json").json()
    assert set(report) == FSCK_KEYS and report["ok"] is True and report["problems"] == []
    assert report["commits"] == 1 and report["files"] == 4 and report["bytes_checked"] > 100_000
    assert cli("-r", url, "fsck").out.strip().endswith(": no problems")
    ghost = hash_bytes(b"ghost")
    reopen(url).refs.set_branch_if_equals("ghost", ghost, None)
    broken = cli("-r", url, "fsck", "--json", code=1).json()
    assert broken["ok"] is False and len(broken["problems"]) == 1 and ghost.hex() in broken["problems"][0]
    text = cli("-r", url, "fsck", code=1).out.splitlines()
    assert text[-1].endswith(": 1 problems")


def test_checkout(cli, url, dataset, tmp_path):
    cli("-r", url, "commit", dataset, "-m", "one")
    r = cli("-r", url, "checkout", "main", tmp_path / "out")
    assert r.err.startswith("checked out 4 files")
    assert describe(tmp_path / "out") == describe(dataset)
    cli("-r", url, "checkout", "main:train", tmp_path / "sub")
    assert describe(tmp_path / "sub") == describe(dataset / "train")
    assert "not an empty directory" in cli("-r", url, "checkout", "main", tmp_path / "out", code=1).err


# --- revisions and the errors they give ---------------------------------------------------------
def test_revision_forms_and_errors(cli, url, dataset):
    c1 = cli("-r", url, "commit", dataset, "-m", "one").out.strip()
    write_file(dataset / "x", b"x")
    c2 = cli("-r", url, "commit", dataset, "-m", "two").out.strip()
    cli("-r", url, "tag", "t", c1[:10])
    show = lambda rev: cli("-r", url, "show", rev, "--json").json()["id"]  # noqa: E731
    assert show("main") == c2 and show("t") == c1 and show(c2) == c2 and show(c2[:6]) == c2
    assert show("main~1") == c1 and show("main~") == c1 and show("t~0") == c1
    assert "not that long" in cli("-r", url, "show", "main~2", code=1).err
    assert "unknown revision 'nope'" in cli("-r", url, "show", "nope", code=1).err
    assert "unknown revision" in cli("-r", url, "log", "0000" + c1[4:], code=1).err

    # Two commits sharing a 4-digit prefix.
    seen = {}
    for i in range(100_000):
        c = Commit(hash_bytes(b"t"), (), "t", i, "m")
        if c.id.hex()[:4] in seen:
            break
        seen[c.id.hex()[:4]] = c
    repo = reopen(url)
    repo.save_commit(c)
    repo.save_commit(seen[c.id.hex()[:4]])
    assert "ambiguous" in cli("-r", url, "show", c.id.hex()[:4], code=1).err


def test_paths_not_in_the_commit(cli, url, dataset, tmp_path):
    cli("-r", url, "commit", dataset, "-m", "one")
    assert "no such path" in cli("-r", url, "ls", "main:nope", code=1).err
    assert "no such path" in cli("-r", url, "cat", "main:train/nope.bin", code=1).err
    assert "no such path" in cli("-r", url, "checkout", "main:nope", tmp_path / "o", code=1).err
    assert "not a directory" in cli("-r", url, "ls", "main:labels.csv/x", code=1).err
    assert "is a directory" in cli("-r", url, "cat", "main:train", code=1).err
    assert "symlink" in cli("-r", url, "cat", "main:first", code=1).err
    assert "REV:PATH" in cli("-r", url, "cat", "main", code=2).err


def test_missing_and_non_repositories(cli, tmp_path, store_url):
    assert "commitfs init" in cli("-r", tmp_path / "absent", "log", code=1).err
    (tmp_path / "plain").mkdir()
    write_file(tmp_path / "plain" / "data.txt", b"not a repo")
    assert "no commitfs repository" in cli("-r", tmp_path / "plain", "log", code=1).err
    assert "no commitfs repository" in cli("-r", store_url, "fsck", code=1).err  # not initialised
    assert "no repository given" in cli("log", code=1).err
    assert "scheme" in cli("-r", "ftp://host/x", "log", code=1).err


def test_bad_inputs_to_commit_leave_the_repository_valid(cli, url, dataset, tmp_path, monkeypatch):
    head = cli("-r", url, "commit", dataset, "-m", "base").out.strip()
    assert "absent: No such file or directory" in cli("-r", url, "commit", tmp_path / "absent", "-m", "x", code=1).err
    assert "not a directory" in cli("-r", url, "commit", dataset / "labels.csv", "-m", "x", code=1).err
    os.symlink("loop", tmp_path / "loop")
    assert "symbolic links" in cli("-r", url, "commit", tmp_path / "loop", "-m", "x", code=1).err

    bad = os.fsencode(dataset) + b"/caf\xe9.txt"  # Latin-1, not UTF-8
    with open(bad, "wb") as f:
        f.write(b"x")
    err = cli("-r", url, "commit", dataset, "-m", "x", code=1).err
    assert "not valid UTF-8" in err and "caf\\xe9.txt" in err
    os.unlink(bad)

    # Special files: skipped with a warning, the rest committed; symlink loops stored as links.
    os.symlink("self", dataset / "self")
    os.symlink("..", dataset / "up")
    os.mkfifo(dataset / "fifo")
    monkeypatch.chdir(dataset)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    try:
        write_file(dataset / "more.txt", b"more")
        r = cli("-r", url, "commit", dataset, "-m", "with specials")
    finally:
        sock.close()
    warnings = r.err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("commitfs: warning: skipped ") for w in warnings)
    assert {w.split()[3] for w in warnings} == {"FIFO", "socket"}
    new_head = r.out.strip()
    assert reopen(url).load_commit(bytes.fromhex(new_head)).parents == (bytes.fromhex(head),)
    links = {e["name"]: e["target"] for e in cli("-r", url, "ls", "main", "--json").json() if e["kind"] == "symlink"}
    assert links == {"first": "train/img0.bin", "self": "self", "up": ".."}
    assert_fsck_clean(url, head=bytes.fromhex(new_head))


def test_json_output_is_valid_utf8_for_a_non_utf8_symlink_target(local_url, cache_home, tmp_path):
    src = tmp_path / "src"
    write_file(src / "f", b"x")
    os.symlink(b"caf\xe9", os.fsencode(src / "latin1-link"))  # names must be UTF-8; targets need not
    cli_ok("-r", local_url, "init")
    cli_ok("-r", local_url, "commit", str(src), "-m", "x")
    out = cli_ok("-r", local_url, "ls", "main", "--json", env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout
    entries = json.loads(out.decode("utf-8"))  # strict: the output is UTF-8
    target = next(e["target"] for e in entries if e["name"] == "latin1-link")
    assert target.startswith("caf") and "\ufffd" not in target
    checkout_dir = tmp_path / "out"
    cli_ok("-r", local_url, "checkout", "main", str(checkout_dir))
    assert os.readlink(os.fsencode(checkout_dir / "latin1-link")) == b"caf\xe9"  # the bytes are kept


def test_unknown_format_version(cli, any_url):
    url = any_url
    repo = reopen(url)
    config = json.loads(repo.store.load_object("config"))
    config["version"] = 7
    repo.store.save_object("config", json.dumps(config).encode())
    err = cli("-r", url, "log", code=1).err
    assert "format version 7" in err and "version 1" in err


# --- usage errors: exit 2 ----------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["commit", "somewhere"],           # -m is required
    ["log", "-n", "many"],
    ["show"],
    ["ls", "main", "--bogus"],
])
def test_usage_errors_exit_2(cli, argv):
    assert cli(*argv, code=2).err.rstrip().endswith("(see --help)")


def test_help_exits_0(cli):
    out = cli("--help").out
    for verb in ["init", "commit", "log", "show", "ls", "cat", "diff", "branch", "tag", "checkout", "fsck"]:
        assert verb in out


# --- as a process ------------------------------------------------------------------------------
def test_python_m_commitfs_round_trip(store_url, cache_home, tmp_path):
    """The real process: env var and -r both ways, binary stdout, exit codes, no traceback."""
    src = tmp_path / "src"
    payload = bytes(range(256)) * 1000 + b"\x00\xff"
    write_file(src / "blob.bin", payload)
    env = {**os.environ, "COMMITFS_REPO": store_url}
    cli_ok("init", env=env)
    cid = cli_ok("commit", str(src), "-m", "one", env=env).stdout.decode().strip()
    assert cli_ok("cat", "main:blob.bin", env=env).stdout == payload
    # -r before or after the verb, and -r wins over the environment.
    wrong = {**os.environ, "COMMITFS_REPO": str(tmp_path / "elsewhere")}
    assert json.loads(cli_ok("-r", store_url, "show", "main", "--json", env=wrong).stdout)["id"] == cid
    assert json.loads(cli_ok("log", "-r", store_url, "--json", env=wrong).stdout)[0]["id"] == cid
    line = cli_fails("cat", "main:nope", env=env)
    assert line.startswith("commitfs: ") and "nope" in line
    proc = run_cli("bogus-verb", env=env)
    assert_one_line_error(proc.returncode, proc.stderr.decode(), code=2)


def test_unreadable_file_and_directory_without_root_powers(local_url, cache_home, tmp_path):
    """chmod 000 really stops a reader once CAP_DAC_OVERRIDE is gone (tests run as root)."""
    setpriv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if subprocess.run(setpriv + ["true"]).returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    cli_ok("-r", local_url, "init")
    src = tmp_path / "src"
    write_file(src / "ok.txt", b"fine")
    head = cli_ok("-r", local_url, "commit", str(src), "-m", "base").stdout.decode().strip()

    secret = write_file(src / "secret.bin", b"s" * 10)
    secret.chmod(0)
    line = cli_fails("-r", local_url, "commit", str(src), "-m", "x", prefix=setpriv)
    assert "cannot read" in line and "secret.bin" in line and "Permission denied" in line
    secret.chmod(0o644)

    closed = src / "closed"
    write_file(closed / "inside.txt", b"in")
    closed.chmod(0)
    try:
        line = cli_fails("-r", local_url, "commit", str(src), "-m", "x", prefix=setpriv)
        assert "cannot list" in line and "closed" in line and "Permission denied" in line
    finally:
        closed.chmod(0o755)
    assert_fsck_clean(local_url, head=bytes.fromhex(head))


def test_full_disk(small_tmpfs, cache_home, tmp_path):
    url = str(small_tmpfs / "repo")
    cli_ok("-r", url, "init")
    src = tmp_path / "src"
    write_file(src / "small.txt", b"fits")
    head = cli_ok("-r", url, "commit", str(src), "-m", "fits").stdout.decode().strip()
    write_file(src / "big.bin", random.Random(52).randbytes(3 << 20))
    line = cli_fails("-r", url, "commit", str(src), "-m", "too big")
    assert "no space left on device" in line
    assert json.loads(cli_ok("-r", url, "fsck", "--read-data", "--json").stdout)["ok"] is True
    assert [c["id"] for c in json.loads(cli_ok("-r", url, "log", "--json").stdout)] == [head]


# --- the Python API ------------------------------------------------------------------------------
def test_python_api(store_url, cache_home, tmp_path):
    src = tmp_path / "src"
    expected = make_random_tree(src, random.Random(53), big=300_000)
    age_tree(src)
    repo = commitfs.Repository.init(store_url)
    repo.close()
    with commitfs.Repository.open(store_url) as repo:
        assert repo.url.rstrip("/").endswith(Path(store_url).name)
        cid = repo.commit(src, message="v1", metadata={"owner": "ml"})
        assert repo.resolve("main") == cid and repo.resolve(cid[:8]) == cid
        assert repo.commit(src, message="again") == cid  # nothing changed: the head's id
        assert repo.branches() == {"main": cid}
        assert repo.show("main")["metadata"] == {"owner": "ml"}
        assert [c["id"] for c in repo.log()] == [cid]

        walked = {i.path: i.entry for i in repo.walk("main")}
        assert set(walked) == set(expected)
        assert {i.path for i in repo.walk("main", "fixed/n1")} == {
            "fixed/n1/n2", "fixed/n1/n2/n3", "fixed/n1/n2/n3/n4", "fixed/n1/n2/n3/n4/leaf.txt"}

        big = expected["fixed/big.bin"][2]
        with repo.open("main", "fixed/big.bin") as f:
            assert f.seekable() and f.readable()
            assert f.read(10) == big[:10]
            f.seek(123_456)
            assert f.tell() == 123_456
            assert f.read(100_000) == big[123_456:223_456]
            f.seek(-5, io.SEEK_END)
            assert f.read() == big[-5:]
            assert f.read() == b""
            f.seek(0)
            assert f.read() == big
        with repo.open("main", "fixed/n1/n2/n3/n4/leaf.txt") as f:
            assert f.readline() == "feuille ✓\n".encode()
        with repo.open("main", "fixed/empty") as f:
            assert f.read() == b""
        with pytest.raises(CommitfsError):
            repo.open("main", "fixed/empty-dir")
        with pytest.raises(RevisionError):
            repo.resolve("nope")

        write_file(src / "fixed" / "empty", b"no longer")
        cid2 = repo.commit(src, message="v2")
        assert [(c.status, c.path) for c in repo.diff(cid, cid2)] == [("modified", "fixed/empty")]
        assert repo.checkout(cid2, tmp_path / "out") == sum(1 for v in describe(src).values() if v[0] == "file")
        assert describe(tmp_path / "out") == describe(src)


def test_options_may_stand_between_operands():
    from commitfs.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["mount", "main", "--cache-dir", "/tmp/c", "/mnt/x", "-r", "/repo"])
    assert (args.rev, args.mountpoint, args.cache_dir, args.repo) == ("main", "/mnt/x", "/tmp/c", "/repo")
    args = parser.parse_args(["mount", "--refresh", "2", "/mnt/x"])
    assert (args.rev, args.mountpoint) == (None, "/mnt/x")
    args = parser.parse_args(["diff", "v1", "--json", "main"])
    assert (args.old, args.new, args.json) == ("v1", "main", True)


def _imported_after(argv, heavy, before=""):
    """Run ``commitfs ARGV`` (its ``--help``, say) in a fresh interpreter; its last
    line of output lists which of the ``heavy`` modules it imported."""
    import sys

    code = ("import sys\n" + before +
            "from commitfs.cli import main\n"
            "try:\n"
            f"    main({list(argv)!r})\n"
            "except SystemExit:\n"
            "    pass\n"
            f"print(repr([m for m in {tuple(heavy)!r} if m in sys.modules]))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_verb_imports_only_what_it_needs():
    """Every verb builds its parser from its own module alone (issue 21: a
    no-change re-commit paid ~0.2 s for every verb module's imports): `commit
    --help` imports neither the other verbs' modules nor their operations, and
    the verb table names, for each module, exactly the verbs it registers."""
    import argparse
    import importlib
    import sys

    from commitfs.cli import VERB_MODULES, VERBS

    registered = {}
    for name in VERB_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub, argparse.ArgumentParser(add_help=False))
        registered.update(dict.fromkeys(sub.choices, name))
    assert registered == VERBS
    proc = _imported_after(["commit", "--help"], (
        "commitfs.ops.contentdiff", "commitfs.ops.merge", "commitfs.ops.fsck", "commitfs.ops.sync",
        "commitfs.ops.lineage", "commitfs.ops.gc", "commitfs.ops.snapshot", "commitfs.repo.repository",
        "commitfs.fuse.lifecycle", "commitfs.cli.remote", "commitfs.api"))
    assert proc.returncode == 0, proc.stderr
    assert "usage: commitfs commit" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_a_mount_command_imports_only_what_a_mount_needs():
    """`commitfs mount` is on the way to a mount's first `ls` (issue 19: under 0.3 s):
    its process imports the mount verbs and the repository, not the other verbs'
    modules (diffs, merges, fsck, the Python API); `import commitfs` alone imports
    no API.  Any other command line still sees every verb."""
    import sys

    from commitfs.cli import VERB_MODULES, verb_modules

    proc = _imported_after(["-r", "/nonexistent", "mount", "--help"], (
        "commitfs.api", "commitfs.ops.contentdiff", "commitfs.ops.merge", "commitfs.ops.fsck",
        "commitfs.ops.snapshot", "commitfs.cli.core", "commitfs.model.chunker", "boto3", "trio"),
        before="import commitfs\n"
               "assert 'commitfs.api' not in sys.modules, 'import commitfs imported the API'\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert verb_modules(["--repo", "x", "mount", "main", "/mnt"]) == ["commitfs.cli.mount"]
    assert verb_modules(["umount", "/mnt"]) == ["commitfs.cli.mount"]
    assert verb_modules(["-r", "mount", "log"]) == ["commitfs.cli.core"]
    assert verb_modules(["mounts"]) == ["commitfs.cli.mounts"]
    for argv in ([], ["--help"], ["--version", "mount"], ["-h", "log"], ["nosuchverb"]):
        assert verb_modules(argv) == VERB_MODULES, argv
    assert commitfs.Repository is not None and commitfs.run is not None  # the API, on first use


def test_a_mount_command_line_is_read_for_its_mountpoint_as_argparse_reads_it():
    """`commitfs mount` starts its daemon before it imports argparse, naming the
    mountpoint on the daemon's command line (cli.early_mountpoint). Whatever it reads
    there, argparse decides (a mismatch only costs a second daemon): here the two agree
    on every arrangement of options and operands, and the reader says None where it
    cannot be sure (help, --foreground, other verbs). Its table of options that take a
    value is the mount parser's own."""
    import argparse
    import itertools
    import random

    from commitfs.cli import _GLOBAL_OPTIONS_WITH_VALUE, _MOUNT_OPTIONS_WITH_VALUE, build_parser, early_mountpoint
    from commitfs.cli import mount as mount_verbs

    sub = argparse.ArgumentParser().add_subparsers()
    mount_verbs.register(sub, argparse.ArgumentParser(add_help=False))
    takes_value = {s for a in sub.choices["mount"]._actions if a.option_strings and a.nargs is None
                   and not isinstance(a, (argparse._StoreTrueAction, argparse._HelpAction)) for s in a.option_strings}
    assert takes_value == set(_MOUNT_OPTIONS_WITH_VALUE)
    parser = build_parser(["commitfs.cli.mount"])
    options = [["--cache-dir", "/c"], ["--refresh", "2"], ["-r", "/repo"], ["--repo=/repo"], ["-w"],
               ["--allow-other"], ["--log-file", "mnt-log"], ["--no-disk-cache"], ["--io-timeout=3"],
               ["--endpoint-url", "http://x"], ["--workspace", "/ws"], ["--cache-size", "1G"]]
    rng = random.Random(7)
    checked = 0
    for operands in (["main", "/mnt/a"], ["/mnt/b"], ["v1:sub/dir", "rel/mnt"]):
        for _ in range(60):
            chosen = rng.sample(options, rng.randint(0, 4))
            words = [*operands, *itertools.chain(*chosen)]
            # operands keep their order; options go anywhere between them
            slots = sorted(rng.randint(0, len(chosen)) for _ in operands)
            line, k = [], 0
            for i, group in enumerate(chosen + [[]]):
                while k < len(operands) and slots[k] == i:
                    line.append(operands[k])
                    k += 1
                line += group
            prefix = ["-r", "/top"] if rng.random() < 0.3 else []
            argv = [*prefix, "mount", *line]
            assert sorted(argv[len(prefix) + 1:]) == sorted(words)
            assert early_mountpoint(argv) == parser.parse_args(argv).mountpoint, argv
            checked += 1
    assert checked == 180
    for argv in (["mount", "main", "/m", "--help"], ["mount", "-f", "main", "/m"], ["mount", "-wf", "main", "/m"],
                 ["mount", "--foreground", "/m"], ["--help", "mount", "/m"], ["umount", "/m"], ["log"], [],
                 ["mount"], ["mount", "a", "b", "c"], ["-r", "mount", "log", "x"]):
        assert early_mountpoint(argv) is None, argv
    assert early_mountpoint(["mount", "main", "--", "-odd"]) == "-odd"
    assert {"-r", "--repo", "--endpoint-url"} == set(_GLOBAL_OPTIONS_WITH_VALUE)


def test_a_mount_process_starts_its_daemon_before_it_imports_its_parser(tmp_path):
    """The console script's `commitfs mount` starts the daemon first thing: argparse and
    the mount's own modules are not yet imported when it does. (The daemon, told
    nothing, exits doing nothing when the command ends at its usage error.)"""
    import sys

    code = ("import sys\n"
            "import commitfs.fuse.spawn as spawn\n"
            "seen = []\n"
            "class Recording(spawn.Spawned):\n"
            "    def __init__(self, mountpoint):\n"
            "        seen.append((mountpoint, [m for m in ('argparse', 'commitfs.fuse.lifecycle', 'subprocess',\n"
            "                                             'commitfs.cli.mount') if m in sys.modules]))\n"
            "        super().__init__(mountpoint)\n"
            "spawn.Spawned = Recording\n"
            f"sys.argv = ['commitfs', 'mount', '--no-such-option', 'main', {str(tmp_path / 'mnt')!r}]\n"
            "from commitfs.cli import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exc:\n"
            "    print('exit', exc.code)\n"
            "pid = spawn._early.proc.pid\n"
            "spawn._early.close()\n"
            "print('daemon', spawn._early.proc.wait(timeout=60))\n"
            "print(seen)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[:2] == ["exit 2", "daemon 0"], proc.stdout
    assert lines[2] == repr([(str(tmp_path / "mnt"), [])]), proc.stdout
