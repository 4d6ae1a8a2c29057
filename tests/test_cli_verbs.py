"""issue 17, "What to add": --version, shell completion, tag -d, branch -m,
REV^ / REV^N / A..B, log --all, find."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import commitfs
from core_fixtures import assert_one_line_error, reopen, run_cli, write_file
from commitfs.cli import main
from commitfs.model.objects import Commit


@pytest.fixture
def cli(capsys, cache_home):
    def run(*argv, code: int = 0):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc}, expected {code}\nstdout: {out}\nstderr: {err}"
        if code in (1, 2):
            assert_one_line_error(rc, err, code)
        return out if code == 0 else err

    return run


@pytest.fixture
def history(cli, local_url, tmp_path):
    """main: one -> two; dev (from one): three.  Returns (url, data dir, {name: id})."""
    d = tmp_path / "data"
    write_file(d / "a.csv", b"a\n")
    cli("-r", local_url, "init")
    ids = {"one": cli("-r", local_url, "commit", d, "-m", "one").strip()}
    write_file(d / "sub" / "b.csv", b"b\n")
    ids["two"] = cli("-r", local_url, "commit", d, "-m", "two").strip()
    cli("-r", local_url, "branch", "dev", "main~1")
    (d / "sub" / "b.csv").unlink()
    write_file(d / "weights" / "model.safetensors", b"w" * 100)
    ids["three"] = cli("-r", local_url, "commit", d, "-b", "dev", "-m", "three").strip()
    return local_url, d, ids


def test_version(cli):
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.decode().strip() == f"commitfs {commitfs.__version__}"


# --- revisions ------------------------------------------------------------------------------------
def test_caret_forms_and_the_second_parent_of_a_merge(cli, history):
    url, _, ids = history
    show = lambda rev: json.loads(cli("-r", url, "show", rev, "--json"))["id"]  # noqa: E731
    assert show("main^") == ids["one"] == show("main^1") == show("main~1")
    assert show("main^0") == ids["two"] and show("dev^") == ids["one"]
    # A two-parent commit built through the repository API (merges are another issue's).
    repo = reopen(url)
    two = repo.load_commit(bytes.fromhex(ids["two"]))
    merge = Commit(two.tree, (bytes.fromhex(ids["two"]), bytes.fromhex(ids["three"])), "t", two.time + 1, "merge")
    repo.save_commit(merge)
    repo.refs.set_branch_if_equals("merged", merge.id, None)
    assert show("merged^") == ids["two"] and show("merged^2") == ids["three"]
    assert show("merged^2^") == ids["one"] and show("merged^2~1") == ids["one"] and show("merged~1^") == ids["one"]
    assert "has 2 parents, not a parent 3" in cli("-r", url, "show", "merged^3", code=1)
    assert "has 1 parent, not a parent 2" in cli("-r", url, "show", "main^2", code=1)
    # log A..B follows every parent: the merge brings dev's commit.
    got = [c["id"] for c in json.loads(cli("-r", url, "log", "main..merged", "--json"))]
    assert got == [merge.id.hex(), ids["three"]]


def test_log_ranges_and_all(cli, history):
    url, _, ids = history
    ids_of = lambda *argv: [c["id"] for c in json.loads(cli("-r", url, "log", *argv, "--json"))]  # noqa: E731
    assert ids_of("main..dev") == [ids["three"]]
    assert ids_of("dev..main") == [ids["two"]]
    assert ids_of("dev..") == [ids["two"]]  # an empty side is main
    assert ids_of("main..main") == []
    assert ids_of("--all") == [ids["three"], ids["two"], ids["one"]]
    assert ids_of("--all", "-n", "1") == [ids["three"]]
    assert ids_of("main") == [ids["two"], ids["one"]]  # REV alone: first parents, as before
    out = cli("-r", url, "log", "--all", "--oneline")
    assert [line.split()[1] for line in out.splitlines()] == ["three", "two", "one"]
    assert "unknown revision 'nope'" in cli("-r", url, "log", "nope..main", code=1)
    assert "--all takes no REV" in cli("-r", url, "log", "--all", "main", code=2)


# --- refs -----------------------------------------------------------------------------------------
def test_tag_delete(cli, history):
    url, _, ids = history
    cli("-r", url, "tag", "v1", "main")
    assert "deleted tag v1" in cli("-r", url, "tag", "-d", "v1")
    assert json.loads(cli("-r", url, "tag", "--json")) == {}
    assert "no tag 'v1'" in cli("-r", url, "tag", "-d", "v1", code=1)
    cli("-r", url, "tag", "v1", "dev")  # a deleted tag's name can be used again
    assert json.loads(cli("-r", url, "tag", "--json")) == {"v1": ids["three"]}


def test_branch_rename_compare_and_swap(cli, history):
    url, _, ids = history
    assert "renamed branch dev to feature" in cli("-r", url, "branch", "-m", "dev", "feature")
    assert json.loads(cli("-r", url, "branch", "--json")) == {"main": ids["two"], "feature": ids["three"]}
    # Never overwrites.
    assert "already exists" in cli("-r", url, "branch", "-m", "feature", "main", code=1)
    assert json.loads(cli("-r", url, "branch", "--json")) == {"main": ids["two"], "feature": ids["three"]}
    assert "no branch 'ghost'" in cli("-r", url, "branch", "-m", "ghost", "x", code=1)
    assert "OLD and NEW" in cli("-r", url, "branch", "-m", "feature", code=2)


def test_branch_rename_refused_when_old_moves_meanwhile(history):
    from commitfs.errors import RefConflictError
    from commitfs.ops.refnames import rename_branch

    url, _, ids = history
    repo = reopen(url)
    real = repo.refs.set_branch_if_equals
    moved = []

    def racing(name, new, expected):
        if name == "dev" and new is None and not moved:  # someone commits to dev just before
            moved.append(1)
            real("dev", bytes.fromhex(ids["two"]), bytes.fromhex(ids["three"]))
        return real(name, new, expected)

    repo.refs.set_branch_if_equals = racing
    with pytest.raises(RefConflictError, match="moved meanwhile"):
        rename_branch(repo, "dev", "feature")
    assert reopen(url).refs.branches() == {"main": bytes.fromhex(ids["two"]), "dev": bytes.fromhex(ids["two"])}


# --- find -----------------------------------------------------------------------------------------
def test_find(cli, history):
    url, _, ids = history
    found = json.loads(cli("-r", url, "find", "*.csv", "--json"))
    assert [(f["id"], [m["path"] for m in f["matches"]]) for f in found] == [
        (ids["three"], ["a.csv"]), (ids["two"], ["a.csv", "sub/b.csv"]), (ids["one"], ["a.csv"])]
    assert set(found[0]) >= {"id", "tree", "parents", "author", "time", "message", "metadata", "matches"}
    assert set(found[0]["matches"][0]) == {"path", "kind", "size", "id"}
    # A pattern with '/' matches whole paths; directories match too.
    found = json.loads(cli("-r", url, "find", "sub/*", "--json"))
    assert [(f["id"], [m["path"] for m in f["matches"]]) for f in found] == [(ids["two"], ["sub/b.csv"])]
    found = json.loads(cli("-r", url, "find", "weights", "--json"))
    assert [m["kind"] for m in found[0]["matches"]] == ["dir"]
    # REV... limits the search to their history.
    found = json.loads(cli("-r", url, "find", "*.safetensors", "main", "--json"))
    assert found == []
    out = cli("-r", url, "find", "*.safetensors", "dev")
    assert out.splitlines()[0].startswith(f"commit {ids['three'][:12]} ")
    assert out.splitlines()[1].strip() == "weights/model.safetensors (100 B)"
    assert "unknown revision" in cli("-r", url, "find", "x", "nope", code=1)


# --- shell completion ---------------------------------------------------------------------------
def _complete(script: str, line: str) -> list[str]:
    """COMPREPLY for the command line ``line`` (the cursor at its end) in bash."""
    words = line.split(" ")
    prog = f"""
source {script}
COMP_WORDS=({' '.join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={line!r}
COMP_POINT=${{#COMP_LINE}}
spec=$(complete -p commitfs)
fn=${{spec##*-F }}; fn=${{fn%% *}}
"$fn" commitfs {words[-1]!r} {words[-2]!r}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    proc = subprocess.run(["bash", "--norc", "-c", prog], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [w.strip() for w in proc.stdout.splitlines() if w.strip()]


@pytest.mark.timeout(60)
def test_bash_completion_from_the_parser(tmp_path):
    proc = run_cli("completion", "bash")
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "commitfs.bash"
    script.write_bytes(proc.stdout)
    assert {"log", "ls"} <= set(_complete(script, "commitfs l"))
    assert set(_complete(script, "commitfs f")) >= {"find", "fsck"}
    assert "--oneline" in _complete(script, "commitfs log --on")
    assert "--writable" in _complete(script, "commitfs mount --wr")
    assert "--read-data" in _complete(script, "commitfs fsck --re")
    assert set(_complete(script, "commitfs completion ")) == {"bash", "zsh"}


def test_zsh_completion(tmp_path):
    proc = run_cli("completion", "zsh")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert text.startswith("#compdef commitfs") and "--oneline" in text and "find" in text
    if shutil.which("zsh"):
        script = tmp_path / "_commitfs"
        script.write_text(text)
        assert subprocess.run(["zsh", "-n", str(script)], timeout=30).returncode == 0
    assert run_cli("completion", "fish").returncode == 2
