"""The compiled modules of commitfs (pyproject.toml holds everything else).

Two hot loops of a mount, each in C beside the Python that does the same:
commitfs.model._fastdecode decodes and encodes a tree (Tree.decode, Tree.encode), and
commitfs.repo._fastread reads a small file whole (Repository.load_file).  Both
are optional: without a C compiler the install goes on, and the Python code
does the same work, slower.  commitfs.ops._fastscan reads a batch of a
commit's small files with the GIL released once (snapshot.prepare_batch),
optional in the same way.  Each returns None for anything but the plain valid
case, so the Python code alone reports errors.

commitfs.fuse._noopen lets a read-only mount run in FUSE's no-open mode with
the stock pyfuse3 that pip installs (the comment atop _noopen.c says how);
it needs libfuse3's headers (libfuse3-dev, as pyfuse3 itself does).  Optional
too: without it a mount still works, one round trip per open(), and says so
loudly (commitfs mount, commitfs mounts, the daemon's log)."""

import shlex
import subprocess

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall"]
VARINT = dict(include_dirs=["src/commitfs/model"], depends=["src/commitfs/model/_varint.h"])


def fuse3() -> dict:
    """Compiler and linker flags of libfuse3 from pkg-config (Debian's defaults without it)."""
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = "-I/usr/include/fuse3 -lfuse3 -lpthread"
    words = shlex.split(out)
    return dict(include_dirs=[w[2:] for w in words if w.startswith("-I")],
                library_dirs=[w[2:] for w in words if w.startswith("-L")],
                libraries=[w[2:] for w in words if w.startswith("-l")],
                extra_compile_args=FLAGS + [w for w in words if w.startswith("-D")])


setup(ext_modules=[
    Extension("commitfs.model._fastdecode", ["src/commitfs/model/_fastdecode.c"], optional=True,
              extra_compile_args=FLAGS, **VARINT),
    Extension("commitfs.repo._fastread", ["src/commitfs/repo/_fastread.c"], optional=True,
              extra_compile_args=FLAGS, **VARINT),
    Extension("commitfs.ops._fastscan", ["src/commitfs/ops/_fastscan.c"], optional=True, extra_compile_args=FLAGS),
    Extension("commitfs.fuse._noopen", ["src/commitfs/fuse/_noopen.c"], optional=True, **fuse3()),
])
