"""issue 17: configuration files (user and repository), precedence flag >
environment > repository file > user file > default, and --author."""

from __future__ import annotations

import json

import pytest

from core_fixtures import assert_one_line_error, run_cli, write_file
from commitfs.cli import main


@pytest.fixture
def env(tmp_path, monkeypatch, cache_home):
    """An empty user configuration directory and a project directory as cwd."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for var in ("COMMITFS_REPO", "COMMITFS_AUTHOR", "COMMITFS_CACHE_SIZE", "COMMITFS_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    project = tmp_path / "project" / "sub"
    project.mkdir(parents=True)
    monkeypatch.chdir(project)
    return tmp_path


def user_config(env, text: str):
    write_file(env / "xdg-config" / "commitfs" / "config.toml", text.encode())


def project_config(env, text: str):
    write_file(env / "project" / ".commitfs" / "config.toml", text.encode())


def run(capsys, *argv):
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _author(capsys, *argv) -> str:
    rc, out, err = run(capsys, "log", "-n", "1", "--json", *argv)
    assert rc == 0, err
    return json.loads(out)[0]["author"]


def test_repo_and_author_precedence(env, capsys, monkeypatch):
    data = env / "data"
    write_file(data / "f.txt", b"1")
    user_repo, project_repo = str(env / "user-repo"), str(env / "project-repo")
    user_config(env, f'repo = "{user_repo}"\nauthor = "User File <u@example.com>"\n')
    assert run(capsys, "init")[0] == 0 and (env / "user-repo" / "config").exists()
    assert run(capsys, "commit", data, "-m", "one")[0] == 0
    assert _author(capsys) == "User File <u@example.com>"
    # The repository's (project's) file wins over the user's, key by key.
    project_config(env, f'repo = "{project_repo}"\n')
    assert run(capsys, "init")[0] == 0 and (env / "project-repo" / "config").exists()
    assert run(capsys, "commit", data, "-m", "one")[0] == 0
    assert _author(capsys) == "User File <u@example.com>"  # author still from the user file
    project_config(env, f'repo = "{project_repo}"\nauthor = "Project <p@example.com>"\n')
    write_file(data / "f.txt", b"2")
    assert run(capsys, "commit", data, "-m", "two")[0] == 0
    assert _author(capsys) == "Project <p@example.com>"
    # The environment wins over the files; a flag over the environment.
    monkeypatch.setenv("COMMITFS_AUTHOR", "Env <e@example.com>")
    monkeypatch.setenv("COMMITFS_REPO", user_repo)
    write_file(data / "f.txt", b"3")
    assert run(capsys, "commit", data, "-m", "three")[0] == 0
    assert _author(capsys) == "Env <e@example.com>"
    assert len(json.loads(run(capsys, "log", "--json")[1])) == 2  # in the user repo: one, three
    write_file(data / "f.txt", b"4")
    assert run(capsys, "-r", project_repo, "commit", data, "-m", "four", "--author", "Flag <f@example.com>")[0] == 0
    assert _author(capsys, "-r", project_repo) == "Flag <f@example.com>"


@pytest.mark.timeout(60)
def test_endpoint_precedence(env, capsys, monkeypatch, s3_url, s3_server):
    good, bad = s3_server.endpoint_url, "http://127.0.0.1:9"  # nothing listens on port 9
    assert run(capsys, "-r", s3_url, "init")[0] == 0
    for var in ("AWS_ENDPOINT_URL", "COMMITFS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    # Only the file names the endpoint: it is used.
    user_config(env, f'endpoint_url = "{good}"\n')
    rc, out, err = run(capsys, "-r", s3_url, "log")
    assert rc == 0 and "no commits yet" in err
    # The environment wins over the file (a bad endpoint in the file is not tried).
    user_config(env, f'endpoint_url = "{bad}"\n')
    monkeypatch.setenv("AWS_ENDPOINT_URL", good)
    assert run(capsys, "-r", s3_url, "log")[0] == 0
    # The flag wins over both.
    monkeypatch.setenv("AWS_ENDPOINT_URL", bad)
    assert run(capsys, "-r", s3_url, "--endpoint-url", good, "log")[0] == 0


@pytest.mark.timeout(60)
def test_cache_size_from_the_files(env, mounts, monkeypatch, capsys):
    url = str(env / "repo")
    data = env / "data"
    write_file(data / "f.txt", b"1")
    assert run(capsys, "-r", url, "init")[0] == 0
    assert run(capsys, "-r", url, "commit", data, "-m", "one")[0] == 0
    project_config(env, 'cache_size = "3M"\n')
    mnt = mounts.mountpoint()
    proc = run_cli("-r", url, "mount", "main", str(mnt), cwd=env / "project" / "sub")
    mounts.made.append(str(mnt))
    assert proc.returncode == 0, proc.stderr
    (m,) = [m for m in json.loads(run_cli("mounts", "--json").stdout) if m["mountpoint"] == str(mnt)]
    assert m["cache_size"] == 3 << 20


@pytest.mark.parametrize("text, message", [
    ('repo = "x"\nrepo = "y"\n', "not valid TOML"),
    ("colour = 'red'\n", "unknown setting 'colour'"),
    ("cache_size = 3\n", "cache_size must be a string"),
])
def test_a_bad_file_is_a_one_line_error(env, capsys, text, message):
    user_config(env, text)
    rc, out, err = run(capsys, "-r", env / "r", "log")
    line = assert_one_line_error(rc, err, 1)
    assert message in line and str(env / "xdg-config" / "commitfs" / "config.toml") in line
