/* The varints of docs/FORMAT.md, as the compiled modules read and write them
   (commitfs.model._fastdecode, commitfs.repo._fastread); Python's reader is
   _get_uvarint in commitfs/model/objects.py, its writer _put_uvarint. */
#ifndef COMMITFS_VARINT_H
#define COMMITFS_VARINT_H

#include <Python.h>
#include <stdint.h>

/* A minimal unsigned LEB128 varint of at most 9 bytes (63 bits) at *pos; 0 if
   malformed, not minimal or longer (the caller then leaves the case to Python). */
static int get_varint(const unsigned char *p, Py_ssize_t end, Py_ssize_t *pos, uint64_t *value) {
    uint64_t v = 0;
    for (int shift = 0; shift <= 56 && *pos < end; shift += 7) {
        unsigned char c = p[(*pos)++];
        v |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) {
            if (c == 0 && shift)
                return 0; /* not minimal */
            *value = v;
            return 1;
        }
    }
    return 0;
}

/* Writes the minimal varint of ``v`` at ``out`` and returns its length; with
   ``out`` NULL only the length (Tree.encode's compiled form sizes its output
   first: commitfs.model._fastdecode.tree_encode). */
static inline Py_ssize_t put_varint(unsigned char *out, uint64_t v) {
    Py_ssize_t n = 0;
    do {
        unsigned char c = v & 0x7F;
        v >>= 7;
        if (v)
            c |= 0x80;
        if (out)
            out[n] = c;
        n++;
    } while (v);
    return n;
}

#endif
