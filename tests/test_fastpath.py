"""issue 19: the fast path for everyone who installs commitfs.

A wheel built from this checkout by pip (setup.py's C modules, nothing else),
installed with pip into a new virtualenv beside pyfuse3 3.5.0 as released
(from the index; pip's wheel cache keeps its build), mounts read-only in
FUSE's no-open mode: the kernel opens files itself, so a warm re-read sends no
OPEN.  The other dependencies (pure packages the fast path does not touch)
come from this test run's own environment through a .pth file written after
the installs, so the installed commitfs and the stock pyfuse3 come first on
the path; the test checks that they are the ones imported.

Skipped only where commitfs's C modules cannot be built at all (no C compiler
or no libfuse3 headers: scripts/setup.sh installs both, so CI runs it).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from core_fixtures import write_file
from commitfs.fuse.lifecycle import lookup_daemon_pid
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 600  # the first run builds pyfuse3 from its sdist (about a minute, more under load)


def _cannot_build() -> str | None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler"
    if shutil.which("pkg-config") is None or subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode:
        return "no libfuse3 headers (libfuse3-dev, pkg-config)"
    return None


def _run(cmd, env, timeout=BUILD_TIMEOUT_S) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """This run's environment without what points Python at the checkout or forces the fallback."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMMITFS_NO_FASTPATH")}
    env.update(extra)
    return env


class Installed:
    def __init__(self, venv: Path):
        self.venv = venv
        self.python = venv / "bin" / "python"
        self.commitfs = venv / "bin" / "commitfs"

    def run(self, *args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.commitfs), *args], capture_output=True, text=True,
                              env=env if env is not None else _clean_env(), timeout=timeout)


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    why = _cannot_build()
    if why:
        pytest.skip(f"commitfs's C modules cannot be built here: {why}")
    base = tmp_path_factory.mktemp("pip-install")
    env = _clean_env()
    # The checkout as pip sees it, without this tree's in-place build products.
    src = base / "checkout"
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = base / "wheels"
    # --no-build-isolation: the build backend (setuptools) of this environment, no download.
    _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], env)
    (wheel,) = wheels.glob("commitfs-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env)
    py = venv / "bin" / "python"
    _run(pip + ["--python", py, "install", "--no-deps", wheel, "pyfuse3==3.5.0"], env)
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env).strip()
    (Path(purelib) / "zz_test_dependencies.pth").write_text("".join(p + "\n" for p in site.getsitepackages()))
    return Installed(venv)


def _data(d: Path) -> dict[str, bytes]:
    files = {f"img/{i:03d}.bin": os.urandom(2_000 + 37 * i) for i in range(40)}
    files["weights/model.bin"] = os.urandom(3 << 20)
    files["labels.csv"] = b"id,label\n" + b"".join(b"%d,cat\n" % i for i in range(500))
    for rel, data in files.items():
        write_file(d / rel, data)
    return files


def _mount(installed: Installed, mounts, url: str, mnt: Path, log: Path, env) -> subprocess.CompletedProcess:
    mounts.made.append(str(mnt))  # unmounted by the fixture even if the test fails
    return installed.run("-r", url, "mount", "--cache-dir", str(mounts.cache_dir), "--log-file", str(log),
                         "main", str(mnt), env=env)


def _read_everything(mnt: Path, files: dict[str, bytes]) -> int:
    opened = 0
    for rel, want in files.items():
        with open(mnt / rel, "rb") as f:
            assert f.read() == want, rel
        opened += 1
    return opened


def _logged(text: str, what: str) -> int:
    (n,) = [int(line.rsplit(": ", 1)[1]) for line in text.splitlines() if what in line]
    return n


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_a_pip_installed_commitfs_mounts_with_the_fast_path(installed, mounts, local_url, tmp_path):
    """The installed commitfs and the stock pyfuse3 are the ones imported; a read-only mount
    by that commitfs is in no-open mode (its record and `commitfs mounts` say so, no
    warning); a first read and a warm re-read of every file are right and send at most one
    OPEN request in all, every READ arriving by inode."""
    env = _clean_env()
    probe = ("import json, commitfs, commitfs.fuse._noopen as n, pyfuse3; "
             "print(json.dumps([commitfs.__file__, n.__file__, pyfuse3.__file__, "
             "hasattr(pyfuse3, 'READ_FH_ZERO_IS_INODE')]))")
    *paths, patched = json.loads(_run([installed.python, "-c", probe], env))
    assert all(p.startswith(str(installed.venv) + "/") for p in paths), paths
    assert patched is False  # pyfuse3 as released, not a patched build

    files = _data(tmp_path / "data")
    with Repository.init(local_url) as repo:
        commit_directory(repo, tmp_path / "data", message="one")
    mnt, log = mounts.mountpoint(), tmp_path / "mount.log"
    proc = _mount(installed, mounts, local_url, mnt, log, env)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    pid = lookup_daemon_pid(mnt)
    assert pid is not None
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().startswith(str(installed.venv))
    (m,) = [m for m in json.loads(installed.run("mounts", "--json").stdout) if m["mountpoint"] == str(mnt)]
    assert m["fast_open"] is True and m["fast_path_missing"] is None
    listing = installed.run("mounts")  # other mounts of the machine are listed too
    (line,) = [x for x in listing.stdout.splitlines() if x.startswith(f"{mnt}: ")]
    assert "(read-only)" in line and str(mnt) not in listing.stderr

    _read_everything(mnt, files)  # first read
    _read_everything(mnt, files)  # warm re-read: the kernel's alone
    assert installed.run("umount", str(mnt)).returncode == 0
    text = log.read_text()
    assert "files are opened by the kernel alone" in text and "without commitfs's fast path" not in text
    assert _logged(text, "OPEN requests: ") <= 1
    assert _logged(text, "READs by inode (fast path): ") >= len(files)


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_a_pip_installed_commitfs_without_the_fast_path_warns(installed, mounts, local_url, tmp_path):
    """COMMITFS_NO_FASTPATH=1 (the fallback of a commitfs installed without its C module):
    the mount works, with the same bytes and one OPEN request per open, and says so at
    `commitfs mount`, in `commitfs mounts` (marked, warned, --json) and in its log."""
    files = _data(tmp_path / "data")
    with Repository.init(local_url) as repo:
        commit_directory(repo, tmp_path / "data", message="one")
    mnt, log = mounts.mountpoint(), tmp_path / "mount.log"
    slow = _clean_env(COMMITFS_NO_FASTPATH="1")
    proc = _mount(installed, mounts, local_url, mnt, log, slow)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("commitfs: warning: this mount runs without commitfs's fast path "
                                  "(COMMITFS_NO_FASTPATH=1 is set): every open() is a round trip"), proc.stderr
    listing = installed.run("mounts")  # without the variable: the record says it
    (line,) = [x for x in listing.stdout.splitlines() if x.startswith(f"{mnt}: ")]
    assert "(read-only, without the fast path)" in line
    assert f"commitfs: warning: {mnt}: this mount runs without commitfs's fast path" in listing.stderr
    (m,) = [m for m in json.loads(installed.run("mounts", "--json").stdout) if m["mountpoint"] == str(mnt)]
    assert m["fast_open"] is False and m["fast_path_missing"] == "COMMITFS_NO_FASTPATH=1 is set"

    opened = _read_everything(mnt, files) + _read_everything(mnt, files)
    assert installed.run("umount", str(mnt)).returncode == 0
    text = log.read_text()
    assert "WARNING" in text and "files are opened by the daemon" in text
    assert _logged(text, "OPEN requests: ") >= opened
    assert _logged(text, "READs by inode (fast path): ") == 0


@pytest.mark.timeout(60)
def test_the_fast_path_is_engaged_only_when_pyfuse3s_session_went_through_it():
    """fastpath.engage() is decided from the fact: with pyfuse3 imported before
    commitfs.fuse.fastpath the hook cannot take effect and it says so; with the hook
    loaded but no FUSE session made through it, it refuses too; and nothing of it is
    loaded by `import commitfs` (no fuse_session_new of commitfs's in the global scope
    of processes that do not serve a mount)."""
    cases = {
        "import pyfuse3\nfrom commitfs.fuse import fastpath\nprint(fastpath.engage())":
            "pyfuse3 was imported before commitfs.fuse",
        "from commitfs.fuse import fastpath\nimport pyfuse3\nprint(fastpath.engage())":
            "pyfuse3's FUSE session did not go through commitfs.fuse._noopen",
        "import sys, commitfs, commitfs.api, commitfs.fuse.lifecycle, commitfs.cli.mount, commitfs.cli.mounts\n"
        "print(sorted(m for m in sys.modules if 'noopen' in m or 'fastpath' in m))":
            "[]",
    }
    for code, want in cases.items():
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == want, code


@pytest.mark.timeout(120)
def test_a_libfuse_whose_own_session_function_cannot_be_found_mounts_without_the_fast_path(
        mounts, local_url, tmp_path):
    """The C module is made global only once it has found libfuse's own fuse_session_new
    (the function its wrapper calls).  Where it cannot (COMMITFS_TEST_LIBFUSE_SYMBOL names a
    function libfuse does not have), the mount is still made, by pyfuse3 with libfuse's own
    function: every byte right, one OPEN per open, and the warning that says why, at
    `commitfs mount` and in the log.  (It once failed the mount: the wrapper, already
    global, returned no session.)"""
    from core_fixtures import cli_env
    from mount_fixtures import run_commitfs

    files = _data(tmp_path / "data")
    with Repository.init(local_url) as repo:
        commit_directory(repo, tmp_path / "data", message="one")
    mnt, log = mounts.mountpoint(), tmp_path / "mount.log"
    env = dict(cli_env(), COMMITFS_TEST_LIBFUSE_SYMBOL="commitfs_no_such_libfuse_function")
    proc = mounts.mount(local_url, mnt, "--log-file", str(log), rev="main", env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    why = "libfuse's own commitfs_no_such_libfuse_function was not found"
    assert proc.stderr.startswith("commitfs: warning: this mount runs without commitfs's fast path"), proc.stderr
    assert why in proc.stderr
    opened = _read_everything(mnt, files) + _read_everything(mnt, files)
    assert run_commitfs("umount", str(mnt)).returncode == 0
    text = log.read_text()
    assert "WARNING" in text and why in text and "files are opened by the daemon" in text
    assert _logged(text, "OPEN requests: ") >= opened
    assert _logged(text, "READs by inode (fast path): ") == 0


@pytest.mark.timeout(60)
def test_the_c_module_joins_the_global_scope_only_after_binding_libfuse():
    """bind() finds libfuse's own fuse_session_new (not the module's own definition) and
    refuses a name libfuse does not have, and then fastpath says why it is off;
    make_global() is refused before a successful bind() and done after one."""
    code = (
        "import os, sys\n"
        "from commitfs.fuse import fastpath, _noopen as n\n"
        "print(n.bind('commitfs_no_such_libfuse_function'))\n"
        "try:\n"
        "    n.make_global()\n"
        "except RuntimeError:\n"
        "    print('refused')\n"
        "print(fastpath.engage())\n")
    env = dict(os.environ, COMMITFS_TEST_LIBFUSE_SYMBOL="commitfs_no_such_libfuse_function")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "False", "refused",
        "libfuse's own commitfs_no_such_libfuse_function was not found beside the libfuse3 "
        "commitfs.fuse._noopen links"]
    env.pop("COMMITFS_TEST_LIBFUSE_SYMBOL")
    env.pop("COMMITFS_NO_FASTPATH", None)
    proc = subprocess.run([sys.executable, "-c", "from commitfs.fuse import _noopen as n\n"
                           "print(n.bind('fuse_session_new'), n.make_global())"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
