"""Directory listings through a read-only mount (issue 21: `find` of a mount): adaptive
readdirplus and the kernel's cache of commit directories' listings (fuse/fastpath.py,
commitfs.fuse._noopen), and the fallback without the C module.

Each mount is a ``commitfs mount`` daemon (the ``mounts`` fixture unmounts it); the counts
are the ones the daemon logs at unmount: "READDIR requests: N (plain: M); OPENDIRs
answered cacheable: K".
"""

from __future__ import annotations

import errno
import os
import re
import stat

import pytest
import trio

from core_fixtures import cli_env, write_file
from mount_fixtures import fs_of, run_commitfs, vfs_listdir
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from commitfs.vfs import ROOT_INODE

#: Files of the big directory: past the READDIRPLUS that begins a listing
#: (adapter.FIRST_PLUS_ENTRIES) and past one 32 KiB plain READDIR, so an adaptive
#: listing is READDIRPLUS, then plain READDIRs.
BIG = 2_500
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14


@pytest.fixture
def tree(tmp_path, cache_home):
    src = tmp_path / "src"
    for i in range(BIG):
        write_file(src / "big" / f"f{i:05d}.bin", b"%d\n" % i)
    for i in range(5):
        write_file(src / "big" / f"sub{i}" / "x.txt", b"x%d" % i)
    write_file(src / "small" / "a.txt", b"a")
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit_directory(repo, src, message="one")
    return url, src


def _counts(log) -> tuple[int, int, int]:
    (m,) = re.findall(r"READDIR requests: (\d+) \(plain: (\d+)\); OPENDIRs answered cacheable: (\d+)",
                      log.read_text())
    return tuple(int(x) for x in m)


def _listing(path) -> list[tuple[str, int, bool]]:
    with os.scandir(path) as it:
        return sorted((e.name, e.inode(), e.is_dir(follow_symlinks=False)) for e in it)


def _mount_and_list(mounts, url, tmp_path, name: str, times: int, rev: str | None = "main",
                    sub: str = "big", env=None):
    log = tmp_path / f"{name}.log"
    mnt = mounts.mountpoint(name)
    mounts.mount(url, mnt, "--log-file", str(log), rev=rev, env=env)
    listings = [_listing(mnt / sub) for _ in range(times)]
    assert run_commitfs("umount", str(mnt)).returncode == 0
    return listings, log


def _xattr_counts(log) -> tuple[int, int]:
    """(GETXATTRs answered ENODATA by the C module, GETXATTRs that reached the file system)."""
    (m,) = re.findall(r"GETXATTR requests: (\d+) answered ENODATA in C, (\d+) by the file system", log.read_text())
    return tuple(int(x) for x in m)


def _granted(log) -> int:
    (granted,) = re.findall(r"FUSE capabilities granted: 0x([0-9a-f]+)", log.read_text())
    return int(granted, 16)


@pytest.mark.parametrize("adaptive", [False, True], ids=["readdirplus", "adaptive"])
def test_a_commit_directory_listed_three_times_costs_the_readdirs_of_one_listing(tree, mounts, tmp_path,
                                                                                adaptive):
    """The kernel keeps a commit directory's listing (cache_readdir and keep_cache on its
    OPENDIR): listing it three times makes as many READDIR requests as listing it once
    (without the C module's OPENDIR flags: three times as many). By default every
    listing is READDIRPLUS (adaptive readdirplus not asked for at INIT); with
    COMMITFS_READDIRPLUS_AUTO=1 one starts with a READDIRPLUS and goes on in plain READDIRs."""
    url, src = tree
    env = cli_env(COMMITFS_READDIRPLUS_AUTO="1" if adaptive else "0")
    (once,), log1 = _mount_and_list(mounts, url, tmp_path, "once", 1, env=env)
    thrice, log3 = _mount_and_list(mounts, url, tmp_path, "thrice", 3, env=env)
    want = sorted(os.listdir(src / "big"))
    assert [n for n, _, _ in once] == want
    assert all(x == once for x in thrice)
    n1, plain1, cacheable1 = _counts(log1)
    n3, plain3, cacheable3 = _counts(log3)
    assert n1 >= 3 and cacheable1 >= 1
    assert (plain1 >= 1) == adaptive
    assert n3 == n1 and plain3 == plain1
    assert cacheable3 >= 3  # every OPENDIR of the directory was answered cacheable
    assert bool(_granted(log3) & FUSE_CAP_READDIRPLUS_AUTO) == adaptive


def test_ref_directories_are_not_cached_by_the_kernel(tree, mounts, tmp_path):
    """branches/ follows the refs: its listing is asked for every time."""
    url, _ = tree
    (once,), log1 = _mount_and_list(mounts, url, tmp_path, "once", 1, rev=None, sub="branches")
    thrice, log3 = _mount_and_list(mounts, url, tmp_path, "thrice", 3, rev=None, sub="branches")
    assert [n for n, _, _ in once] == ["main"]
    assert _counts(log3)[0] == 3 * _counts(log1)[0]


def test_inode_numbers_stay_the_same_through_plain_listings(tree, mounts, tmp_path):
    """With adaptive readdirplus (COMMITFS_READDIRPLUS_AUTO=1): a file looked up before a
    listing keeps its number through the listing's plain READDIRs (which count no
    reference, so forget nothing the kernel holds); every d_ino a listing shows is the
    st_ino stat gives, before and after; every file the kernel holds reads right by
    its inode."""
    url, src = tree
    log = tmp_path / "m.log"
    mnt = mounts.mountpoint()
    mounts.mount(url, mnt, "--log-file", str(log), rev="main", env=cli_env(COMMITFS_READDIRPLUS_AUTO="1"))
    late = mnt / "big" / f"f{BIG - 3:05d}.bin"  # in the plain part of the listing
    before = os.stat(late).st_ino
    listed = _listing(mnt / "big")
    assert dict((n, i) for n, i, _ in listed)[late.name] == before
    assert os.stat(late).st_ino == before
    files = [(n, i) for n, i, is_dir in listed if not is_dir]
    assert len(files) == BIG
    for name, ino in files:
        st = os.stat(mnt / "big" / name)
        assert st.st_ino == ino and stat.S_ISREG(st.st_mode), name
    assert len({i for _, i in files}) == BIG
    for name, _ in files[::97] + files[-5:]:
        assert (mnt / "big" / name).read_bytes() == (src / "big" / name).read_bytes()
    assert os.stat(late).st_ino == before
    for n, _, is_dir in listed:
        if is_dir:
            assert os.listdir(mnt / "big" / n) == ["x.txt"]
    assert run_commitfs("umount", str(mnt)).returncode == 0
    assert _counts(log)[1] >= 1  # the listing really went on in plain READDIRs


def test_without_the_c_module_listings_are_right_and_not_cached(tree, mounts, tmp_path):
    """COMMITFS_NO_FASTPATH=1: READDIRPLUS only, nothing cached, the same listing; the
    log says why (a WARNING). Also when adaptive readdirplus is asked for."""
    url, src = tree
    env = cli_env(COMMITFS_NO_FASTPATH="1", COMMITFS_READDIRPLUS_AUTO="1")
    listings, log = _mount_and_list(mounts, url, tmp_path, "slow", 3, env=env)
    assert all([n for n, _, _ in x] == sorted(os.listdir(src / "big")) for x in listings)
    assert all(x == listings[0] for x in listings)
    n, plain, cacheable = _counts(log)
    assert plain == 0 and cacheable == 0 and n >= 3 * 2
    assert re.search(r"WARNING .*directory listings are READDIRPLUS only and never cached by the kernel "
                     r"\(COMMITFS_NO_FASTPATH=1 is set\)", log.read_text())


async def _plain_listing(fs, ino: int) -> list[tuple[str, int, int]]:
    fh = await fs.opendir(ino)
    assert fs.listing_fixed(fh)
    got, start = [], 0
    try:
        while True:
            page = []

            def reply(name, ino, mode, next_id):
                if len(page) == 300:
                    return False
                page.append((name.decode(), ino, mode, next_id))
                return True

            await fs.readdir_plain(fh, start, reply)
            if not page:
                return [(n, i, m) for n, i, m, _ in got]
            got += page
            start = page[-1][3]
    finally:
        await fs.releasedir(fh)


def test_a_plain_listing_counts_no_reference(tree):
    """FileSystem.readdir_plain, without a kernel: the names, numbers and types readdir
    gives, and the table holds afterwards what it held before (nothing counted)."""
    url, _ = tree

    async def main():
        with Repository.open(url) as repo:
            async with fs_of(repo, repo.resolve("main")) as fs:
                big = (await fs.lookup(ROOT_INODE, b"big")).ino
                held = len(fs.table)
                first = await _plain_listing(fs, big)
                assert len(fs.table) == held  # nothing counted, nothing left behind
                counted = await vfs_listdir(fs, big)  # as READDIRPLUS: every entry held now
                assert [(n, m) for n, _, m in first] == [(n, a.mode) for n, a in counted]
                held = len(fs.table)
                again = await _plain_listing(fs, big)
                assert len(fs.table) == held
                # While the kernel holds entries of the directory, a file's number in a plain
                # listing is the one a counted listing (and a lookup) gives.
                assert [(n, i) for n, i, m in again if not stat.S_ISDIR(m)] == \
                    [(n, a.ino) for n, a in counted if not stat.S_ISDIR(a.mode)]
                root_fh = await fs.opendir(ROOT_INODE)
                assert fs.listing_fixed(root_fh)  # a commit's tree at the root
                await fs.releasedir(root_fh)

    trio.run(main)


def test_the_handle_bits_match_the_c_module():
    """adapter.PLAIN_FH and CACHE_FH are the C module's (skipped where it is not built)."""
    noopen = pytest.importorskip("commitfs.fuse._noopen")
    from commitfs.fuse import adapter
    assert (adapter.PLAIN_FH, adapter.CACHE_FH) == (noopen.PLAIN_FH, noopen.CACHE_FH)
    with pytest.raises(ValueError):
        noopen.request_capabilities(1 << 32)


@pytest.mark.timeout(60)
def test_a_c_module_built_from_an_older_source_leaves_listings_as_pyfuse3_has_them():
    """An in-place build not redone after an update: the module loads (the no-open mode
    still works) but has no listing functions; engage_listings (and engage_xattrs) says
    why instead of failing the mount, and the counts are zeros (in a subprocess: fastpath
    loads the module into the global scope of the process that imports it)."""
    import subprocess
    import sys

    pytest.importorskip("commitfs.fuse._noopen")
    code = (
        "from commitfs.fuse import fastpath\n"
        "class Old:\n"
        "    def wrapped(self): return True\n"
        "    def enable(self, on): pass\n"
        "fastpath._shim = Old()\n"
        "print(fastpath.engage_listings(True))\n"
        "print(fastpath.granted_capabilities(), fastpath.listing_counts())\n"
        "print(fastpath.engage_xattrs(b'user.commitfs.'))\n"
        "print(fastpath.xattrs_refused())\n"
        "fastpath.disengage()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=cli_env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("commitfs.fuse._noopen was built from an older source "
                        "(rebuild it: setup.py build_ext)")
    assert lines[1] == "None (0, 0)"
    assert lines[2] == lines[0]  # every GETXATTR then reaches the file system
    assert lines[3] == "0"


def test_getxattr_of_a_name_a_commit_never_has_is_answered_in_c(tree, mounts, tmp_path):
    """ls(1) asks for security.selinux and an ACL of every file it lists, and the kernel
    caches no answer: a name outside user.commitfs. is ENODATA from the C module, never
    a request of pyfuse3's; the mount's own attributes still come from the file system."""
    url, src = tree
    log = tmp_path / "m.log"
    mnt = mounts.mountpoint()
    mounts.mount(url, mnt, "--log-file", str(log), rev="main")
    files = sorted(os.listdir(mnt / "big"))[:100]
    for name in files:
        for attr in ("security.selinux", "user.other", "trusted.x", "system.posix_acl_access"):
            with pytest.raises(OSError) as err:
                os.getxattr(mnt / "big" / name, attr, follow_symlinks=False)
            assert err.value.errno == errno.ENODATA, (name, attr)
    path = mnt / "big" / files[0]
    assert os.getxattr(path, "user.commitfs.repo") == url.encode()
    assert len(os.getxattr(path, "user.commitfs.id")) == len(os.getxattr(path, "user.commitfs.commit"))
    assert sorted(os.listxattr(path)) == ["user.commitfs.commit", "user.commitfs.id", "user.commitfs.repo"]
    with pytest.raises(OSError) as err:
        os.getxattr(path, "user.commitfs.other")
    assert err.value.errno == errno.ENODATA
    assert run_commitfs("umount", str(mnt)).returncode == 0
    in_c, by_fs = _xattr_counts(log)
    assert in_c >= 3 * len(files)  # system.posix_acl_access may stop in the kernel
    assert by_fs == 4
