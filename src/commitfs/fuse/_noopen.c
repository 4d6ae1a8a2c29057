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
 * headers: untested here, where Debian 12 has 3.14).  Loaded with
 * RTLD_GLOBAL before pyfuse3 (fuse/fastpath.py, in the daemon only), this
 * definition is the one pyfuse3's reference binds to: the dynamic linker looks
 * in the global scope before a library's own dependencies.  The wrapper copies
 * the table, puts read_shim in the read slot and calls libfuse's own
 * fuse_session_new with the copy (libfuse copies the table into the session).
 * read_shim, once enable(True) was called, replaces a file handle of 0 by the
 * inode and calls pyfuse3's read callback: pyfuse3's Python read() gets the
 * inode as fh, which is what Operations.read expects in no-open mode.
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

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata) {
    static new_fn real = NULL;
    if (real == NULL)
        real = (new_fn)libfuse_symbol("fuse_session_new");
    if (real == NULL || real == fuse_session_new)
        return NULL;  /* no libfuse behind this one: pyfuse3.init fails loudly */
    wrapped = 0;
    const struct fuse_lowlevel_ops *table = wrap_table(op, op_size);
    struct fuse_session *se = real(args, table, op_size, userdata);
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
        return NULL;  /* not reached with a libfuse older than 3.17: nothing references it */
    wrapped = 0;
    const struct fuse_lowlevel_ops *table = wrap_table(op, op_size);
    struct fuse_session *se = real(args, table, op_size, version, userdata);
    if (table != op)
        wrapped = se != NULL;
    return se;
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
