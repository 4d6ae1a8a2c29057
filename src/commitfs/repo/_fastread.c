/* The hot path of a mount's first read of a small file, compiled: the read
   engine's file_from_memory (repo/engine.py), which does, per file: an index lookup of the file's manifest,
   a ranged read, a hash check and a decode of the manifest, an index lookup per
   chunk, one ranged read of the chunks and a hash check per chunk.  In Python
   that is some 25 calls and 100-200 us a file, most of it the interpreter's;
   this module does the same steps in one call, with the storage read and the
   hash still done by Python objects passed in (the engine's read of cached
   pack pages, repo/resident.py, which fills a bytes object made here, and
   BLAKE3).

   It handles only the case that matters and is always safe: a manifest found in
   a segment held in memory, its chunks stored uncompressed one after another in
   one pack (a file written by one commit).  The bytes it returns are those whose
   manifest hashes to the file id and whose every chunk hashes to its id in that
   manifest.  Anything else (a blob not in a loaded segment, a compressed chunk,
   a hash that does not match, a malformed record) returns None, and the caller
   takes the general path, which reports errors.  The formats read here are in
   docs/FORMAT.md (index segments, packs, file manifests). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_varint.h"

#define ID_SIZE 32
#define ENTRY_SIZE 52 /* <32sIIIIBB2x: id, pack number, offset, stored, raw, kind, compression */
#define KIND_CHUNK 0
#define KIND_MANIFEST 1
#define COMPRESSION_NONE 0
#define MAX_CHUNKS 256
static const char MANIFEST_MAGIC[] = "CFFILE1\n";
#define MANIFEST_MAGIC_SIZE 8

static PyObject *str_digest;

typedef struct {
    PyObject *pack; /* borrowed from the segment's pack list */
    uint32_t offset, stored, raw;
    uint8_t kind, compression;
} Location;

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Find oid in one loaded segment, a tuple (data, packs, fan-out offset, entries
   offset, bits) as Segment.loaded holds it.  1 found, 0 not found or malformed,
   -1 a Python error. */
static int segment_lookup(PyObject *seg, const unsigned char *oid, Location *out) {
    if (!PyTuple_Check(seg) || PyTuple_GET_SIZE(seg) != 5)
        return 0;
    PyObject *data_o = PyTuple_GET_ITEM(seg, 0), *packs = PyTuple_GET_ITEM(seg, 1);
    if (!PyBytes_Check(data_o) || !PyList_Check(packs))
        return 0;
    Py_ssize_t fan = PyLong_AsSsize_t(PyTuple_GET_ITEM(seg, 2));
    Py_ssize_t base = PyLong_AsSsize_t(PyTuple_GET_ITEM(seg, 3));
    long bits = PyLong_AsLong(PyTuple_GET_ITEM(seg, 4));
    if (PyErr_Occurred())
        return -1;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(data_o);
    Py_ssize_t size = PyBytes_GET_SIZE(data_o);
    if (bits < 0 || bits > 32 || fan < 0 || base < fan)
        return 0;
    uint32_t lo, hi, b = 0;
    if (bits)
        b = ((uint32_t)oid[0] << 24 | (uint32_t)oid[1] << 16 | (uint32_t)oid[2] << 8 | oid[3]) >> (32 - bits);
    if (b) {
        if (fan + (Py_ssize_t)b * 4 + 4 > size)
            return 0;
        lo = le32(data + fan + (b - 1) * 4);
        hi = le32(data + fan + b * 4);
    } else {
        if (fan + 4 > size)
            return 0;
        lo = 0;
        hi = le32(data + fan);
    }
    if (lo > hi || base + (Py_ssize_t)hi * ENTRY_SIZE > size)
        return 0;
    for (const unsigned char *rec = data + base + (Py_ssize_t)lo * ENTRY_SIZE,
                               *end = data + base + (Py_ssize_t)hi * ENTRY_SIZE;
         rec < end; rec += ENTRY_SIZE) {
        if (memcmp(rec, oid, ID_SIZE) != 0)
            continue;
        uint32_t packno = le32(rec + 32);
        if (packno >= (uint64_t)PyList_GET_SIZE(packs))
            return 0;
        out->pack = PyList_GET_ITEM(packs, packno);
        out->offset = le32(rec + 36);
        out->stored = le32(rec + 40);
        out->raw = le32(rec + 44);
        out->kind = rec[48];
        out->compression = rec[49];
        return 1;
    }
    return 0;
}

static int lookup(PyObject *segments, const unsigned char *oid, Location *out) {
    Py_ssize_t n = PyTuple_GET_SIZE(segments);
    for (Py_ssize_t i = 0; i < n; i++) {
        int r = segment_lookup(PyTuple_GET_ITEM(segments, i), oid, out);
        if (r)
            return r;
    }
    return 0;
}

/* 1 if hasher(data[0:len]).digest() == id, 0 if not, -1 on a Python error. */
static int hash_matches(PyObject *hasher, const char *data, Py_ssize_t len, const unsigned char *id) {
    PyObject *view = PyMemoryView_FromMemory((char *)data, len, PyBUF_READ);
    if (view == NULL)
        return -1;
    PyObject *h = PyObject_CallOneArg(hasher, view);
    Py_DECREF(view);
    if (h == NULL)
        return -1;
    PyObject *digest = PyObject_CallMethodNoArgs(h, str_digest);
    Py_DECREF(h);
    if (digest == NULL)
        return -1;
    int ok = PyBytes_Check(digest) && PyBytes_GET_SIZE(digest) == ID_SIZE &&
             memcmp(PyBytes_AS_STRING(digest), id, ID_SIZE) == 0;
    Py_DECREF(digest);
    return ok;
}

static PyObject *str_release;

/* A new bytes object of `length` bytes at `offset` in pack `pack`, filled by
   read_into(pack, offset, writable view) (made here: no zeroed buffer to fill);
   NULL with the callable's exception. */
static PyObject *read_range(PyObject *read_into, PyObject *pack, uint32_t offset, uint32_t length) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL)
        return NULL;
    PyObject *view = PyMemoryView_FromMemory(PyBytes_AS_STRING(out), length, PyBUF_WRITE);
    if (view == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *r = PyObject_CallFunction(read_into, "OIO", pack, (unsigned int)offset, view);
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (r == NULL)
        PyErr_Fetch(&type, &value, &tb); /* kept across the release below */
    /* The bytes object is immutable from here on: nothing may keep writing into it. */
    PyObject *released = PyObject_CallMethodNoArgs(view, str_release);
    Py_DECREF(view);
    if (r == NULL) {
        if (released == NULL)
            PyErr_Clear();
        Py_XDECREF(released);
        PyErr_Restore(type, value, tb);
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(r);
    if (released == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(released);
    return out;
}

PyDoc_STRVAR(load_file_doc,
"load_file(fid, segments, read_into, hasher) -> bytes | None\n\n"
"A whole small file's verified bytes, or None where the general path must\n"
"decide.  segments: a tuple of Segment.loaded tuples; read_into(pack_id,\n"
"offset, buf): fill the writable buffer buf from the pack (raising what the\n"
"store raises); hasher(data): an object whose digest() is the id of data.");

static PyObject *load_file(PyObject *self, PyObject *args) {
    Py_buffer fid;
    PyObject *segments, *read_into, *hasher;
    if (!PyArg_ParseTuple(args, "y*O!OO", &fid, &PyTuple_Type, &segments, &read_into, &hasher))
        return NULL;
    PyObject *result = NULL, *mgot = NULL, *dgot = NULL;
    if (fid.len != ID_SIZE)
        goto none;

    Location mloc;
    int r = lookup(segments, fid.buf, &mloc);
    if (r < 0)
        goto done;
    if (!r || mloc.kind != KIND_MANIFEST || mloc.compression != COMPRESSION_NONE || mloc.stored != mloc.raw)
        goto none;
    mgot = read_range(read_into, mloc.pack, mloc.offset, mloc.stored);
    if (mgot == NULL)
        goto done;
    const unsigned char *m = (const unsigned char *)PyBytes_AS_STRING(mgot);
    Py_ssize_t mlen = PyBytes_GET_SIZE(mgot), pos = MANIFEST_MAGIC_SIZE;
    r = hash_matches(hasher, (const char *)m, mlen, fid.buf);
    if (r <= 0)
        goto done_or_none;

    /* The manifest: "CFFILE1\n" | varint n | n x (id: 32 | varint size > 0). */
    uint64_t n;
    if (mlen < MANIFEST_MAGIC_SIZE || memcmp(m, MANIFEST_MAGIC, MANIFEST_MAGIC_SIZE) != 0 ||
        !get_varint(m, mlen, &pos, &n) || n == 0 || n > MAX_CHUNKS)
        goto none;
    const unsigned char *ids[MAX_CHUNKS];
    uint32_t sizes[MAX_CHUNKS];
    PyObject *pack = NULL;
    uint32_t start = 0;
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t size;
        if (pos + ID_SIZE > mlen)
            goto none;
        ids[i] = m + pos;
        pos += ID_SIZE;
        if (!get_varint(m, mlen, &pos, &size) || size == 0 || size > UINT32_MAX)
            goto none;
        sizes[i] = (uint32_t)size;
        Location c;
        r = lookup(segments, ids[i], &c);
        if (r < 0)
            goto done;
        if (!r || c.kind != KIND_CHUNK || c.compression != COMPRESSION_NONE || c.stored != size || c.raw != size)
            goto none;
        if (i == 0) {
            pack = c.pack;
            start = c.offset;
        } else if (PyObject_RichCompareBool(c.pack, pack, Py_EQ) != 1 || c.offset != start + total) {
            if (PyErr_Occurred())
                goto done;
            goto none;
        }
        total += size;
        if (start + total > UINT32_MAX)
            goto none;
    }
    if (pos != mlen)
        goto none;

    dgot = read_range(read_into, pack, start, (uint32_t)total);
    if (dgot == NULL)
        goto done;
    const char *d = PyBytes_AS_STRING(dgot);
    for (uint64_t i = 0, at = 0; i < n; at += sizes[i], i++) {
        r = hash_matches(hasher, d + at, sizes[i], ids[i]);
        if (r <= 0)
            goto done_or_none;
    }
    result = dgot;
    Py_INCREF(result);
    goto done;

done_or_none:
    if (PyErr_Occurred())
        goto done;
none:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(dgot);
    Py_XDECREF(mgot);
    PyBuffer_Release(&fid);
    return result;
}

static PyMethodDef methods[] = {
    {"load_file", load_file, METH_VARARGS, load_file_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "commitfs.repo._fastread",
    "A compiled hot path for a mount's first read of a small file (see ReadEngine.file_from_memory).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastread(void) {
    str_digest = PyUnicode_InternFromString("digest");
    str_release = PyUnicode_InternFromString("release");
    if (str_digest == NULL || str_release == NULL)
        return NULL;
    return PyModule_Create(&module);
}
