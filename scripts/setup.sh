#!/usr/bin/env bash
# Install everything commitfs needs on a fresh Debian machine (run as root):
# the FUSE 3 system packages, then a virtualenv in .venv with commitfs.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     plus the test dependencies (pytest, moto, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
# Every step that installs says so first (the first run takes minutes).
say() { echo "setup: $*" >&2; }

need_apt=0
# gcc, libfuse3-dev and the Python headers build pyfuse3 and commitfs's three C modules
# (setup.py; commitfs.fuse._noopen is the mount's fast path, fuse/fastpath.py);
# rsync: tests/test_workspace_posix.py copies into a workspace with rsync -a.
for bin in fusermount3 pkg-config gcc rsync; do command -v "$bin" >/dev/null || need_apt=1; done
pkg-config --exists fuse3 2>/dev/null || need_apt=1
if [ "$need_apt" = 1 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    say "installing system packages with apt-get: fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv rsync"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
        rsync >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating the virtualenv .venv"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The UI's browser tests drive Debian's chromium through its chromedriver
# (nothing downloads a browser at run time).
if [ "${1:-}" = "test" ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    say "installing chromium and chromium-driver with apt-get (the UI's browser tests)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# The review UI (extra "ui") for the demo and the tests.
extra="[ui]"
# The tests also run the PyTorch example: extra "example" pins the CPU build of
# torch (a plain "torch" requirement would pull a multi-GB CUDA build).
[ "${1:-}" = "test" ] && extra="[test,example,ui]"
say "installing commitfs with ${extra} and its Python dependencies into .venv (pip)"
.venv/bin/python -m pip install -q -e ".${extra}"
# The C modules are optional to pip (a machine without a compiler still installs);
# here they must have been built: without commitfs.fuse._noopen read-only mounts
# answer every open() (a round trip per file; they warn).
.venv/bin/python -c 'import commitfs.model._fastdecode, commitfs.repo._fastread, commitfs.fuse._noopen' \
    || { echo "setup: commitfs's C modules did not build (see setup.py)" >&2; exit 1; }
say "done: .venv/bin/commitfs"
