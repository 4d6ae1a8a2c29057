/* Tree.decode's and Tree.encode's hot loops, compiled.

   A mount decodes a directory's tree on the first lookup in it: in Python that
   is about 2 us an entry (2 ms for a class directory of 850 images, met once
   per directory by a training job's first random reads).  This makes the same
   TreeEntry tuples in about a tenth of that.

   It accepts exactly the canonical encoding of docs/FORMAT.md ("Tree") and
   returns None for anything else (an unknown kind, a non-minimal varint,
   unsorted or invalid names, trailing bytes, ...): Tree.decode then runs its
   Python decoder, which names the fault.  So this module decides nothing on
   its own; it only makes the valid case fast.

   tree_encode is Tree.encode's loop: a commit encodes every directory on the
   paths to its changes whole (100 changed files spread over 100 directories of
   1,000 entries encode 100,000 entries), about 1.3 us an entry in Python.  It
   makes the same bytes, and returns None for anything but plain entries, so
   the Python encoder meets the odd case and raises what it raises. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_varint.h"

#define ID_SIZE 32
static const char TREE_MAGIC[] = "CFTREE1\n";
#define TREE_MAGIC_SIZE 8

PyDoc_STRVAR(tree_entries_doc,
"tree_entries(data, entry_type, kinds, symlink) -> tuple | None\n\n"
"The entries of a canonical tree encoding, each entry_type(name, kind, size,\n"
"id, target) made as a plain tuple of that type; None if data is not\n"
"canonical.  kinds: a dict from a kind byte (an int) to its Kind; symlink:\n"
"the Kind whose entries carry a target.");

static PyObject *tree_entries(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyTypeObject *entry_type;
    PyObject *kinds, *symlink;
    if (!PyArg_ParseTuple(args, "y*O!O!O", &buf, &PyType_Type, &entry_type, &PyDict_Type, &kinds, &symlink))
        return NULL;
    if (!PyType_IsSubtype(entry_type, &PyTuple_Type)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_TypeError, "entry_type must be a tuple type");
        return NULL;
    }
    const unsigned char *p = buf.buf;
    Py_ssize_t end = buf.len, pos = TREE_MAGIC_SIZE;
    PyObject *out = NULL, *empty = NULL;
    uint64_t n;
    if (end < TREE_MAGIC_SIZE || memcmp(p, TREE_MAGIC, TREE_MAGIC_SIZE) != 0 || !get_varint(p, end, &pos, &n) ||
        n > (uint64_t)end)
        goto none;
    out = PyTuple_New((Py_ssize_t)n);
    empty = PyBytes_FromStringAndSize(NULL, 0);
    if (out == NULL || empty == NULL)
        goto error;
    const unsigned char *prev = NULL;
    Py_ssize_t prev_len = 0;
    for (Py_ssize_t i = 0; i < (Py_ssize_t)n; i++) {
        uint64_t nlen, size, tlen = 0;
        if (pos >= end)
            goto none;
        PyObject *byte = PyLong_FromLong(p[pos]);
        if (byte == NULL)
            goto error;
        PyObject *kind = PyDict_GetItemWithError(kinds, byte); /* borrowed: the dict holds it */
        Py_DECREF(byte);
        if (kind == NULL) {
            if (PyErr_Occurred())
                goto error;
            goto none;
        }
        pos++;
        if (!get_varint(p, end, &pos, &nlen) || nlen == 0 || nlen > (uint64_t)(end - pos))
            goto none;
        const unsigned char *name = p + pos;
        pos += (Py_ssize_t)nlen;
        /* Names: sorted by bytes and unique; never "." or ".."; no '/' or NUL. */
        if (prev != NULL) {
            Py_ssize_t common = prev_len < (Py_ssize_t)nlen ? prev_len : (Py_ssize_t)nlen;
            int c = memcmp(prev, name, common);
            if (c > 0 || (c == 0 && prev_len >= (Py_ssize_t)nlen))
                goto none;
        }
        prev = name;
        prev_len = (Py_ssize_t)nlen;
        if ((nlen == 1 && name[0] == '.') || (nlen == 2 && name[0] == '.' && name[1] == '.') ||
            memchr(name, '/', nlen) || memchr(name, 0, nlen))
            goto none;
        if (!get_varint(p, end, &pos, &size) || end - pos < ID_SIZE)
            goto none;
        const unsigned char *oid = p + pos;
        pos += ID_SIZE;
        const unsigned char *target = NULL;
        if (kind == symlink) {
            if (!get_varint(p, end, &pos, &tlen) || tlen > (uint64_t)(end - pos))
                goto none;
            /* A target is what symlink(2) takes: not empty, no NUL; the size is its length. */
            if (tlen == 0 || size != tlen || memchr(p + pos, 0, (size_t)tlen))
                goto none;
            target = p + pos;
            pos += (Py_ssize_t)tlen;
        }
        PyObject *name_o = PyUnicode_DecodeUTF8((const char *)name, (Py_ssize_t)nlen, "strict");
        if (name_o == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                goto error;
            PyErr_Clear();
            goto none;
        }
        PyObject *entry = entry_type->tp_alloc(entry_type, 5);
        if (entry == NULL) {
            Py_DECREF(name_o);
            goto error;
        }
        PyTuple_SET_ITEM(out, i, entry); /* owns it from here, even half made */
        PyTuple_SET_ITEM(entry, 0, name_o);
        Py_INCREF(kind);
        PyTuple_SET_ITEM(entry, 1, kind);
        PyObject *size_o = PyLong_FromUnsignedLongLong(size);
        PyObject *oid_o = PyBytes_FromStringAndSize((const char *)oid, ID_SIZE);
        PyObject *target_o = target ? PyBytes_FromStringAndSize((const char *)target, (Py_ssize_t)tlen) : empty;
        if (target_o == empty)
            Py_INCREF(empty);
        PyTuple_SET_ITEM(entry, 2, size_o);
        PyTuple_SET_ITEM(entry, 3, oid_o);
        PyTuple_SET_ITEM(entry, 4, target_o);
        if (size_o == NULL || oid_o == NULL || target_o == NULL)
            goto error;
    }
    if (pos != end)
        goto none;
    Py_DECREF(empty);
    PyBuffer_Release(&buf);
    return out;

none:
    Py_XDECREF(out);
    Py_XDECREF(empty);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
error:
    Py_XDECREF(out);
    Py_XDECREF(empty);
    PyBuffer_Release(&buf);
    return NULL;
}

/* The index in kind_obj of ``kind`` (matched by identity), or n if it is none of them. */
static Py_ssize_t kind_index(PyObject *const *kind_obj, Py_ssize_t n, PyObject *kind) {
    Py_ssize_t k = 0;
    while (k < n && kind_obj[k] != kind)
        k++;
    return k;
}

PyDoc_STRVAR(tree_encode_doc,
"tree_encode(entries, kinds, symlink) -> bytes | None\n\n"
"Tree.encode of a tuple of TreeEntry tuples (name, kind, size, id, target), the\n"
"same bytes; None for anything but the plain case (a name that is not a str, a\n"
"negative or huge size, an id or target that is not bytes, an unknown kind), so\n"
"the Python encoder meets it and raises what it raises.  kinds: a tuple of\n"
"(Kind, bytes of length 1) pairs, matched by identity; symlink: the Kind whose\n"
"entries carry a target.");

static PyObject *tree_encode(PyObject *self, PyObject *args) {
    PyObject *entries, *kinds, *symlink;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyTuple_Type, &entries, &PyTuple_Type, &kinds, &symlink))
        return NULL;
    enum { MAX_KINDS = 8 };
    PyObject *kind_obj[MAX_KINDS];
    unsigned char kind_byte[MAX_KINDS];
    Py_ssize_t nkinds = PyTuple_GET_SIZE(kinds);
    if (nkinds > MAX_KINDS)
        Py_RETURN_NONE;
    for (Py_ssize_t k = 0; k < nkinds; k++) {
        PyObject *pair = PyTuple_GET_ITEM(kinds, k);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1)) ||
            PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) != 1)
            Py_RETURN_NONE;
        kind_obj[k] = PyTuple_GET_ITEM(pair, 0);
        kind_byte[k] = (unsigned char)PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 1))[0];
    }
    Py_ssize_t n = PyTuple_GET_SIZE(entries);
    /* First pass: check every entry and add up the length. */
    Py_ssize_t total = TREE_MAGIC_SIZE + put_varint(NULL, (uint64_t)n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyTuple_GET_ITEM(entries, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 5)
            Py_RETURN_NONE;
        PyObject *name = PyTuple_GET_ITEM(e, 0), *kind = PyTuple_GET_ITEM(e, 1), *size = PyTuple_GET_ITEM(e, 2);
        PyObject *oid = PyTuple_GET_ITEM(e, 3), *target = PyTuple_GET_ITEM(e, 4);
        if (!PyUnicode_CheckExact(name) || !PyLong_CheckExact(size) || !PyBytes_CheckExact(oid))
            Py_RETURN_NONE;
        if (kind_index(kind_obj, nkinds, kind) == nkinds)
            Py_RETURN_NONE;
        Py_ssize_t nlen;
        if (PyUnicode_AsUTF8AndSize(name, &nlen) == NULL) {
            PyErr_Clear(); /* a lone surrogate: name.encode() raises it */
            Py_RETURN_NONE;
        }
        int overflow = 0;
        long long sz = PyLong_AsLongLongAndOverflow(size, &overflow);
        if (overflow || sz < 0)
            Py_RETURN_NONE;
        total += 1 + put_varint(NULL, (uint64_t)nlen) + nlen + put_varint(NULL, (uint64_t)sz) + PyBytes_GET_SIZE(oid);
        if (kind == symlink) {
            if (!PyBytes_CheckExact(target))
                Py_RETURN_NONE;
            total += put_varint(NULL, (uint64_t)PyBytes_GET_SIZE(target)) + PyBytes_GET_SIZE(target);
        }
    }
    /* Second pass: write (nothing can fail now). */
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    memcpy(p, TREE_MAGIC, TREE_MAGIC_SIZE);
    p += TREE_MAGIC_SIZE;
    p += put_varint(p, (uint64_t)n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyTuple_GET_ITEM(entries, i);
        PyObject *kind = PyTuple_GET_ITEM(e, 1), *oid = PyTuple_GET_ITEM(e, 3), *target = PyTuple_GET_ITEM(e, 4);
        *p++ = kind_byte[kind_index(kind_obj, nkinds, kind)];  /* found in the first pass */
        Py_ssize_t nlen;
        const char *raw = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(e, 0), &nlen);
        p += put_varint(p, (uint64_t)nlen);
        memcpy(p, raw, (size_t)nlen);
        p += nlen;
        p += put_varint(p, (uint64_t)PyLong_AsLongLong(PyTuple_GET_ITEM(e, 2)));
        memcpy(p, PyBytes_AS_STRING(oid), (size_t)PyBytes_GET_SIZE(oid));
        p += PyBytes_GET_SIZE(oid);
        if (kind == symlink) {
            p += put_varint(p, (uint64_t)PyBytes_GET_SIZE(target));
            memcpy(p, PyBytes_AS_STRING(target), (size_t)PyBytes_GET_SIZE(target));
            p += PyBytes_GET_SIZE(target);
        }
    }
    return out;
}

static PyMethodDef methods[] = {
    {"tree_entries", tree_entries, METH_VARARGS, tree_entries_doc},
    {"tree_encode", tree_encode, METH_VARARGS, tree_encode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "commitfs.model._fastdecode",
    "Tree.decode's hot loop, compiled (see commitfs.model.objects).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastdecode(void) {
    return PyModule_Create(&module);
}
