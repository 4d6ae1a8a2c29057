/* The reads of a commit's small files, compiled: snapshot.prepare_batch reads a
   batch of up to 64 small files in a pool thread, and in Python each file is an
   open, an fstat, a read and a close, each releasing and taking back the GIL
   that the committing thread and three other readers want (a million-file
   commit paid a context switch or more per file for it).  read_files does the
   same system calls for the whole batch with the GIL released once.

   It does exactly what snapshot._open_checked and snapshot._read_whole do in the
   common case, and hands every other case back: per file the result is
     - bytes: the file's content, read whole (``size`` bytes, the one read of
       size + 1 bytes returning exactly ``size``, as _read_whole takes it);
     - None: not the regular file the scan saw (_Changed: a symlink, FIFO or
       device there now, refused by O_NOFOLLOW or failing with ENXIO/ENODEV,
       or fstat naming something else);
     - an int: the errno of a failed open, fstat, read or close (the caller
       raises _read_error, as the Python path would);
     - False: not read whole by one read (grown, shrunk, a short read, a
       regular file refusing O_NONBLOCK): the caller reads it with _read_whole.
   Its input is prepare_batch's: (path, size[, where]) with ``where`` None or
   (directory fd or None, name, st_dev or None, st_ino or None).

   lstat_names does the same for the scan's stat of each entry of a directory
   (snapshot._scan_fd: fstatat relative to the directory, as DirEntry.stat),
   giving the six fields the scan uses as os.stat gives them. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    PyObject *target; /* bytes (the name or path, file system encoding), owned */
    int dir_fd;       /* AT_FDCWD: opened by path */
    int check;        /* compare st_dev, st_ino */
    dev_t dev;
    ino_t ino;
    Py_ssize_t size;
    PyObject *data;   /* bytes of size + 1, owned */
    Py_ssize_t got;
    int err;          /* an errno, or -1 changed, -2 not whole */
} Item;

static int parse_item(PyObject *t, Item *it) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 2 || PyTuple_GET_SIZE(t) > 3) {
        PyErr_SetString(PyExc_TypeError, "read_files: (path, size[, where]) tuples");
        return -1;
    }
    PyObject *path = PyTuple_GET_ITEM(t, 0), *name = path;
    PyObject *where = PyTuple_GET_SIZE(t) == 3 ? PyTuple_GET_ITEM(t, 2) : Py_None;
    it->size = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 1));
    if (it->size == -1 && PyErr_Occurred())
        return -1;
    if (it->size < 0 || it->size >= PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_ValueError, "read_files: a negative size");
        return -1;
    }
    it->dir_fd = AT_FDCWD;
    it->check = 0;
    if (where != Py_None) {
        if (!PyTuple_Check(where) || PyTuple_GET_SIZE(where) != 4) {
            PyErr_SetString(PyExc_TypeError, "read_files: where is (dir fd, name, dev, ino)");
            return -1;
        }
        PyObject *fd = PyTuple_GET_ITEM(where, 0), *dev = PyTuple_GET_ITEM(where, 2),
                 *ino = PyTuple_GET_ITEM(where, 3);
        if (fd != Py_None) {
            long v = PyLong_AsLong(fd);
            if (v == -1 && PyErr_Occurred())
                return -1;
            it->dir_fd = (int)v;
            name = PyTuple_GET_ITEM(where, 1);
        }
        if (ino != Py_None) {
            unsigned long long d = PyLong_AsUnsignedLongLong(dev);
            if (d == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            unsigned long long i = PyLong_AsUnsignedLongLong(ino);
            if (i == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            it->dev = (dev_t)d;
            it->ino = (ino_t)i;
            it->check = 1;
        }
    }
    it->target = NULL;
    if (!PyUnicode_FSConverter(name, &it->target))
        return -1;
    it->data = PyBytes_FromStringAndSize(NULL, it->size + 1);
    if (it->data == NULL) {
        Py_CLEAR(it->target);
        return -1;
    }
    return 0;
}

/* _open_checked + _read_whole's first read, without the GIL. */
static void read_one(Item *it, int flags) {
    const char *target = PyBytes_AS_STRING(it->target);
    int fd = it->dir_fd == AT_FDCWD ? open(target, flags) : openat(it->dir_fd, target, flags);
    if (fd < 0) {
        it->err = (errno == ELOOP || errno == ENXIO || errno == ENODEV) ? -1 : errno;
        return;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        it->err = errno;
        close(fd);
        return;
    }
    if (!S_ISREG(st.st_mode) || (it->check && (st.st_ino != it->ino || st.st_dev != it->dev))) {
        it->err = -1;
        close(fd);
        return;
    }
    char *buf = PyBytes_AS_STRING(it->data);
    ssize_t n;
    do {
        n = read(fd, buf, (size_t)it->size + 1);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        it->err = (errno == EAGAIN || errno == EWOULDBLOCK) ? -2 : errno;
        close(fd);
        return;
    }
    it->got = n;
    it->err = n == it->size ? 0 : -2;
    if (close(fd) != 0 && it->err == 0 && errno != EINTR)
        it->err = errno;
}

PyDoc_STRVAR(read_files_doc,
"read_files(files, flags) -> list: each of prepare_batch's (path, size[, where]) opened\n"
"with ``flags`` and read whole, the GIL released once: bytes, None (not the regular\n"
"file the scan saw), an errno, or False (read it with _read_whole).");

static PyObject *read_files(PyObject *self, PyObject *args) {
    PyObject *files;
    int flags;
    if (!PyArg_ParseTuple(args, "O!i", &PyList_Type, &files, &flags))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(files);
    Item *items = PyMem_Calloc(n ? n : 1, sizeof(Item));
    if (items == NULL)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    Py_ssize_t parsed = 0;
    for (; parsed < n; parsed++)
        if (parse_item(PyList_GET_ITEM(files, parsed), &items[parsed]) < 0)
            goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        read_one(&items[i], flags);
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        Item *it = &items[i];
        PyObject *r;
        if (it->err == 0) {
            if (_PyBytes_Resize(&it->data, it->got) < 0) { /* (frees it and sets it NULL) */
                Py_CLEAR(out);
                goto done;
            }
            r = it->data;
            it->data = NULL;
        } else if (it->err == -1) {
            r = Py_NewRef(Py_None);
        } else if (it->err == -2) {
            r = Py_NewRef(Py_False);
        } else if ((r = PyLong_FromLong(it->err)) == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, r);
    }
done:
    for (Py_ssize_t i = 0; i < parsed; i++) {
        Py_XDECREF(items[i].target);
        Py_XDECREF(items[i].data);
    }
    PyMem_Free(items);
    return out;
}

PyDoc_STRVAR(lstat_names_doc,
"lstat_names(dir_fd, names) -> list: fstatat(dir_fd, name, AT_SYMLINK_NOFOLLOW) of each name,\n"
"the GIL released once: (st_mode, st_size, st_mtime_ns, st_ino, st_ctime_ns, st_dev) as os.stat\n"
"gives them, an errno, or None (a time out of the nanosecond range: ask os.stat).");

#define NS_LIMIT 9000000000LL /* seconds: sec * 1e9 + nsec fits in 63 bits (year 2255) */

static PyObject *lstat_names(PyObject *self, PyObject *args) {
    int dir_fd;
    PyObject *names;
    if (!PyArg_ParseTuple(args, "iO!", &dir_fd, &PyList_Type, &names))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(names);
    PyObject **raw = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    struct stat *sts = PyMem_Calloc(n ? n : 1, sizeof(struct stat));
    int *errs = PyMem_Calloc(n ? n : 1, sizeof(int));
    PyObject *out = NULL;
    Py_ssize_t i, parsed = 0;
    if (raw == NULL || sts == NULL || errs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; parsed < n; parsed++)
        if (!PyUnicode_FSConverter(PyList_GET_ITEM(names, parsed), &raw[parsed]))
            goto done;
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++)
        errs[i] = fstatat(dir_fd, PyBytes_AS_STRING(raw[i]), &sts[i], AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    if (out == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        struct stat *st = &sts[i];
        PyObject *r;
        if (errs[i])
            r = PyLong_FromLong(errs[i]);
        else if (st->st_mtim.tv_sec > NS_LIMIT || st->st_mtim.tv_sec < -NS_LIMIT
                 || st->st_ctim.tv_sec > NS_LIMIT || st->st_ctim.tv_sec < -NS_LIMIT)
            r = Py_NewRef(Py_None);
        else
            r = Py_BuildValue("(kLLKLK)", (unsigned long)st->st_mode, (long long)st->st_size,
                              (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec,
                              (unsigned long long)st->st_ino,
                              (long long)st->st_ctim.tv_sec * 1000000000LL + st->st_ctim.tv_nsec,
                              (unsigned long long)st->st_dev);
        if (r == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, r);
    }
done:
    if (raw != NULL)
        for (i = 0; i < parsed; i++)
            Py_XDECREF(raw[i]);
    PyMem_Free(raw);
    PyMem_Free(sts);
    PyMem_Free(errs);
    return out;
}

static PyMethodDef methods[] = {
    {"read_files", read_files, METH_VARARGS, read_files_doc},
    {"lstat_names", lstat_names, METH_VARARGS, lstat_names_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "commitfs.ops._fastscan",
    "Compiled hot paths of a commit's scan and reads of small files (see snapshot._scan_fd, prepare_batch).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastscan(void) {
    return PyModule_Create(&module);
}
