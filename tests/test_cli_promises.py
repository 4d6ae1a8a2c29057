"""issue 17: the command line keeps the promises of docs/CLI.md.

One line on stderr and exit 1 for an error, 2 for bad usage, never a
traceback (also when stdout cannot be written); commits from inside a mount
that would silently rewrite a branch are refused; a workspace whose edits
were all undone starts from the branch head again.  The test that runs every
verb with bad input is data-driven over the parser, so verbs added later are
checked too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from core_fixtures import assert_one_line_error, cli_fails, cli_ok, run_cli, write_file
from commitfs.cli import build_parser, main


@pytest.fixture
def cli(capsys, cache_home):
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""

    def run(*argv):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def repo_with_commit(local_url, tmp_path, cli):
    data = tmp_path / "data"
    write_file(data / "labels.csv", b"id,label\n1,cat\n" * 2000)
    write_file(data / "sub" / "x.bin", b"x" * 10)
    assert cli("-r", local_url, "init")[0] == 0
    rc, out, err = cli("-r", local_url, "commit", data, "-m", "one")
    assert rc == 0, err
    return local_url, data


# --- 1. a failed write to stdout ----------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["log"], ["cat", "main:labels.csv"], ["ls", "main", "--json"]])
def test_a_full_stdout_is_a_one_line_error(repo_with_commit, argv):
    url, _ = repo_with_commit
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "commitfs", "-r", url, *argv], stdout=full,
                              stderr=subprocess.PIPE, timeout=60)
    line = assert_one_line_error(proc.returncode, proc.stderr.decode(), 1)
    assert "cannot write the output" in line and "No space left" in line


@pytest.mark.timeout(60)
def test_a_broken_pipe_is_still_success(repo_with_commit):
    url, _ = repo_with_commit
    proc = subprocess.run(f"{sys.executable} -m commitfs -r {url} cat main:labels.csv | head -c 10 >/dev/null; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          stderr=subprocess.PIPE, env=os.environ, timeout=60)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr


# --- 5. missing operands are usage errors ----------------------------------------------------
@pytest.mark.parametrize("argv", [["tag", "foo"], ["cat", "main"], ["log", "-n", "-3"], ["log", "-n", "x"]])
def test_missing_operands_exit_2(cli, repo_with_commit, argv):
    url, _ = repo_with_commit
    rc, out, err = cli("-r", url, *argv)
    assert_one_line_error(rc, err, 2)
    assert err.rstrip().endswith("(see --help)") and out == ""


def test_log_n_0_is_empty_and_valid(cli, repo_with_commit):
    url, _ = repo_with_commit
    rc, out, err = cli("-r", url, "log", "-n", "0", "--json")
    assert rc == 0 and json.loads(out) == []


# --- 6. messages that name what is wrong -------------------------------------------------------
def test_bad_bucket_name_is_one_line(cli):
    rc, out, err = cli("-r", "s3://Bad_Bucket!/x", "log")
    line = assert_one_line_error(rc, err, 1)
    assert "'Bad_Bucket!' is not a bucket name" in line and "regex" not in line


def test_a_file_as_repository_is_named(cli, tmp_path):
    f = write_file(tmp_path / "ds" / "labels.csv", b"a,b\n")
    for verb in ("init", "log"):
        rc, out, err = cli("-r", f, verb)
        line = assert_one_line_error(rc, err, 1)
        assert str(f) in line and "not a directory" in line, line


def test_a_fresh_repository_has_no_commits_yet(cli, local_url):
    assert cli("-r", local_url, "init")[0] == 0
    rc, out, err = cli("-r", local_url, "log")
    assert rc == 0 and out == "" and "no commits yet" in err and "unknown revision" not in err
    rc, out, err = cli("-r", local_url, "log", "--json")
    assert rc == 0 and json.loads(out) == []
    rc, out, err = cli("-r", local_url, "show", "main")
    assert "no commits yet" in assert_one_line_error(rc, err, 1)


def test_clone_and_pull_say_received(repo_with_commit, tmp_path):
    url, data = repo_with_commit
    clone = str(tmp_path / "clone")
    err = cli_ok("clone", url, clone).stderr.decode()
    assert "received" in err and "sent" not in err
    write_file(data / "more.txt", b"more")
    cli_ok("-r", url, "commit", str(data), "-m", "two")
    err = cli_ok("-r", clone, "pull").stderr.decode()
    assert "received" in err and "sent" not in err
    write_file(data / "more2.txt", b"more")
    cli_ok("-r", clone, "commit", str(data), "-m", "three")
    assert "sent" in cli_ok("-r", clone, "push").stderr.decode()


# --- 3, 4. commits from inside mounts ------------------------------------------------------------
@pytest.mark.timeout(120)
def test_commit_from_a_read_only_mount_is_refused(repo_with_commit, mounts, tmp_path):
    url, data = repo_with_commit
    cli_ok("-r", url, "tag", "v1", "main")
    write_file(data / "more.txt", b"more")
    head = cli_ok("-r", url, "commit", str(data), "-m", "two").stdout.decode().strip()
    mnt = mounts.mountpoint("ro")
    mounts.mount(url, mnt, rev="v1")
    for path in (mnt, mnt / "sub"):
        line = cli_fails("-r", url, "commit", str(path), "-m", "x")
        assert "read-only commitfs mount" in line and "--writable" in line
    # The whole-repository view too.
    top = mounts.mountpoint("top")
    mounts.mount(url, top)
    assert "read-only commitfs mount" in cli_fails("-r", url, "commit", str(top / "tags" / "v1"), "-m", "x")
    log = json.loads(cli_ok("-r", url, "log", "--json").stdout)
    assert log[0]["id"] == head and len(log) == 2  # main did not move


@pytest.mark.timeout(120)
def test_workspace_commit_refuses_another_branch(ws):
    with __import__("commitfs.repo.repository", fromlist=["Repository"]).Repository.open(ws.url) as repo:
        repo.refs.set_branch_if_equals("dev", ws.base, None)
    mnt = ws.mount("wdev", branch="dev")
    write_file(mnt / "t.txt", b"t")
    proc = ws.cli("commit", str(mnt), "-b", "main", "-m", "x")
    line = assert_one_line_error(proc.returncode, proc.stderr, 1)
    assert "'dev'" in line and "'main'" in line
    assert ws.head("dev") == ws.base and ws.head("main") == ws.base
    # A subdirectory of the workspace is not the workspace: refused with the command to use.
    line = cli_fails("-r", ws.url, "commit", str(mnt / "fixed"), "-m", "x")
    assert f"commitfs commit {mnt}" in line
    proc = ws.cli("commit", str(mnt), "-b", "dev", "-m", "x", "--author", "W <w@example.com>")
    assert proc.returncode == 0, proc.stderr
    assert ws.head("dev") == bytes.fromhex(proc.stdout.strip()) and ws.head("main") == ws.base
    shown = json.loads(cli_ok("-r", ws.url, "show", "dev", "--json").stdout)
    assert shown["author"] == "W <w@example.com>"  # --author reaches the workspace daemon


# --- 2. a workspace whose edits were undone follows the branch -------------------------------------
@pytest.mark.timeout(120)
def test_workspace_without_edits_after_reset_remounts_on_the_head(ws):
    mnt = ws.mount("w")
    write_file(mnt / "t.txt", b"t")
    ws.cli("reset", str(mnt), "t.txt").check_returncode()
    ws.umount(mnt)
    # The branch moves elsewhere.
    other = ws.tmp / "other"
    write_file(other / "only-here.txt", b"new head")
    new_head = cli_ok("-r", ws.url, "commit", str(other), "-m", "elsewhere").stdout.decode().strip()
    mnt = ws.mount("w")
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)
    assert status["base"] == new_head and status["changes"] == []
    assert sorted(os.listdir(mnt)) == ["only-here.txt"]


# --- every verb, bad input: one line, the documented code, never a traceback -------------------
def _verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _bad_argvs(name: str, p: argparse.ArgumentParser, url: str, nowhere: str) -> list[tuple[list[str], int | None]]:
    """Bad command lines for a verb, built from its parser: an unknown option; its
    operands filled with a missing path / unknown revision, against a missing and
    an existing repository; every required operand left out.  With the exit code
    expected (None: 1 or 2; 0: success allowed too)."""
    positionals = [a for a in p._actions if not a.option_strings and a.nargs != argparse.SUPPRESS]
    required_opts = [a for a in p._actions if a.option_strings and a.required]
    # Values that are wrong for any operand: a path nothing is at (also an unknown revision).
    fill = []
    for a in positionals:
        if a.nargs == argparse.REMAINDER:
            fill += ["--", nowhere]  # a command that is not there
        elif a.choices:
            fill.append("no-such-choice")
        else:
            fill.append(nowhere)
    for a in required_opts:
        fill += [a.option_strings[0], "x=y" if "meta" in a.dest else "x"]
    # (A verb without operands that needs no repository, like `mounts`, may succeed: 0 too.)
    out = [([name, "--no-such-option"], 2), (["-r", nowhere, name, *fill], None if fill else 0)]
    if fill:
        out.append((["-r", url, name, *fill], None))
    if any(a.nargs in (None, "+", argparse.REMAINDER) or isinstance(a.nargs, int) for a in positionals):
        out.append((["-r", url, name], 2))  # required operands left out
    return out


@pytest.mark.timeout(60)
def test_every_verb_with_bad_input_fails_in_one_line(repo_with_commit, tmp_path, monkeypatch, capsys):
    """In-process (seconds for every verb): a traceback is any exception leaving
    main() other than argparse's SystemExit."""
    url, _ = repo_with_commit
    nowhere = str(tmp_path / "nowhere" / "at-all")
    monkeypatch.chdir(tmp_path)
    verbs = _verbs()
    assert {"init", "commit", "log", "mount", "status", "clone", "run"} <= set(verbs)
    failures, runs = [], 0
    for name, p in sorted(verbs.items()):
        for argv, expected in _bad_argvs(name, p, url, nowhere):
            if argv[-1] == "init" and argv[1] == nowhere:
                argv = ["-r", str(tmp_path / "data" / "labels.csv"), "init"]  # a file: cannot be a repository
            capsys.readouterr()
            runs += 1
            try:
                try:
                    rc = main(argv)
                except SystemExit as exc:
                    rc = exc.code
                err = capsys.readouterr().err
                allowed = {None: (1, 2), 0: (0, 1, 2)}.get(expected, (expected,))
                assert rc in allowed, f"exit {rc}"
                if rc:
                    assert_one_line_error(rc, err, rc)
                assert "Traceback" not in err
            except Exception as exc:  # a traceback, or a broken promise
                failures.append(f"commitfs {' '.join(argv)}: {type(exc).__name__}: {exc}")
    assert runs >= 2 * len(verbs)
    assert not failures, "\n".join(failures)


# --- 7. checkout: all or nothing ------------------------------------------------------------------
def _corrupt_last_chunk(url: str, path: str) -> None:
    from commitfs.ops.browse import lookup_path
    from commitfs.repo.pack import pack_key
    from commitfs.repo.repository import Repository

    with Repository.open(url) as repo:
        entry = lookup_path(repo, repo.resolve("main"), path)
        loc = repo.locate(repo.load_manifest(entry.id).chunk_ids[-1])
        key = pack_key(loc.pack)
        data = bytearray(repo.store.load_object(key))
        data[loc.offset + loc.stored // 2] ^= 0xFF
        repo.store.save_object(key, bytes(data))


@pytest.mark.timeout(60)
def test_a_failed_checkout_leaves_nothing_and_can_be_run_again(cli, local_url, tmp_path):
    data = tmp_path / "data"
    write_file(data / "a-small.txt", b"small")
    big = os.urandom(3 << 20)
    write_file(data / "z" / "big.bin", big)
    assert cli("-r", local_url, "init")[0] == 0
    assert cli("-r", local_url, "commit", data, "-m", "one")[0] == 0
    _corrupt_last_chunk(local_url, "z/big.bin")
    out = tmp_path / "out" / "dest"
    for existed in (False, True):
        rc, _, err = cli("-r", local_url, "checkout", "main", out)
        line = assert_one_line_error(rc, err, 1)
        assert "z/big.bin" in line or "hash" in line or "corrupt" in line.lower(), line
        # Nothing of it: DEST as it was (absent, then empty), no temporary directory left.
        assert (not out.exists()) if not existed else os.listdir(out) == []
        assert os.listdir(out.parent) == ([] if not existed else ["dest"])
        out.mkdir(parents=True, exist_ok=True)
    # Repaired (the file committed again), the same command succeeds into the same DEST.
    write_file(data / "z" / "big.bin", big + b"!")
    assert cli("-r", local_url, "commit", data, "-m", "two")[0] == 0
    rc, _, err = cli("-r", local_url, "checkout", "main", out)
    assert rc == 0, err
    assert (out / "z" / "big.bin").read_bytes() == big + b"!"
    assert sorted(os.listdir(out.parent)) == ["dest"]


def test_checkout_byte_progress_within_one_file(local_url, tmp_path):
    from commitfs.ops.checkout import checkout
    from commitfs.repo.repository import Repository

    data = tmp_path / "data"
    write_file(data / "big.bin", os.urandom(4 << 20))
    Repository.init(local_url).close()
    calls = []
    with Repository.open(local_url) as repo:
        from commitfs.ops.snapshot import commit_directory

        cid = commit_directory(repo, data, message="m").commit_id
        checkout(repo, cid, tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    assert len(calls) > 10  # many reports inside the one file, not one per file
    assert calls[-1] == (4 << 20, 4 << 20)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


# --- 9. progress: on a terminal only, with rate and ETA ----------------------------------------------
@pytest.mark.timeout(60)
def test_progress_bar_on_a_terminal_only(local_url, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    data = tmp_path / "data"
    write_file(data / "big.bin", os.urandom(2 << 20))
    cli_ok("-r", local_url, "init")
    cli_ok("-r", local_url, "commit", str(data), "-m", "m")
    # Not a terminal: no bar, only the summary line.
    err = cli_ok("-r", local_url, "checkout", "main", str(tmp_path / "plain")).stderr.decode()
    assert err.startswith("checked out 1 files") and "\r" not in err
    # A terminal: a bar with bytes, rate and ETA.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.run([sys.executable, "-m", "commitfs", "-r", local_url, "checkout", "main",
                               str(tmp_path / "tty")], stdout=subprocess.PIPE, stderr=slave, timeout=60)
        os.close(slave)
        slave = None
        shown = b""
        while True:
            try:
                part = os.read(master, 65536)
            except OSError:
                break
            if not part:
                break
            shown += part
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    text = shown.decode(errors="replace")
    assert "checkout" in text and "B/s" in text and "<" in text, text  # [elapsed<eta, rate]
    assert "checked out 1 files" in text


# --- 8. the demo prints commands that can be pasted, and says what it installs ----------------------
SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def test_demo_prints_pasteable_commands():
    import shlex

    words = ["python", "-c", "import sys, commitfs.lineage as l; print(l.describe(sys.argv[1]))",
             "/tmp/a dir/labels.csv", "it's", "", "main:labels.csv", "$HOME", "a\"b"]
    script = (f'source <(sed -n "/^# --- functions/,/^# --- end functions/p" {SCRIPTS}/demo.sh)\n'
              'step printf "<%s>\\n" "$@"')
    proc = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout.split("\n")[1]
    line = shown.split("$ ", 1)[1].removesuffix("\033[0m")
    assert line == shlex.join(["printf", "<%s>\\n", *words])
    # The demo defines step once (no later definition replaces the quoting one).
    assert open(f"{SCRIPTS}/demo.sh").read().count("\nstep() ") == 1
    # Pasted into a shell, it runs the same command.
    again = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30)
    assert again.stdout == "".join(f"<{w}>\n" for w in words)


def test_setup_says_what_it_installs_before_installing():
    lines = open(os.path.join(SCRIPTS, "setup.sh")).read().splitlines()
    installs = [i for i, line in enumerate(lines)
                if any(k in line for k in ("apt-get update", "-m venv", "pip download", "pip install -q -e"))]
    assert len(installs) >= 4
    for i in installs:
        assert any(lines[j].strip().startswith("say ") for j in range(max(0, i - 3), i)), lines[i]
    demo = open(os.path.join(SCRIPTS, "demo.sh")).read()
    assert demo.index("installing what commitfs needs") < demo.index("bash scripts/setup.sh")
