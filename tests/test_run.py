"""``commitfs run``: inputs mounted at their commits, the command's environment, lineage of
the output commit, failures, interruption and cleanup; ``describe`` on mounted paths.

Every test uses real FUSE mounts (through ``commitfs mount``); ``lineage_env``
fails the test if a mount or a run directory is left behind.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lineage_fixtures import cfs

pytestmark = pytest.mark.usefixtures("lineage_env")

PY = sys.executable


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _run(*args, cwd=None, env=None, check=False) -> subprocess.CompletedProcess:
    return cfs("run", *args, cwd=cwd, env=env, check=check, timeout=180)


def _branches(url) -> dict:
    return json.loads(cfs("-r", url, "branch", "--json").stdout)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def data(tmp_path, sample_dir):
    """A local dataset repository with the sample committed to main: (url, commit id)."""
    url = str(tmp_path / "data")
    cfs("-r", url, "init")
    cid = cfs("-r", url, "commit", sample_dir, "-m", "sample v1").stdout.strip()
    return url, cid


@pytest.fixture
def models(tmp_path):
    url = str(tmp_path / "models")
    cfs("-r", url, "init")
    return url


PROBE = """
    import json, os, sys
    import commitfs.lineage as L
    out = os.environ["COMMITFS_OUTPUT"]
    os.makedirs(out)
    env = {k: v for k, v in os.environ.items() if k.startswith("COMMITFS_")}
    root = env["COMMITFS_INPUT_DATA"]
    report = {"env": env, "argv": sys.argv[1:], "listing": sorted(os.listdir(root)),
              "ismount": os.path.ismount(root), "params": L.params(),
              "describe": {rel: L.describe(os.path.join(root, rel)).to_dict()
                           for rel in ("", "labels.csv", "train", "train/cat")}}
    try:
        open(os.path.join(root, "new.txt"), "w")
        report["writable"] = True
    except OSError:
        report["writable"] = False
    with open(os.path.join(root, "labels.csv"), "rb") as src, open(os.path.join(out, "labels.csv"), "wb") as dst:
        dst.write(src.read())
    if "BASE" in os.environ.get("COMMITFS_INPUTS", "").upper():
        with open(os.path.join(env["COMMITFS_INPUT_BASE"], "base.txt")) as f:
            report["base"] = f.read()
    json.dump(report, open(os.path.join(out, "report.json"), "w"))
"""


def test_run_success_mounts_inputs_and_records_lineage(tmp_path, data, models, s3_url, monkeypatch):
    data_url, data_id = data
    # A second input on the S3 endpoint.
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "base.txt").write_text("pretrained")
    cfs("-r", s3_url, "init")
    base_id = cfs("-r", s3_url, "commit", base_dir, "-m", "base model").stdout.strip()
    # The code lives in a git work tree with an uncommitted change.
    code = tmp_path / "code"
    code.mkdir()
    probe = _script(code, "probe.py", PROBE)
    git = ["git", "-C", str(code), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "probe.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "probe"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    with open(probe, "a") as f:
        f.write("# edited\n")
    monkeypatch.setenv("MLFLOW_RUN_ID", "mlflow-123")
    monkeypatch.setenv("WANDB_RUN_ID", "wandb-456")

    before = time.time()
    proc = _run("--input", f"data={data_url}@main", "--input", f"Base={s3_url}@main", "--output", "out",
                "--to", f"{models}@trained", "-m", "probe run", "--", PY, probe, "--lr", "0.1", cwd=code)
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.strip().splitlines()[-1]

    # What the command saw.
    rep = json.loads(cfs("-r", models, "cat", f"{cid}:report.json").stdout)
    env = rep["env"]
    assert env["COMMITFS_INPUT_DATA_COMMIT"] == data_id and env["COMMITFS_INPUT_BASE_COMMIT"] == base_id
    assert env["COMMITFS_INPUT_DATA_REPO"] == data_url and env["COMMITFS_INPUT_BASE_REPO"] == s3_url
    assert env["COMMITFS_INPUT_DATA_REV"] == "main"
    assert env["COMMITFS_INPUTS"] == "data,Base"
    assert env["COMMITFS_OUTPUT"] == str(code / "out")
    assert env["COMMITFS_INPUT_DATA"].startswith(os.environ["TMPDIR"])
    assert rep["ismount"] and rep["writable"] is False and rep["argv"] == ["--lr", "0.1"]
    assert rep["listing"] == ["README.txt", "labels.csv", "train", "val"]
    assert rep["base"] == "pretrained"
    assert rep["params"]["commitfs.input.data.commit"] == data_id
    assert rep["params"]["commitfs.input.Base.repo"] == s3_url
    # describe() on mounted paths: repository, commit and content ids.
    listing = {e["path"]: e["id"] for e in json.loads(cfs("-r", data_url, "ls", "-R", "main", "--json").stdout)}
    root_tree = json.loads(cfs("-r", data_url, "show", "main", "--json").stdout)["tree"]
    for rel, d in rep["describe"].items():
        assert (d["repo"], d["commit"]) == (data_url, data_id)
        assert d["id"] == (listing[rel] if rel else root_tree)
        assert d["path"] == os.path.normpath(os.path.join(env["COMMITFS_INPUT_DATA"], rel))

    # The output commit and its lineage.
    assert cfs("-r", models, "cat", f"{cid}:labels.csv").stdout == (tmp_path / "sample" / "labels.csv").read_text()
    show = json.loads(cfs("-r", models, "show", "trained", "--json").stdout)
    assert show["id"] == cid and show["message"] == "probe run"
    meta = show["metadata"]
    assert meta["lineage.input.0"] == f"{data_url}@{data_id}" and meta["lineage.input.0.name"] == "data"
    assert meta["lineage.input.1"] == f"{s3_url}@{base_id}" and meta["lineage.input.1.name"] == "Base"
    assert json.loads(meta["lineage.run.command"]) == [PY, probe, "--lr", "0.1"]
    assert meta["lineage.run.exit_code"] == "0"
    assert meta["lineage.code.git_commit"] == head and meta["lineage.code.git_dirty"] == "true"
    assert meta["lineage.mlflow.run_id"] == "mlflow-123" and meta["lineage.wandb.run_id"] == "wandb-456"
    started = time.mktime(time.strptime(meta["lineage.run.started"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before - 1 <= started <= time.time()
    assert meta["lineage.run.started"] <= meta["lineage.run.finished"]

    # Upstream of the output, downstream of both inputs.
    up = json.loads(cfs("-r", models, "lineage", "trained", "--json").stdout)
    assert [(n["name"], n["id"]) for n in up["upstream"]] == [("data", data_id), ("Base", base_id)]
    assert up["run"]["git_commit"] == head and up["run"]["exit_code"] == 0
    for url in (data_url, s3_url):
        down = json.loads(cfs("-r", url, "lineage", "main", "--search", models, "--json").stdout)
        assert [n["id"] for n in down["downstream"]] == [cid]


def test_inputs_stay_at_their_commit_while_the_branch_moves(tmp_path, data, models):
    data_url, data_id = data
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "labels.csv").write_text("path,label\n")
    script = _script(tmp_path, "move.py", f"""
        import os, subprocess, sys
        subprocess.run([sys.executable, "-m", "commitfs", "-r", {data_url!r}, "commit", {str(newer)!r},
                        "-m", "v2"], check=True, capture_output=True)
        os.makedirs(os.environ["COMMITFS_OUTPUT"])
        with open(os.path.join(os.environ["COMMITFS_INPUT_DATA"], "labels.csv")) as f:
            seen = f.read()
        open(os.path.join(os.environ["COMMITFS_OUTPUT"], "seen.csv"), "w").write(seen)
    """)
    proc = _run("-r", models, "--input", f"data={data_url}@main", "--output", tmp_path / "out", "--to", "main",
                "--", PY, script)
    assert proc.returncode == 0, proc.stderr
    assert cfs("-r", models, "cat", "main:seen.csv").stdout == (tmp_path / "sample" / "labels.csv").read_text()
    assert json.loads(cfs("-r", data_url, "show", "main", "--json").stdout)["id"] != data_id
    meta = json.loads(cfs("-r", models, "show", "main", "--json").stdout)["metadata"]
    assert meta["lineage.input.0"] == f"{data_url}@{data_id}"


def test_failed_command_commits_nothing_and_returns_its_code(tmp_path, data, models):
    script = _script(tmp_path, "fail.py", """
        import os, sys
        os.makedirs(os.environ["COMMITFS_OUTPUT"])
        open(os.path.join(os.environ["COMMITFS_OUTPUT"], "partial"), "w").write("x")
        sys.exit(3)
    """)
    proc = _run("-r", models, "--input", f"data={data[0]}@main", "--output", tmp_path / "out", "--to", "main",
                "--", PY, script)
    assert proc.returncode == 3
    assert "command exited with 3; nothing committed" in proc.stderr
    assert proc.stdout == "" and _branches(models) == {}

    # A command killed by a signal: 128 + the signal number, as a shell would say.
    proc = _run("-r", models, "--output", tmp_path / "out", "--to", "main", "--",
                PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == 128 + signal.SIGKILL and _branches(models) == {}


def test_commit_on_failure_records_the_exit_code(tmp_path, data, models):
    script = _script(tmp_path, "fail.py", """
        import os, sys
        os.makedirs(os.environ["COMMITFS_OUTPUT"])
        open(os.path.join(os.environ["COMMITFS_OUTPUT"], "checkpoint"), "w").write("step 10")
        sys.exit(3)
    """)
    proc = _run("-r", models, "--input", f"data={data[0]}@main", "--output", tmp_path / "out", "--to", "main",
                "--commit-on-failure", "--json", "--", PY, script)
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 3 and out["inputs"][0]["id"] == data[1]
    meta = json.loads(cfs("-r", models, "show", "main", "--json").stdout)["metadata"]
    assert meta["lineage.run.exit_code"] == "3" and meta["lineage.input.0"].endswith(data[1])
    assert cfs("-r", models, "cat", "main:checkpoint").stdout == "step 10"


def _start_run(tmp_path, data, models, script, **popen):
    return subprocess.Popen(
        [PY, "-m", "commitfs", "-r", models, "run", "--input", f"data={data[0]}@main", "--output",
         str(tmp_path / "out"), "--to", "main", "--", PY, script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_sigint_stops_the_command_unmounts_and_commits_nothing(tmp_path, data, models):
    marks = tmp_path / "marks"
    marks.mkdir()
    script = _script(tmp_path, "sleep.py", f"""
        import os, signal, sys, time
        def stop(signo, frame):
            open({str(marks)!r} + "/got-" + signal.Signals(signo).name, "w").close()
            sys.exit(1)
        signal.signal(signal.SIGINT, stop)
        os.makedirs(os.environ["COMMITFS_OUTPUT"])
        open(os.path.join(os.environ["COMMITFS_OUTPUT"], "w"), "w").write("x")
        open({str(marks)!r} + "/started", "w").close()
        time.sleep(60)
    """)
    run = _start_run(tmp_path, data, models, script)
    try:
        _wait_for(marks / "started")
        mounted = [m for m in open("/proc/self/mounts").read().splitlines() if os.environ["TMPDIR"] in m]
        assert len(mounted) == 1  # the input is mounted while the command runs
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130
    assert "interrupted (SIGINT); nothing committed" in err
    assert sorted(p.name for p in marks.iterdir()) == ["got-SIGINT", "started"]
    assert _branches(models) == {}


def test_a_command_ignoring_sigint_gets_sigterm_on_the_second_interrupt(tmp_path, data, models):
    marks = tmp_path / "marks"
    marks.mkdir()
    script = _script(tmp_path, "stubborn.py", f"""
        import signal, sys, time
        def note(signo, frame):
            open({str(marks)!r} + "/got-" + signal.Signals(signo).name, "w").close()
            if signo == signal.SIGTERM:
                sys.exit(1)
        signal.signal(signal.SIGINT, note)
        signal.signal(signal.SIGTERM, note)
        open({str(marks)!r} + "/started", "w").close()
        while True:
            time.sleep(0.1)
    """)
    run = _start_run(tmp_path, data, models, script)
    try:
        _wait_for(marks / "started")
        run.send_signal(signal.SIGINT)
        _wait_for(marks / "got-SIGINT")
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130
    assert sorted(p.name for p in marks.iterdir()) == ["got-SIGINT", "got-SIGTERM", "started"]
    assert _branches(models) == {}


def test_sigterm_is_forwarded(tmp_path, data, models):
    marks = tmp_path / "marks"
    marks.mkdir()
    script = _script(tmp_path, "term.py", f"""
        import signal, sys, time
        def stop(signo, frame):
            open({str(marks)!r} + "/got-" + signal.Signals(signo).name, "w").close()
            sys.exit(0)  # even a clean exit after SIGTERM commits nothing
        signal.signal(signal.SIGTERM, stop)
        open({str(marks)!r} + "/started", "w").close()
        time.sleep(60)
    """)
    run = _start_run(tmp_path, data, models, script)
    try:
        _wait_for(marks / "started")
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM
    assert (marks / "got-SIGTERM").exists() and _branches(models) == {}


def test_ctrl_c_on_a_terminal_reaches_the_command_once(tmp_path, data, models):
    """The terminal sends SIGINT to the whole foreground group (run and the command): the
    command stops, run exits 130 and commits nothing.  run does not forward a terminal's
    SIGINT a second time; a forward landing while the first is still pending would be
    merged by the kernel, so the count below catches only a late second signal."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = _script(tmp_path, "count.py", f"""
        import signal, sys, time
        count = 0
        def note(signo, frame):
            global count
            count += 1
        signal.signal(signal.SIGINT, note)
        open({str(marks)!r} + "/started", "w").close()
        while count == 0:
            time.sleep(0.05)
        time.sleep(1.0)  # a second SIGINT would arrive meanwhile
        open({str(marks)!r} + "/count", "w").write(str(count))
        sys.exit(1)
    """)
    argv = [PY, "-m", "commitfs", "-r", models, "run", "--input", f"data={data[0]}@main", "--output",
            str(tmp_path / "out"), "--to", "main", "--", PY, script]
    pid, fd = pty.fork()
    if pid == 0:  # child: a new session whose controlling terminal is the pty
        try:
            os.execvpe(argv[0], argv, dict(os.environ))
        finally:
            os._exit(127)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while not (marks / "started").exists():
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.05)
        os.write(fd, b"\x03")  # Ctrl-C
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert os.waitstatus_to_exitcode(status) == 130, output
    assert (marks / "count").read_text() == "1"
    assert _branches(models) == {}


def test_command_not_found(tmp_path, data, models):
    proc = _run("-r", models, "--input", f"data={data[0]}@main", "--output", tmp_path / "out", "--to", "main",
                "--", "no-such-command-xyz", "--help")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "commitfs: command not found: no-such-command-xyz (not on PATH)"
    proc = _run("-r", models, "--output", tmp_path / "out", "--to", "main", "--", str(tmp_path / "nothing.sh"))
    assert proc.returncode == 1 and "command not found" in proc.stderr
    script = tmp_path / "noexec.sh"
    script.write_text("#!/bin/sh\n")
    proc = _run("-r", models, "--output", tmp_path / "out", "--to", "main", "--", str(script))
    assert proc.returncode == 1 and "not executable" in proc.stderr
    assert _branches(models) == {}


def test_output_directory_missing_after_the_command(tmp_path, data, models):
    proc = _run("-r", models, "--input", f"data={data[0]}@main", "--output", tmp_path / "never", "--to", "main",
                "--", PY, "-c", "pass")
    assert proc.returncode == 1
    assert "output directory" in proc.stderr and "does not exist after the command; nothing committed" in proc.stderr
    assert _branches(models) == {}


@pytest.mark.parametrize("args, message", [
    (["--input", "data={data}@nosuch"], "unknown revision 'nosuch'"),
    (["--input", "data={tmp}/missing@main"], "no commitfs repository at"),
    (["--input", "9data={data}@main"], "invalid input name"),
    (["--input", "data={data}@main", "--input", "DATA={data}@main"], "given twice"),
    (["--input", "data={data}"], "unknown revision"),
    (["--to", "{tmp}/missing@main"], "no commitfs repository at"),
    (["--to", "bad..name"], "invalid branch name"),
    ([], "run needs a command"),
])
def test_bad_arguments_fail_before_anything_is_mounted(tmp_path, data, models, args, message):
    args = [a.format(data=data[0], tmp=tmp_path) for a in args]
    if not any(a == "--to" for a in args):
        args += ["--to", "main"]
    command = [] if message == "run needs a command" else ["--", PY, "-c", "pass"]
    proc = _run("-r", models, *args, "--output", tmp_path / "out", *command)
    # A missing command is bad usage (exit 2, CLI.md "Exit codes"); the rest are errors.
    assert proc.returncode == (2 if message == "run needs a command" else 1), proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert _branches(models) == {}


def test_run_without_inputs_and_without_git(tmp_path, models):
    proc = _run("-r", models, "--output", tmp_path / "out", "--to", "main", "--",
                PY, "-c", "import os; os.makedirs(os.environ['COMMITFS_OUTPUT']); print('hello')", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "hello"  # the command's own output passes through
    meta = json.loads(cfs("-r", models, "show", lines[-1], "--json").stdout)["metadata"]
    assert "lineage.code.git_commit" not in meta and not any(k.startswith("lineage.input.") for k in meta)
    assert meta["lineage.run.exit_code"] == "0"


def test_python_api_runs_the_same_code(tmp_path, data, models):
    """commitfs.run is ops.run, as the CLI calls it: inputs mounted, output committed with lineage."""
    import commitfs

    script = _script(tmp_path, "copy.py", """
        import os, shutil
        os.makedirs(os.environ["COMMITFS_OUTPUT"])
        shutil.copy(os.path.join(os.environ["COMMITFS_INPUT_DATA"], "labels.csv"), os.environ["COMMITFS_OUTPUT"])
    """)
    result = commitfs.run([PY, script], inputs={"data": f"{data[0]}@main"}, output=tmp_path / "out",
                          to=f"{models}@trained", cwd=tmp_path)
    assert result.status == "committed" and result.exit_code == 0
    meta = json.loads(cfs("-r", models, "show", "trained", "--json").stdout)
    assert meta["id"] == result.commit_id.hex() and meta["metadata"]["lineage.input.0"] == f"{data[0]}@{data[1]}"
    failed = commitfs.run([PY, "-c", "raise SystemExit(4)"], output=tmp_path / "out2", to=f"{models}@trained")
    assert (failed.status, failed.exit_code, failed.commit_id) == ("failed", 4, None)
    assert _branches(models) == {"trained": result.commit_id.hex()}
