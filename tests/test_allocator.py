"""The CLI's commit fixes glibc's mmap threshold (ops/snapshot.bound_allocator).

glibc raises its threshold each time a block it mmap'ed is freed, so that a
process freeing large blocks soon serves them from its heaps and arenas, where
a commit's freed read windows and pack buffers stay resident (docs/BENCH.md,
the core section's peak memory).  These tests watch the mechanism itself
through mallinfo2's count of mmap'ed bytes, in fresh interpreters.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from commitfs.ops import snapshot
from core_fixtures import cli_env, write_file

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

PROBE = r"""
import ctypes, sys
from commitfs.ops.snapshot import bound_allocator

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
set_here = bound_allocator() if sys.argv[1] == "bound" else None
mapped = []
for _ in range(3):  # a 4 MiB block, freed, then another: mmap'ed each time?
    before = libc.mallinfo2().hblkhd
    block = bytearray(4 << 20)
    mapped.append(libc.mallinfo2().hblkhd - before >= 4 << 20)
    del block
print(set_here, *mapped)
"""


def _probe(mode: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env=cli_env(**env), timeout=60, check=True).stdout
    return out.split()


def test_with_the_threshold_fixed_large_blocks_are_mmaped_after_one_is_freed():
    # glibc's default: the first block is mmap'ed; freeing it raises the threshold past
    # 4 MiB, so the next ones come from the heap (and stay there when freed).
    assert _probe("default") == ["None", "True", "False", "False"]
    assert _probe("bound") == ["True", "True", "True", "True"]


def test_a_threshold_the_user_set_is_left_alone():
    assert _probe("bound", MALLOC_MMAP_THRESHOLD_="65536")[0] == "False"
    assert _probe("bound", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")[0] == "False"


def test_the_commit_command_bounds_its_allocator(tmp_path, cache_home, monkeypatch):
    from commitfs.cli import main

    calls = []
    monkeypatch.setattr(snapshot, "bound_allocator", lambda: calls.append(True) or True)
    write_file(tmp_path / "src" / "a.txt", b"a")
    url = str(tmp_path / "repo")
    assert main(["init", "-r", url]) == 0
    assert main(["commit", "-r", url, str(tmp_path / "src"), "-m", "one"]) == 0
    assert calls == [True]
