"""The compiled modules of commitfs (pyproject.toml holds everything else).

Two hot loops of a mount, each in C beside the Python that does the same:
commitfs.model._fastdecode decodes a tree (Tree.decode), and
commitfs.repo._fastread reads a small file whole (Repository.load_file).  Both
are optional: without a C compiler the install goes on, and the Python code
does the same work, slower.  Each returns None for anything but the plain valid
case, so the Python code alone reports errors."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall"]
VARINT = dict(include_dirs=["src/commitfs/model"], depends=["src/commitfs/model/_varint.h"])

setup(ext_modules=[
    Extension("commitfs.model._fastdecode", ["src/commitfs/model/_fastdecode.c"], optional=True,
              extra_compile_args=FLAGS, **VARINT),
    Extension("commitfs.repo._fastread", ["src/commitfs/repo/_fastread.c"], optional=True,
              extra_compile_args=FLAGS, **VARINT),
])
