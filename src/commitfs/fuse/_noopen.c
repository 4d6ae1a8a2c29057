/* commitfs.fuse._noopen: FUSE's no-open mode with a stock pyfuse3.
 *
 * A read-only commitfs mount answers the first OPEN with ENOSYS; from then on
 * the kernel opens every file itself (no round trip per open(), page cache
 * kept: fuse/adapter.py).  Every READ then carries file handle 0, and pyfuse3
 * passes read() only (fh, off, size): the inode libfuse hands its C callback
 * is dropped, so the file system cannot tell which file is read.
 *
 * This module puts the inode back without touching pyfuse3.  It defines
 * fuse_session_new (libfuse's public, ABI-stable entry point, the one call
 * pyfuse3.init makes to hand libfuse its table of callbacks; and
 * fuse_session_new_versioned, which that call becomes with libfuse >= 3.17's
 * headers: untested here, where Debian 12 has 3.14).  Made global before
 * pyfuse3 is loaded (fuse/fastpath.py, in the daemon only), this
 * definition is the one pyfuse3's reference binds to: the dynamic linker looks
 * in the global scope before a library's own dependencies.  The wrapper copies
 * the table, puts read_shim in the read slot and calls libfuse's own
 * fuse_session_new with the copy (libfuse copies the table into the session).
 * read_shim, once enable(True) was called, replaces a file handle of 0 by the
 * inode and calls pyfuse3's read callback: pyfuse3's Python read() gets the
 * inode as fh, which is what Operations.read expects in no-open mode.
 *
 * The module is imported without RTLD_GLOBAL (its definitions then catch
 * nothing) and first bind()s: it finds libfuse's own fuse_session_new.  Only
 * if that succeeds does fastpath.py make_global() it; otherwise pyfuse3 binds
 * libfuse's function directly and the mount runs as with pyfuse3 alone (one
 * round trip per open, with the WARNING), never fails for want of it.
 *
 * Nothing is decided here blindly: wrapped() says whether the last
 * fuse_session_new went through the wrapper (it does not if pyfuse3 was loaded
 * first, or links libfuse some other way), and the daemon turns no-open mode
 * on only then (fuse/fastpath.py).  Until enable(True), read_shim passes
 * every READ through untouched, so writable mounts and mounts that answer
 * OPEN see pyfuse3 exactly as released.  Depends on libfuse3's public ABI
 * only: the offset of `read` in struct fuse_lowlevel_ops and of `fh` in
 * struct fuse_file_info, both fixed within libfuse 3 (the structs only grow
 * at the end).  Only the READ callback is touched; pyfuse3 runs its requests
 * on one thread (trio), so the flags below need no lock. */

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 32  /* what pyfuse3 3.5.0 builds with */
#endif
/* The header declares fuse_session_new; this file defines its own under that
   name, so the header's declaration is renamed out of the way. */
#define fuse_session_new commitfs_libfuse_session_new_decl
#include <fuse_lowlevel.h>
#undef fuse_session_new
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata);

typedef void (*read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef struct fuse_session *(*new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);

static read_fn pyfuse3_read = NULL;  /* pyfuse3's own read callback */
static int wrapped = 0;              /* the last fuse_session_new went through the wrapper */
static int enabled = 0;              /* rewrite fh 0 to the inode (no-open mode is on) */
static unsigned long long rewritten = 0;  /* READs whose fh 0 became the inode */

static void read_shim(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    /* fi is libfuse's own, on its stack for this call only (do_read). */
    if (enabled && fi != NULL && fi->fh == 0) {
        fi->fh = ino;
        rewritten++;
    }
    pyfuse3_read(req, ino, size, off, fi);
}

/* libfuse's own definition of NAME: looked up in the libfuse3 this module links
   (found from one of its functions), the same file pyfuse3 links; never this
   module's own (a library handle's lookup does not search the global scope). */
static void *libfuse_symbol(const char *name) {
    Dl_info info;
    if (!dladdr((void *)fuse_session_unmount, &info) || info.dli_fname == NULL)
        return NULL;
    void *lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL)
        return NULL;
    void *sym = dlsym(lib, name);
    dlclose(lib);  /* still loaded: this module links it */
    return sym;
}

/* The table to hand libfuse in place of ``op``: a copy with read_shim in the READ
   slot, or ``op`` itself when there is nothing to wrap (no read callback, a table
   too short to have one, or one already wrapped: libfuse's compatibility entry
   points may call the versioned one below). */
static const struct fuse_lowlevel_ops *wrap_table(const struct fuse_lowlevel_ops *op, size_t op_size) {
    static struct fuse_lowlevel_ops *table = NULL;  /* libfuse copies it into the session */
    static size_t table_size = 0;
    if (op == NULL || op_size < offsetof(struct fuse_lowlevel_ops, read) + sizeof(read_fn)
            || op->read == NULL || op->read == read_shim)
        return op;
    if (table_size < op_size) {
        struct fuse_lowlevel_ops *grown = realloc(table, op_size);
        if (grown == NULL)
            return op;
        table = grown;
        table_size = op_size;
    }
    memcpy(table, op, op_size);
    pyfuse3_read = op->read;
    table->read = read_shim;
    return table;
}

static new_fn real_new = NULL;  /* libfuse's own fuse_session_new (bind) */

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata) {
    if (real_new == NULL)
        return NULL;  /* not reached: fastpath.py makes this module global only after bind() */
    wrapped = 0;
    const struct fuse_lowlevel_ops *table = wrap_table(op, op_size);
    struct fuse_session *se = real_new(args, table, op_size, userdata);
    if (table != op)
        wrapped = se != NULL;
    return se;
}

/* libfuse >= 3.17's headers make fuse_session_new an inline function that calls
   this one (with the library version the caller was built against); a pyfuse3
   built against them references it instead.  Same wrapper. */
struct libfuse_version;
typedef struct fuse_session *(*new_versioned_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
                                                 struct libfuse_version *, void *);
struct fuse_session *fuse_session_new_versioned(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                                size_t op_size, struct libfuse_version *version,
                                                void *userdata);

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new_versioned(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                                size_t op_size, struct libfuse_version *version,
                                                void *userdata) {
    static new_versioned_fn real = NULL;
    if (real == NULL)
        real = (new_versioned_fn)libfuse_symbol("fuse_session_new_versioned");
    if (real == NULL || real == fuse_session_new_versioned)
        return NULL;  /* not reached with a libfuse older than 3.17: nothing references it
                         (and bind() refuses a libfuse that has neither function) */
    wrapped = 0;
    const struct fuse_lowlevel_ops *table = wrap_table(op, op_size);
    struct fuse_session *se = real(args, table, op_size, version, userdata);
    if (table != op)
        wrapped = se != NULL;
    return se;
}

/* bind(name): find libfuse's own function NAME (fuse_session_new), the one the
   wrapper calls.  False if there is none but this module's own (a libfuse
   linked some other way): the module must then stay out of the global scope. */
static PyObject *py_bind(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    void *sym = libfuse_symbol(name);
    if (sym == NULL || sym == (void *)fuse_session_new || sym == (void *)fuse_session_new_versioned)
        return PyBool_FromLong(0);
    real_new = (new_fn)sym;
    return PyBool_FromLong(1);
}

/* make_global(): this module (loaded without RTLD_GLOBAL) joins the global scope,
   so a library loaded after it (pyfuse3) binds fuse_session_new to the wrapper.
   Refused before a successful bind(). */
static PyObject *py_make_global(PyObject *self, PyObject *unused) {
    Dl_info info;
    if (real_new == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() did not find libfuse's fuse_session_new");
        return NULL;
    }
    if (!dladdr((void *)py_make_global, &info) || info.dli_fname == NULL)
        return PyBool_FromLong(0);
    void *own = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
    if (own == NULL)
        return PyBool_FromLong(0);
    dlclose(own);  /* still loaded: Python holds it */
    return PyBool_FromLong(1);
}

static PyObject *py_wrapped(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(wrapped);
}

static PyObject *py_enable(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    if (on && !wrapped) {
        PyErr_SetString(PyExc_RuntimeError, "no FUSE session went through commitfs's fuse_session_new");
        return NULL;
    }
    enabled = on;
    Py_RETURN_NONE;
}

static PyObject *py_rewritten(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(rewritten);
}

static PyMethodDef methods[] = {
    {"bind", py_bind, METH_O,
     "bind(name) -> bool: libfuse's own function NAME (\"fuse_session_new\") was found; the wrapper "
     "calls it.  False: leave this module out of the global scope (fastpath.py)."},
    {"make_global", py_make_global, METH_NOARGS,
     "make_global() -> bool: this module is now in the global symbol scope, so a library loaded "
     "later (pyfuse3) calls its fuse_session_new (RuntimeError before a successful bind())."},
    {"wrapped", py_wrapped, METH_NOARGS,
     "wrapped() -> bool: the last FUSE session was made through this module's fuse_session_new "
     "(its READs pass read_shim)."},
    {"enable", py_enable, METH_O,
     "enable(on): from now on a READ with file handle 0 reaches pyfuse3's read() with the inode "
     "as fh (RuntimeError unless wrapped())."},
    {"rewritten", py_rewritten, METH_NOARGS,
     "rewritten() -> int: READs whose file handle 0 was replaced by the inode."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "commitfs.fuse._noopen",
    "FUSE's no-open mode with a stock pyfuse3 (see the comment atop _noopen.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__noopen(void) {
    return PyModule_Create(&module);
}
