"""The FUSE front end: the pyfuse3 adapter, the mount daemon and its lifecycle.

Importing the package loads commitfs's no-open hook ahead of pyfuse3 (fastpath.py
says why it must come first); nothing else happens at import."""

from commitfs.fuse import fastpath as _fastpath

_fastpath.load()
