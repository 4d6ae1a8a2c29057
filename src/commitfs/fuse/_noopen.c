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
 * at the end).  pyfuse3 runs its requests on one thread (trio), so the flags
 * below need no lock.
 *
 * Directory listings (fastpath.engage_listings, the daemon of a read-only
 * mount).  pyfuse3 turns the kernel's adaptive readdirplus off (its init
 * clears FUSE_CAP_READDIRPLUS_AUTO: every listing is READDIRPLUS, each entry
 * a dentry and inode the kernel makes) and cannot mark a listing cacheable.
 * The same wrapper also puts
 *   - init_shim in the INIT slot: after pyfuse3's init, it asks for
 *     READDIRPLUS | READDIRPLUS_AUTO (once listings(True) was called) and for
 *     whatever request_capabilities(mask) asked, each only if the kernel has it;
 *   - readdir_shim in the plain READDIR slot, which pyfuse3 leaves empty (with
 *     AUTO the kernel sends plain READDIR once a listing is past its first
 *     request and nobody looks its entries up, as find(1) does): it calls
 *     pyfuse3's readdirplus callback with PLAIN_FH set in the handle, so the
 *     Python readdir knows that the kernel takes no reference to the entries
 *     (it counts none), and remembers the request: this module's
 *     fuse_add_direntry_plus (the function pyfuse3's readdir_reply calls)
 *     writes a plain entry for it, until its fuse_reply_buf/fuse_reply_err;
 *   - in fuse_reply_open (pyfuse3's OPENDIR reply): a handle with CACHE_FH set
 *     (the Python opendir of a commit directory, whose entries never change)
 *     loses that bit and gets cache_readdir and keep_cache: the kernel keeps
 *     the listing in its page cache and serves later listings from it.
 * Those three libfuse functions are wrapped like fuse_session_new (this
 * module's definitions, global, call libfuse's own, found by bind()); they
 * pass everything else through untouched.
 *
 * GETXATTR (fastpath.engage_xattrs, the daemon of a read-only mount; until
 * xattrs() is called every request passes straight to pyfuse3's callback):
 * getxattr_shim in the GETXATTR slot answers ENODATA for a name outside the
 * one prefix a read-only mount has attributes under ("user.commitfs."), as the
 * Python getxattr would, without pyfuse3's coroutine and the file system's
 * exception: ls(1) asks for two such names of every file it lists, and the
 * kernel caches no answer.
 *
 * READ (fastpath.engage_reads, the daemon of a read-only mount in no-open mode; until
 * reads() is given a callable every READ passes to pyfuse3's callback): the same
 * fuse_session_receive_buf wrapper that answers LOOKUPs offers a READ with handle 0, as it
 * reads it, to read_now(inode, offset, size), a plain Python call (FileSystem.read_now:
 * verified bytes already in memory, or None).  With bytes, libfuse's own processing of
 * the request reaches read_shim, which replies with them (no pyfuse3 coroutine, no trio
 * task); None sends the READ on to pyfuse3 untouched.  read_now calls yield_loop() when
 * it started tasks (read-ahead): the wrapper then returns to pyfuse3's loop at once.
 * Before read_now, a small READ that does not continue its file's last READ is answered
 * from the file's chunk map if it has one (chunk_map(), published by the file system for
 * large files: see "Chunk maps" below), with no Python but BLAKE3.
 *
 * WRITE (fastpath.engage_writes, the daemon of a workspace mount; until writes()
 * is given two callables every request passes straight to pyfuse3's callback):
 * write_buf_shim in the WRITE_BUF slot (the one pyfuse3 fills) asks the Python
 * side, with a plain call, for the descriptor the write may go to right now
 * (WorkspaceFS.write_fd: -1 when the write must wait or cannot be done without
 * the event loop), pwrites libfuse's buffer straight into it (no bytes object,
 * no coroutine, no trio task switch), hands the written range to a second plain
 * call (WorkspaceFS.wrote: the size, times, copy-on-write ranges and dirty
 * marks, exactly as the Python write keeps them) and replies.  Anything else
 * (-1, an exception in the first call) goes to pyfuse3's write as before. */

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <sys/stat.h>
#include <stddef.h>
#include <stdio.h>
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
typedef void (*init_fn)(void *, struct fuse_conn_info *);
typedef struct fuse_session *(*new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
typedef size_t (*add_plus_fn)(fuse_req_t, char *, size_t, const char *, const struct fuse_entry_param *, off_t);
typedef size_t (*add_fn)(fuse_req_t, char *, size_t, const char *, const struct stat *, off_t);
typedef int (*reply_buf_fn)(fuse_req_t, const char *, size_t);
typedef int (*reply_err_fn)(fuse_req_t, int);
typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef void (*getxattr_fn)(fuse_req_t, fuse_ino_t, const char *, size_t);

/* Handle bits: PLAIN_FH set by readdir_shim for the Python readdir, CACHE_FH by the Python
   opendir for fuse_reply_open (cleared there: the kernel never sees it).  The Python side's
   handles are small counters (vfs/core.py), far below either bit. */
#define PLAIN_FH (1ULL << 63)
#define CACHE_FH (1ULL << 62)

static read_fn pyfuse3_read = NULL;  /* pyfuse3's own read callback */
static int wrapped = 0;              /* the last fuse_session_new went through the wrapper */
static int enabled = 0;              /* rewrite fh 0 to the inode (no-open mode is on) */
static unsigned long long rewritten = 0;  /* READs whose fh 0 became the inode */

static init_fn pyfuse3_init = NULL;          /* pyfuse3's own init callback */
static read_fn pyfuse3_readdirplus = NULL;   /* pyfuse3's own readdirplus callback */
static int listings = 0;                     /* init_shim asks for READDIRPLUS_AUTO */
static unsigned extra_caps = 0;              /* request_capabilities() */
static long long granted = -1;               /* conn->want after init_shim (-1: no INIT yet) */
static unsigned long long plain_readdirs = 0, cached_opendirs = 0;

/* GETXATTRs answered here (fastpath.engage_xattrs, read-only mounts). */
static getxattr_fn pyfuse3_getxattr = NULL;  /* pyfuse3's own getxattr callback */
static char *xattr_prefix = NULL;            /* xattrs(): names outside it are ENODATA here */
static size_t xattr_prefix_len = 0;
static unsigned long long xattrs_refused = 0;

/* WRITEs answered here (fastpath.engage_writes, workspace mounts). */
typedef void (*write_buf_fn)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t, struct fuse_file_info *);
static write_buf_fn pyfuse3_write_buf = NULL;  /* pyfuse3's own write_buf callback */
static PyObject *write_fd_cb = NULL;           /* writes(): fh -> descriptor, or -1 */
static PyObject *wrote_cb = NULL;              /* writes(): (fh, off, written) after the pwrite */
static unsigned long long writes_in_c = 0;

/* libfuse's own definitions of the functions this module wraps (bind()). */
static add_plus_fn real_add_plus = NULL;
static add_fn real_add = NULL;
static reply_buf_fn real_reply_buf = NULL;
static reply_err_fn real_reply_err = NULL;
static reply_open_fn real_reply_open = NULL;

/* The plain READDIR requests not replied to yet (a handful: one per request task). */
#define MAX_PLAIN 256
static fuse_req_t plain_reqs[MAX_PLAIN];
static int nplain = 0;

static int plain_index(fuse_req_t req) {
    for (int i = 0; i < nplain; i++)
        if (plain_reqs[i] == req)
            return i;
    return -1;
}

static void plain_done(fuse_req_t req) {
    int i = plain_index(req);
    if (i >= 0)
        plain_reqs[i] = plain_reqs[--nplain];
}

static void init_shim(void *userdata, struct fuse_conn_info *conn) {
    pyfuse3_init(userdata, conn);
    if (listings)
        conn->want |= conn->capable & (FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO);
    conn->want |= conn->capable & extra_caps;
    granted = conn->want;
}

static void readdir_shim(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    /* Only reached with READDIRPLUS_AUTO, which only init_shim asks for.  fi is libfuse's own,
       for this call only (do_readdir), as in read_shim. */
    if (nplain == MAX_PLAIN)  /* not reached: one is replied to before a task takes another */
        nplain--;
    plain_reqs[nplain++] = req;
    plain_readdirs++;
    if (fi != NULL)
        fi->fh |= PLAIN_FH;
    pyfuse3_readdirplus(req, ino, size, off, fi);
}

__attribute__((visibility("default")))
size_t fuse_add_direntry_plus(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                              const struct fuse_entry_param *e, off_t off) {
    if (nplain && plain_index(req) >= 0)
        return real_add(req, buf, bufsize, name, &e->attr, off);  /* st_ino, st_mode: a plain entry */
    return real_add_plus(req, buf, bufsize, name, e, off);
}

__attribute__((visibility("default")))
int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size) {
    if (nplain)
        plain_done(req);
    return real_reply_buf(req, buf, size);
}

__attribute__((visibility("default")))
int fuse_reply_err(fuse_req_t req, int err) {
    if (nplain)
        plain_done(req);
    return real_reply_err(req, err);
}

__attribute__((visibility("default")))
int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi) {
    if (fi != NULL && (fi->fh & CACHE_FH)) {
        struct fuse_file_info copy = *fi;
        copy.fh &= ~CACHE_FH;
        copy.cache_readdir = 1;
        copy.keep_cache = 1;
        cached_opendirs++;
        return real_reply_open(req, &copy);
    }
    return real_reply_open(req, fi);
}

/* GETXATTR: a name outside xattr_prefix (the only attributes a read-only mount has,
   "user.commitfs.") is ENODATA here, as the Python getxattr would answer: ls(1) asks for
   security.selinux and system.posix_acl_access of every file it lists. */
static void getxattr_shim(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
    if (xattr_prefix != NULL && strncmp(name, xattr_prefix, xattr_prefix_len) != 0) {
        xattrs_refused++;
        real_reply_err(req, ENODATA);
        return;
    }
    pyfuse3_getxattr(req, ino, name, size);
}

/* WRITE: the first callable's descriptor (or pyfuse3's write for -1), the pwrite of libfuse's
   buffer, the second callable's bookkeeping, the reply.  Runs on pyfuse3's thread with the GIL
   (pyfuse3 processes requests holding it), between two steps of the event loop: nothing of the
   file system runs between the two calls but other threads, which may run during the pwrite
   (released there, as os.pwrite does). */
static void write_buf_shim(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi) {
    PyObject *fd_cb = write_fd_cb, *done_cb = wrote_cb;
    if (fd_cb == NULL || done_cb == NULL || fi == NULL) {
        pyfuse3_write_buf(req, ino, bufv, off, fi);
        return;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_INCREF(fd_cb);
    Py_INCREF(done_cb);
    long fd = -1;
    PyObject *got = PyObject_CallFunction(fd_cb, "K", (unsigned long long)fi->fh);
    if (got != NULL) {
        fd = PyLong_AsLong(got);
        Py_DECREF(got);
    }
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(fd_cb);
        fd = -1;
    }
    if (fd < 0 || fd > INT_MAX) {
        Py_DECREF(fd_cb);
        Py_DECREF(done_cb);
        PyGILState_Release(gil);
        pyfuse3_write_buf(req, ino, bufv, off, fi);
        return;
    }
    size_t size = fuse_buf_size(bufv);
    struct fuse_bufvec dst = FUSE_BUFVEC_INIT(size);
    dst.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    dst.buf[0].fd = (int)fd;
    dst.buf[0].pos = off;
    ssize_t res;
    Py_BEGIN_ALLOW_THREADS
    res = fuse_buf_copy(&dst, bufv, 0);  /* one pwrite, as os.pwrite (no FUSE_BUF_FD_RETRY) */
    Py_END_ALLOW_THREADS
    int err = 0;
    if (res < 0) {
        err = (int)-res;
    } else {
        PyObject *ok = PyObject_CallFunction(done_cb, "KLn", (unsigned long long)fi->fh, (long long)off,
                                             (Py_ssize_t)res);
        if (ok == NULL) {
            PyErr_WriteUnraisable(done_cb);
            err = EIO;
        } else {
            Py_DECREF(ok);
        }
        writes_in_c++;
    }
    Py_DECREF(fd_cb);
    Py_DECREF(done_cb);
    PyGILState_Release(gil);
    if (err)
        real_reply_err(req, err);
    else
        fuse_reply_write(req, (size_t)res);
}

/* LOOKUP in C (fastpath.engage_lookups, the daemon of a read-only mount; until lookups(True)
 * every LOOKUP passes straight to pyfuse3's callback).  When the Python readdir lists a commit
 * directory it publish()es the span's files and symlinks here: per directory inode, the base of
 * its block of inode numbers (vfs/inode.py) and per entry its name, position, kind code and
 * size; with the directory's mtime and timeout that is all a LOOKUP of such an entry answers
 * (its attributes are a function of them, as Attr of a block entry, vfs/inode.py).
 * lookup_shim in the LOOKUP slot answers a published name itself (fuse_reply_entry) and
 * records (directory, base, position, kind, size) in the pending list; everything else
 * (subdirectories, unpublished directories, names not there) goes to pyfuse3's callback.
 * The Python side takes the pending list (take_lookups()) and counts those references in
 * its inode table before anything there can forget, drop or resolve one of the numbers
 * (vfs/inode.py, TreeInodeTable's ``external``), so FORGET balances exactly; it drops a
 * directory's table (drop()) when its block leaves.  The wrapper of fuse_session_receive_buf
 * answers such LOOKUPs as it reads them, before pyfuse3's request loop sees them (its trio
 * wait, task and coroutine per request are most of a LOOKUP's cost), and reads on while the
 * device has more requests ready (poll, no wait); any other request is handed to pyfuse3 as
 * read.  Tables are dropped oldest first past a byte cap (lookups_cap()): a miss only costs a
 * LOOKUP through Python.  All of it runs on pyfuse3's one thread, with the GIL held (pyfuse3
 * calls fuse_session_receive_buf and fuse_session_process_buf holding it), and so do the
 * module's functions: no lock. */

typedef void (*lookup_fn)(fuse_req_t, fuse_ino_t, const char *);
typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);
typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

static lookup_fn pyfuse3_lookup = NULL;       /* pyfuse3's own lookup callback */
static receive_buf_fn real_receive_buf = NULL;
static process_buf_fn real_process_buf = NULL;
static int c_lookups = 0;                     /* lookups(True) */
static unsigned long long lookups_answered = 0, lookups_early = 0, lookups_waited = 0;

struct tab_entry {
    unsigned long long size;
    unsigned pos;
    unsigned name_off;
    unsigned short name_len;
    unsigned char code;  /* vfs/inode.py's kind codes: 1 file, 2 executable, 3 symlink */
};

struct dirtab {
    unsigned long long parent, base, mtime_ns;
    double timeout;
    struct tab_entry *entries;
    unsigned n, cap;
    char *names;
    size_t names_len, names_cap;
    unsigned *slots;  /* index + 1 into entries, 0 empty; nslots a power of two, >= 2 n */
    unsigned nslots;
    size_t bytes;
    struct dirtab *next_in_bucket, *older, *newer;
};

#define TAB_BUCKETS 4096
static struct dirtab *tab_buckets[TAB_BUCKETS];
static struct dirtab *tab_oldest = NULL, *tab_newest = NULL;
static size_t tab_bytes = 0, tab_cap = 32u << 20;
static unsigned ntabs = 0;

struct pending {
    unsigned long long parent, base, size;
    unsigned pos;
    unsigned char code;
};
#define MAX_PENDING (1u << 16)
static struct pending *pend = NULL;
static unsigned npend = 0;

static PyObject *kind_file = NULL, *kind_exec = NULL, *kind_symlink = NULL;  /* model.objects.Kind */
static unsigned tab_mode[4] = {0, S_IFREG | 0444, S_IFREG | 0555, S_IFLNK | 0777};
static unsigned tab_uid = 0, tab_gid = 0, tab_blksize = 128 * 1024;

static unsigned name_hash(const char *s, size_t n) {
    unsigned h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static struct dirtab *tab_find(unsigned long long parent) {
    for (struct dirtab *t = tab_buckets[parent % TAB_BUCKETS]; t != NULL; t = t->next_in_bucket)
        if (t->parent == parent)
            return t;
    return NULL;
}

static void tab_free(struct dirtab *t) {
    struct dirtab **p = &tab_buckets[t->parent % TAB_BUCKETS];
    while (*p != t)
        p = &(*p)->next_in_bucket;
    *p = t->next_in_bucket;
    if (t->older) t->older->newer = t->newer; else tab_oldest = t->newer;
    if (t->newer) t->newer->older = t->older; else tab_newest = t->older;
    tab_bytes -= t->bytes;
    ntabs--;
    free(t->entries);
    free(t->names);
    free(t->slots);
    free(t);
}

static void tab_account(struct dirtab *t) {
    size_t b = sizeof *t + (size_t)t->cap * sizeof(struct tab_entry) + t->names_cap + (size_t)t->nslots * sizeof(unsigned);
    tab_bytes = tab_bytes - t->bytes + b;
    t->bytes = b;
}

static long tab_index(const struct dirtab *t, const char *name, size_t len) {
    if (t->nslots == 0)
        return -1;
    unsigned mask = t->nslots - 1;
    for (unsigned i = name_hash(name, len) & mask;; i = (i + 1) & mask) {
        unsigned k = t->slots[i];
        if (k == 0)
            return -1;
        const struct tab_entry *e = &t->entries[k - 1];
        if (e->name_len == len && memcmp(t->names + e->name_off, name, len) == 0)
            return (long)(k - 1);
    }
}

static void tab_insert_slot(struct dirtab *t, unsigned k) {
    const struct tab_entry *e = &t->entries[k];
    unsigned mask = t->nslots - 1;
    unsigned i = name_hash(t->names + e->name_off, e->name_len) & mask;
    while (t->slots[i] != 0)
        i = (i + 1) & mask;
    t->slots[i] = k + 1;
}

/* Room for ``more`` entries of ``name_bytes`` more bytes; 0 if out of memory. */
static int tab_reserve(struct dirtab *t, unsigned more, size_t name_bytes) {
    if (t->n + more > t->cap) {
        unsigned cap = t->cap ? t->cap : 64;
        while (cap < t->n + more)
            cap *= 2;
        struct tab_entry *grown = realloc(t->entries, (size_t)cap * sizeof *grown);
        if (grown == NULL)
            return 0;
        t->entries = grown;
        t->cap = cap;
    }
    if (t->names_len + name_bytes > t->names_cap) {
        size_t cap = t->names_cap ? t->names_cap : 1024;
        while (cap < t->names_len + name_bytes)
            cap *= 2;
        char *grown = realloc(t->names, cap);
        if (grown == NULL)
            return 0;
        t->names = grown;
        t->names_cap = cap;
    }
    if (2 * (t->n + more) > t->nslots) {
        unsigned nslots = t->nslots ? t->nslots : 128;
        while (nslots < 2 * (t->n + more))
            nslots *= 2;
        unsigned *slots = calloc(nslots, sizeof *slots);
        if (slots == NULL)
            return 0;
        free(t->slots);
        t->slots = slots;
        t->nslots = nslots;
        for (unsigned k = 0; k < t->n; k++)
            tab_insert_slot(t, k);
    }
    return 1;
}

/* The entry of ``name`` in directory ``parent``'s table, or NULL (and its table in *tp). */
static const struct tab_entry *tab_lookup(unsigned long long parent, const char *name, struct dirtab **tp) {
    struct dirtab *t = tab_find(parent);
    if (t == NULL)
        return NULL;
    long k = tab_index(t, name, strlen(name));
    if (k < 0)
        return NULL;
    *tp = t;
    return &t->entries[k];
}

/* Answer a LOOKUP of a published entry: 1 if answered. */
static int lookup_answer(fuse_req_t req, fuse_ino_t parent, const char *name) {
    struct dirtab *t = NULL;
    const struct tab_entry *e;
    if (!c_lookups || npend == MAX_PENDING || (e = tab_lookup(parent, name, &t)) == NULL)
        return 0;
    struct fuse_entry_param p;
    memset(&p, 0, sizeof p);
    p.ino = t->base + e->pos;
    p.generation = 0;
    p.entry_timeout = p.attr_timeout = t->timeout;
    p.attr.st_ino = p.ino;
    p.attr.st_mode = tab_mode[e->code & 3];
    p.attr.st_nlink = 1;
    p.attr.st_uid = tab_uid;
    p.attr.st_gid = tab_gid;
    p.attr.st_size = (off_t)e->size;
    p.attr.st_blksize = tab_blksize;
    p.attr.st_blocks = (blkcnt_t)((e->size + 511) / 512);
    p.attr.st_atim.tv_sec = p.attr.st_mtim.tv_sec = p.attr.st_ctim.tv_sec = (time_t)(t->mtime_ns / 1000000000ULL);
    p.attr.st_atim.tv_nsec = p.attr.st_mtim.tv_nsec = p.attr.st_ctim.tv_nsec = (long)(t->mtime_ns % 1000000000ULL);
    struct pending *q = &pend[npend++];
    q->parent = parent;
    q->base = t->base;
    q->pos = e->pos;
    q->code = e->code;
    q->size = e->size;
    lookups_answered++;
    fuse_reply_entry(req, &p);  /* counted whatever the reply's fate, as pyfuse3's handler does */
    return 1;
}

static int in_early = 0;  /* inside fuse_session_receive_buf's own fuse_session_process_buf */
static unsigned long long early_misses = 0;

static void lookup_shim(fuse_req_t req, fuse_ino_t parent, const char *name) {
    if (lookup_answer(req, parent, name))
        return;
    if (in_early) {
        /* Not reached (answerable() saw a table hit, and nothing ran since): pyfuse3's
           coroutine would never be awaited from here, so the request is failed instead. */
        early_misses++;
        real_reply_err(req, EIO);
        return;
    }
    pyfuse3_lookup(req, parent, name);
}

/* The fixed header of every request (the kernel's ABI, linux/fuse.h: struct fuse_in_header). */
struct commitfs_in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
#define COMMITFS_FUSE_LOOKUP 1

/* READs (reads(read_now)): a READ with file handle 0 (no-open mode) is offered, as it is read,
   to read_now(inode, offset, size), a plain Python call; bytes it returns (verified, from
   memory: vfs/core.py, FileSystem.read_now) are the reply, given by read_shim in
   libfuse's own processing of the request; None sends the READ to pyfuse3's loop. */
#define COMMITFS_FUSE_READ 15
struct commitfs_read_in {  /* linux/fuse.h: struct fuse_read_in */
    uint64_t fh, offset;
    uint32_t size, read_flags;
    uint64_t lock_owner;
    uint32_t flags, padding;
};
static PyObject *read_now_cb = NULL;
static Py_buffer early_read;        /* the answer read_shim gives while in_early_read */
static int in_early_read = 0;
static int loop_wanted = 0;         /* yield_loop(): back to pyfuse3's loop after this answer */
static unsigned long long reads_in_c = 0, reads_offered = 0, read_errors = 0;

/* Chunk maps (chunk_maps(hasher), chunk_map(inode, size, paths, ends, ids, fd_index,
   offsets)): where each
   chunk of a large commit file lies as plain bytes in a local pack file.  A small READ
   that does not continue the last one of its file (a random reader's) is answered from
   them here, with no Python but the hash: each chunk it overlaps is read whole
   (preadv2 RWF_NOWAIT: only what the page cache holds), hashed with ``hasher`` and
   compared with its id; anything short, uncached or different goes to read_now, and so
   to the file system's own read, which reports damage (EIO, never wrong bytes).  Commit
   files never change and inode numbers are never reused (vfs/inode.py), so a map stays
   right as long as it is kept: maps go oldest first past their byte cap or their cap of
   open pack files. */
struct cmap {
    unsigned long long ino, last_end, size;
    uint32_t n, nfds;
    uint64_t *ends;          /* file offset where chunk i ends */
    unsigned char *ids;      /* 32 bytes a chunk */
    uint32_t *fd_index;      /* into fds */
    uint64_t *offsets;       /* in its pack file */
    int *fds;
    size_t bytes;
    struct cmap *next_in_bucket, *older, *newer;
};
#define CMAP_BUCKETS 1024
#define CMAP_READ_MAX (64u << 10)     /* READs up to this size are answered from a map */
#define CMAP_SPAN_MAX (8u << 20)      /* bytes of chunks read for one READ at most */
static struct cmap *cmap_buckets[CMAP_BUCKETS];
static struct cmap *cmap_oldest = NULL, *cmap_newest = NULL;
static size_t cmap_bytes = 0;
#define CMAP_CAP (32u << 20)          /* bytes of maps kept at most */
#define CMAP_MAX_FDS 256              /* pack files the maps hold open at most, all maps together */
static unsigned cmap_fds = 0;
static PyObject *cmap_hasher = NULL, *cmap_digest = NULL;  /* chunk_maps(): BLAKE3, "digest" */
static unsigned long long reads_from_maps = 0, map_misses = 0;
static char *cmap_reply = NULL;  /* a map's answer, replied from by read_shim (else early_read) */
static size_t cmap_reply_len = 0;
static const char *cmap_reply_at = NULL;

static struct cmap *cmap_find(unsigned long long ino) {
    for (struct cmap *m = cmap_buckets[ino % CMAP_BUCKETS]; m != NULL; m = m->next_in_bucket)
        if (m->ino == ino)
            return m;
    return NULL;
}

static void cmap_free(struct cmap *m) {
    struct cmap **p = &cmap_buckets[m->ino % CMAP_BUCKETS];
    while (*p != m)
        p = &(*p)->next_in_bucket;
    *p = m->next_in_bucket;
    if (m->older) m->older->newer = m->newer; else cmap_oldest = m->newer;
    if (m->newer) m->newer->older = m->older; else cmap_newest = m->older;
    cmap_bytes -= m->bytes;
    cmap_fds -= m->nfds;
    for (uint32_t i = 0; i < m->nfds; i++)
        if (m->fds[i] >= 0)
            close(m->fds[i]);
    free(m->fds);
    free(m->ends);
    free(m->ids);
    free(m->fd_index);
    free(m->offsets);
    free(m);
}

static void cmaps_clear(void) {
    while (cmap_oldest != NULL)
        cmap_free(cmap_oldest);
}

/* 1 if hasher(data).digest() == id, 0 if not or on an error (cleared). */
static int cmap_hash_ok(const char *data, size_t len, const unsigned char *id) {
    PyObject *view = PyMemoryView_FromMemory((char *)data, (Py_ssize_t)len, PyBUF_READ);
    if (view == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *h = PyObject_CallOneArg(cmap_hasher, view);
    Py_DECREF(view);
    PyObject *digest = h == NULL ? NULL : PyObject_CallMethodNoArgs(h, cmap_digest);
    Py_XDECREF(h);
    if (digest == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = PyBytes_Check(digest) && PyBytes_GET_SIZE(digest) == 32 && memcmp(PyBytes_AS_STRING(digest), id, 32) == 0;
    Py_DECREF(digest);
    return ok;
}

/* Answer a READ of ``size`` at ``off`` of map m's file into cmap_reply: 1 if done. */
static int cmap_read(struct cmap *m, uint64_t off, uint32_t size) {
    if (off >= m->size || size == 0)
        return 0;
    uint64_t end = off + size < m->size ? off + size : m->size;
    uint32_t lo = 0, hi = m->n;  /* first chunk ending past off */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (m->ends[mid] <= off) lo = mid + 1; else hi = mid;
    }
    uint32_t first = lo, last = lo;
    while (last < m->n && (last == first || m->ends[last - 1] < end))
        last++;
    uint64_t start = first ? m->ends[first - 1] : 0;
    uint64_t span = m->ends[last - 1] - start;
    if (span > CMAP_SPAN_MAX)
        return 0;
    char *buf = malloc(span);
    if (buf == NULL)
        return 0;
    uint64_t at = 0;
    for (uint32_t i = first; i < last; i++) {
        uint64_t len = m->ends[i] - (i ? m->ends[i - 1] : 0);
        int fd = m->fds[m->fd_index[i]];
        struct iovec iov = {buf + at, len};
        ssize_t got = fd < 0 ? -1 : preadv2(fd, &iov, 1, (off_t)m->offsets[i], RWF_NOWAIT);
        if (got != (ssize_t)len || !cmap_hash_ok(buf + at, len, m->ids + 32 * (size_t)i)) {
            free(buf);
            return 0;
        }
        at += len;
    }
    cmap_reply = buf;
    cmap_reply_at = buf + (off - start);
    cmap_reply_len = (size_t)(end - off);
    return 1;
}

/* 1 if the READ in ``buf`` got an answer: from its file's chunk map (in cmap_reply), else
   from read_now (in early_read); 0 if it goes to pyfuse3. */
static int read_answer(const struct commitfs_in_header *in, int res) {
    if (read_now_cb == NULL || !enabled || (size_t)res < sizeof *in + sizeof(struct commitfs_read_in))
        return 0;
    const struct commitfs_read_in *arg = (const struct commitfs_read_in *)(in + 1);
    if (arg->fh != 0 || arg->offset > (uint64_t)LLONG_MAX)
        return 0;
    struct cmap *m = cmap_hasher == NULL ? NULL : cmap_find(in->nodeid);
    if (m != NULL) {
        int random_read = arg->offset != m->last_end && arg->size <= CMAP_READ_MAX;
        m->last_end = arg->offset + arg->size;
        if (random_read) {
            if (cmap_read(m, arg->offset, arg->size))
                return 1;  /* read_shim replies from cmap_reply */
            map_misses++;
        }
    }
    reads_offered++;
    PyObject *got = PyObject_CallFunction(read_now_cb, "KKI", (unsigned long long)in->nodeid,
                                          (unsigned long long)arg->offset, (unsigned)arg->size);
    if (got == NULL) {  /* not reached (read_now catches everything): pyfuse3's read decides */
        PyErr_Clear();
        read_errors++;
        return 0;
    }
    if (got == Py_None) {
        Py_DECREF(got);
        return 0;
    }
    int ok = PyObject_GetBuffer(got, &early_read, PyBUF_SIMPLE) == 0;
    Py_DECREF(got);  /* the buffer holds its own reference */
    if (!ok) {
        PyErr_Clear();
        read_errors++;
        return 0;
    }
    if ((size_t)early_read.len > arg->size) {  /* not reached: never more than was asked for */
        PyBuffer_Release(&early_read);
        read_errors++;
        return 0;
    }
    return 1;
}

/* What the wrapper answers itself, as read (the buffer, res bytes): 1 a LOOKUP lookup_shim
   answers from a table, 2 a READ read_now answered (early_read), 0 neither. */
static int answerable(const struct fuse_buf *buf, int res) {
    if ((buf->flags & FUSE_BUF_IS_FD) || buf->mem == NULL || (size_t)res <= sizeof(struct commitfs_in_header))
        return 0;
    const struct commitfs_in_header *in = buf->mem;
    if (in->len != (uint32_t)res)
        return 0;
    if (in->opcode == COMMITFS_FUSE_READ)
        return read_answer(in, res) ? 2 : 0;
    if (!c_lookups || pyfuse3_lookup == NULL || npend == MAX_PENDING || in->opcode != COMMITFS_FUSE_LOOKUP)
        return 0;
    const char *name = (const char *)(in + 1);
    size_t room = (size_t)res - sizeof *in;
    if (memchr(name, '\0', room) == NULL)
        return 0;
    struct dirtab *t;
    return tab_lookup(in->nodeid, name, &t) != NULL;
}

/* How long the wrapper waits for the next request after answering one (a stat walk's next
   LOOKUP comes within tens of microseconds), and how many it answers before pyfuse3's loop
   (and every other task of the daemon) gets its turn again. */
#define EARLY_WAIT_MS 1
#define EARLY_MAX 256

__attribute__((visibility("default")))
int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf) {
    for (int answered = 0;; answered++) {
        int res = real_receive_buf(se, buf);
        int what = res <= 0 ? 0 : answerable(buf, res);
        if (what == 0)
            return res;
        if (what == 2) {
            in_early_read = 1;
            real_process_buf(se, buf);  /* libfuse's do_read -> read_shim, which replies */
            if (in_early_read) {  /* not reached: read_shim took the answer */
                in_early_read = 0;
                if (cmap_reply != NULL) {
                    free(cmap_reply);
                    cmap_reply = NULL;
                } else {
                    PyBuffer_Release(&early_read);
                }
            }
        } else {
            in_early = 1;
            real_process_buf(se, buf);  /* libfuse's do_lookup -> lookup_shim, which answers it */
            in_early = 0;
            lookups_early++;
        }
        if (answered > 0 && what == 1)
            lookups_waited++;
        if (loop_wanted) {  /* read_now started work only pyfuse3's loop (trio) runs */
            loop_wanted = 0;
            return -EINTR;
        }
        if (answered + 1 >= EARLY_MAX)
            return -EINTR;  /* pyfuse3's loop waits for the device again */
        struct pollfd p = {fuse_session_fd(se), POLLIN, 0};
        int ready;
        Py_BEGIN_ALLOW_THREADS  /* the daemon's worker threads run meanwhile */
        ready = poll(&p, 1, EARLY_WAIT_MS);
        Py_END_ALLOW_THREADS
        if (ready != 1 || !(p.revents & POLLIN))
            return -EINTR;
    }
}

/* publish(parent, base, first, entries, mtime_ns, timeout): the files and symlinks of
   ``entries`` (TreeEntry tuples: name, kind, size, ...), the first at position ``first`` of
   directory inode ``parent``'s block starting at inode ``base``.  A span already published
   (its first entry there, at that position) costs one hash probe; a new base replaces the
   directory's table. */
/* A published entry's lookup code (1 file, 2 executable, 3 symlink; 0 a directory, a node
   of its own looked up by Python) and its name, or -1 with an exception set. */
static int entry_code(PyObject *e, const char **name, Py_ssize_t *len) {
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) < 3) {
        PyErr_SetString(PyExc_TypeError, "publish: entries must be TreeEntry tuples");
        return -1;
    }
    PyObject *kind = PyTuple_GET_ITEM(e, 1);
    int code = kind == kind_file ? 1 : kind == kind_exec ? 2 : kind == kind_symlink ? 3 : 0;
    if (code == 0)
        return 0;
    *name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(e, 0), len);
    return *name == NULL ? -1 : code;
}

static PyObject *py_publish(PyObject *self, PyObject *args) {
    unsigned long long parent, base, mtime_ns;
    unsigned first;
    PyObject *entries;
    double timeout;
    if (!PyArg_ParseTuple(args, "KKIOKd", &parent, &base, &first, &entries, &mtime_ns, &timeout))
        return NULL;
    if (!c_lookups || kind_file == NULL)
        Py_RETURN_FALSE;
    PyObject *seq = PySequence_Fast(entries, "publish: entries must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    struct dirtab *t = tab_find(parent);
    if (t != NULL && (t->base != base || t->mtime_ns != mtime_ns || t->timeout != timeout)) {
        tab_free(t);
        t = NULL;
    }
    if (t != NULL && n > 0) {  /* already there? (its first file or symlink at ``first + i``) */
        for (Py_ssize_t i = 0; i < n; i++) {
            const char *name;
            Py_ssize_t len;
            int code = entry_code(items[i], &name, &len);
            if (code < 0) {
                Py_DECREF(seq);
                return NULL;
            }
            if (code == 0)
                continue;
            long k = tab_index(t, name, (size_t)len);
            if (k >= 0 && t->entries[k].pos == first + (unsigned)i) {
                Py_DECREF(seq);
                Py_RETURN_TRUE;
            }
            break;
        }
    }
    if (t == NULL) {
        t = calloc(1, sizeof *t);
        if (t == NULL) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
        t->parent = parent;
        t->base = base;
        t->mtime_ns = mtime_ns;
        t->timeout = timeout;
        t->next_in_bucket = tab_buckets[parent % TAB_BUCKETS];
        tab_buckets[parent % TAB_BUCKETS] = t;
        t->older = tab_newest;
        if (tab_newest) tab_newest->newer = t; else tab_oldest = t;
        tab_newest = t;
        ntabs++;
    }
    while (tab_bytes > tab_cap && tab_oldest != NULL && tab_oldest != t)
        tab_free(tab_oldest);
    if (tab_bytes > tab_cap) {  /* one directory past the cap alone: it keeps what it has */
        Py_DECREF(seq);
        Py_RETURN_FALSE;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = items[i];
        const char *name;
        Py_ssize_t len;
        int code = entry_code(e, &name, &len);
        if (code < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        if (code == 0)
            continue;  /* a directory: a node of its own, looked up by Python */
        unsigned long long size = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(e, 2));
        if (size == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (len > 0xffff || tab_index(t, name, (size_t)len) >= 0)
            continue;
        if (!tab_reserve(t, 1, (size_t)len)) {
            Py_DECREF(seq);
            tab_free(t);
            return PyErr_NoMemory();
        }
        struct tab_entry *te = &t->entries[t->n];
        te->size = size;
        te->pos = first + (unsigned)i;
        te->name_off = (unsigned)t->names_len;
        te->name_len = (unsigned short)len;
        te->code = (unsigned char)code;
        memcpy(t->names + t->names_len, name, (size_t)len);
        t->names_len += (size_t)len;
        tab_insert_slot(t, t->n);
        t->n++;
    }
    Py_DECREF(seq);
    tab_account(t);
    while (tab_bytes > tab_cap && tab_oldest != NULL && tab_oldest != t)
        tab_free(tab_oldest);
    Py_RETURN_TRUE;
}

/* take_lookups() -> [(parent, base, pos, code, size)]: the LOOKUPs answered here since the
   last call (each one kernel reference the inode table must count), or None if there are none. */
static PyObject *py_take_lookups(PyObject *self, PyObject *unused) {
    if (npend == 0)
        Py_RETURN_NONE;
    PyObject *out = PyList_New(npend);
    if (out == NULL)
        return NULL;
    for (unsigned i = 0; i < npend; i++) {
        struct pending *q = &pend[i];
        PyObject *item = Py_BuildValue("(KKIBK)", q->parent, q->base, q->pos, q->code, q->size);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;  /* the list stays pending: nothing is lost */
        }
        PyList_SET_ITEM(out, i, item);
    }
    npend = 0;
    return out;
}

static PyObject *py_pending_lookups(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLong(npend);
}

/* drop(parent): directory ``parent``'s table goes (its block left the inode table). */
static PyObject *py_drop(PyObject *self, PyObject *arg) {
    unsigned long long parent = PyLong_AsUnsignedLongLong(arg);
    if (parent == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct dirtab *t = tab_find(parent);
    if (t != NULL)
        tab_free(t);
    Py_RETURN_NONE;
}

static void tabs_clear(void) {
    while (tab_oldest != NULL)
        tab_free(tab_oldest);
}

/* lookups(on, uid=0, gid=0, kinds=None, blksize=131072): LOOKUPs of published entries are
   answered here from now on (off: none, and every table goes; the pending list stays until
   taken).  kinds: (Kind.FILE, Kind.EXEC, Kind.SYMLINK).  RuntimeError unless wrapped(). */
static PyObject *py_lookups(PyObject *self, PyObject *args) {
    int on;
    unsigned uid = 0, gid = 0, blksize = 128 * 1024;
    PyObject *kinds = Py_None;
    if (!PyArg_ParseTuple(args, "p|IIOI", &on, &uid, &gid, &kinds, &blksize))
        return NULL;
    if (on) {
        if (!wrapped || pyfuse3_lookup == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "no FUSE session went through commitfs's fuse_session_new");
            return NULL;
        }
        if (!PyTuple_Check(kinds) || PyTuple_GET_SIZE(kinds) != 3) {
            PyErr_SetString(PyExc_TypeError, "lookups: kinds must be (Kind.FILE, Kind.EXEC, Kind.SYMLINK)");
            return NULL;
        }
        if (pend == NULL && (pend = malloc(MAX_PENDING * sizeof *pend)) == NULL)
            return PyErr_NoMemory();
        Py_XSETREF(kind_file, Py_NewRef(PyTuple_GET_ITEM(kinds, 0)));
        Py_XSETREF(kind_exec, Py_NewRef(PyTuple_GET_ITEM(kinds, 1)));
        Py_XSETREF(kind_symlink, Py_NewRef(PyTuple_GET_ITEM(kinds, 2)));
        tab_uid = uid;
        tab_gid = gid;
        tab_blksize = blksize;
    } else {
        tabs_clear();
    }
    c_lookups = on;
    Py_RETURN_NONE;
}

static PyObject *py_lookups_cap(PyObject *self, PyObject *arg) {
    size_t cap = PyLong_AsSize_t(arg);
    if (cap == (size_t)-1 && PyErr_Occurred())
        return NULL;
    tab_cap = cap;
    while (tab_bytes > tab_cap && tab_oldest != NULL)
        tab_free(tab_oldest);
    Py_RETURN_NONE;
}

static PyObject *py_lookup_counts(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KKKIn)", lookups_answered, lookups_early - early_misses, lookups_waited, ntabs,
                         (Py_ssize_t)tab_bytes);
}

static void read_shim(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    /* fi is libfuse's own, on its stack for this call only (do_read). */
    if (in_early_read) {  /* the answer to this very request (fuse_session_receive_buf) */
        in_early_read = 0;
        if (cmap_reply != NULL) {  /* from a chunk map */
            fuse_reply_buf(req, cmap_reply_at, cmap_reply_len);
            free(cmap_reply);
            cmap_reply = NULL;
            reads_from_maps++;
        } else {
            fuse_reply_buf(req, early_read.buf, (size_t)early_read.len);
            PyBuffer_Release(&early_read);
            reads_in_c++;
        }
        rewritten++;  /* a READ by inode too, answered here */
        return;
    }
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
    pyfuse3_init = NULL;
    if (op->init != NULL) {
        pyfuse3_init = op->init;
        table->init = init_shim;
    }
    pyfuse3_readdirplus = NULL;
    if (op_size >= offsetof(struct fuse_lowlevel_ops, readdirplus) + sizeof(read_fn)
            && op->readdir == NULL && op->readdirplus != NULL) {
        pyfuse3_readdirplus = op->readdirplus;
        table->readdir = readdir_shim;
    }
    pyfuse3_getxattr = NULL;
    if (op_size >= offsetof(struct fuse_lowlevel_ops, getxattr) + sizeof(getxattr_fn) && op->getxattr != NULL) {
        pyfuse3_getxattr = op->getxattr;
        table->getxattr = getxattr_shim;
    }
    pyfuse3_write_buf = NULL;
    if (op_size >= offsetof(struct fuse_lowlevel_ops, write_buf) + sizeof(write_buf_fn) && op->write_buf != NULL) {
        pyfuse3_write_buf = op->write_buf;
        table->write_buf = write_buf_shim;
    }
    pyfuse3_lookup = NULL;
    if (op->lookup != NULL) {
        pyfuse3_lookup = op->lookup;
        table->lookup = lookup_shim;
    }
    granted = -1;
    nplain = 0;
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

/* libfuse's own definitions of the reply functions this module also defines.  Resolved when
   the module is loaded, before anything can call them: libfuse3, loaded as this module's
   dependency, binds its own calls of them to this module's definitions too (a dlopen'ed
   object's dependencies look in its local scope, where this module comes first), made
   global or not, so they must always reach libfuse's.  0 if one is missing. */
static int resolve_reals(void) {
    real_add_plus = (add_plus_fn)libfuse_symbol("fuse_add_direntry_plus");
    real_add = (add_fn)libfuse_symbol("fuse_add_direntry");
    real_reply_buf = (reply_buf_fn)libfuse_symbol("fuse_reply_buf");
    real_reply_err = (reply_err_fn)libfuse_symbol("fuse_reply_err");
    real_reply_open = (reply_open_fn)libfuse_symbol("fuse_reply_open");
    real_receive_buf = (receive_buf_fn)libfuse_symbol("fuse_session_receive_buf");
    real_process_buf = (process_buf_fn)libfuse_symbol("fuse_session_process_buf");
    return real_receive_buf != NULL && real_receive_buf != fuse_session_receive_buf && real_process_buf != NULL
        && real_add_plus != NULL && real_add_plus != fuse_add_direntry_plus && real_add != NULL
        && real_reply_buf != NULL && real_reply_buf != fuse_reply_buf
        && real_reply_err != NULL && real_reply_err != fuse_reply_err
        && real_reply_open != NULL && real_reply_open != fuse_reply_open;
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
    if (real_add_plus == NULL || real_add == NULL || real_reply_buf == NULL || real_reply_err == NULL
            || real_reply_open == NULL)
        return PyBool_FromLong(0);  /* not reached: PyInit__noopen refuses the import then */
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

/* Set *flag from a Python truth value; turning it on needs a wrapped session. */
static PyObject *set_session_flag(PyObject *arg, int *flag) {
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    if (on && !wrapped) {
        PyErr_SetString(PyExc_RuntimeError, "no FUSE session went through commitfs's fuse_session_new");
        return NULL;
    }
    *flag = on;
    Py_RETURN_NONE;
}

static PyObject *py_enable(PyObject *self, PyObject *arg) {
    return set_session_flag(arg, &enabled);
}

static PyObject *py_rewritten(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(rewritten);
}

static PyObject *py_listings(PyObject *self, PyObject *arg) {
    return set_session_flag(arg, &listings);
}

static PyObject *py_request_capabilities(PyObject *self, PyObject *arg) {
    unsigned long mask = PyLong_AsUnsignedLong(arg);
    if (mask == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (mask > 0xffffffffUL) {
        PyErr_SetString(PyExc_ValueError, "FUSE capabilities are 32 bits (fuse_conn_info.want)");
        return NULL;
    }
    extra_caps = (unsigned)mask;
    Py_RETURN_NONE;
}

static PyObject *py_granted(PyObject *self, PyObject *unused) {
    if (granted < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(granted);
}

static PyObject *py_counts(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KK)", plain_readdirs, cached_opendirs);
}

static PyObject *py_xattrs(PyObject *self, PyObject *prefix) {
    char *copy = NULL;
    if (prefix != Py_None) {
        char *bytes;
        Py_ssize_t n;
        if (!wrapped) {
            PyErr_SetString(PyExc_RuntimeError, "no FUSE session went through commitfs's fuse_session_new");
            return NULL;
        }
        if (PyBytes_AsStringAndSize(prefix, &bytes, &n) < 0)
            return NULL;
        copy = malloc((size_t)n + 1);
        if (copy == NULL)
            return PyErr_NoMemory();
        memcpy(copy, bytes, (size_t)n + 1);
        xattr_prefix_len = (size_t)n;
    }
    free(xattr_prefix);
    xattr_prefix = copy;
    Py_RETURN_NONE;
}

static PyObject *py_xattrs_refused(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(xattrs_refused);
}

static PyObject *py_writes(PyObject *self, PyObject *args) {
    PyObject *fd_cb, *done_cb;
    if (!PyArg_ParseTuple(args, "OO", &fd_cb, &done_cb))
        return NULL;
    if (fd_cb == Py_None || done_cb == Py_None) {
        Py_CLEAR(write_fd_cb);
        Py_CLEAR(wrote_cb);
        Py_RETURN_NONE;
    }
    if (!PyCallable_Check(fd_cb) || !PyCallable_Check(done_cb)) {
        PyErr_SetString(PyExc_TypeError, "writes(write_fd, wrote) takes two callables (or None, None)");
        return NULL;
    }
    if (!wrapped || pyfuse3_write_buf == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no FUSE session with a write callback went through commitfs's fuse_session_new");
        return NULL;
    }
    Py_INCREF(fd_cb);
    Py_INCREF(done_cb);
    Py_XSETREF(write_fd_cb, fd_cb);
    Py_XSETREF(wrote_cb, done_cb);
    Py_RETURN_NONE;
}

static PyObject *py_writes_in_c(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(writes_in_c);
}

/* reads(read_now): READs with handle 0 are offered to read_now first (None: none are). */
static PyObject *py_reads(PyObject *self, PyObject *cb) {
    if (cb != Py_None) {
        if (!PyCallable_Check(cb)) {
            PyErr_SetString(PyExc_TypeError, "reads(read_now) takes a callable (or None)");
            return NULL;
        }
        if (!wrapped || pyfuse3_read == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "no FUSE session went through commitfs's fuse_session_new");
            return NULL;
        }
        Py_INCREF(cb);
        Py_XSETREF(read_now_cb, cb);
    } else {
        Py_CLEAR(read_now_cb);
    }
    Py_RETURN_NONE;
}

/* chunk_maps(hasher): READs are answered from chunk maps from now on (None: none are, and
   every map goes). */
static PyObject *py_chunk_maps(PyObject *self, PyObject *hasher) {
    if (hasher == Py_None) {
        cmaps_clear();
        Py_CLEAR(cmap_hasher);
        Py_RETURN_NONE;
    }
    if (!PyCallable_Check(hasher)) {
        PyErr_SetString(PyExc_TypeError, "chunk_maps(hasher): hasher(data).digest() must give a chunk's id");
        return NULL;
    }
    if (cmap_digest == NULL && (cmap_digest = PyUnicode_InternFromString("digest")) == NULL)
        return NULL;
    Py_INCREF(hasher);
    Py_XSETREF(cmap_hasher, hasher);
    Py_RETURN_NONE;
}

/* chunk_map(inode, size, paths, ends, ids, fd_index, offsets) -> bool: the map of file
   ``inode`` (``size`` bytes): pack file ``paths`` (opened here), and per chunk its end in
   the file, id, path index and offset (``ends``, ``fd_index``, ``offsets``: array('Q'),
   array('I'), array('Q'); ``ids``: 32 bytes each). */
static PyObject *py_chunk_map(PyObject *self, PyObject *args) {
    unsigned long long ino, size;
    PyObject *paths;
    Py_buffer ends, ids, fdi, offs;
    if (cmap_hasher == NULL)
        Py_RETURN_FALSE;
    if (!PyArg_ParseTuple(args, "KKO!y*y*y*y*", &ino, &size, &PyTuple_Type, &paths, &ends, &ids, &fdi, &offs))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = ends.len / 8, nfds = PyTuple_GET_SIZE(paths);
    if (n == 0 || ends.len != 8 * n || ids.len != 32 * n || fdi.len != 4 * n || offs.len != 8 * n
            || n > UINT32_MAX || nfds == 0 || ((const uint64_t *)ends.buf)[n - 1] != size
            || ((const uint64_t *)ends.buf)[0] == 0) {
        PyErr_SetString(PyExc_ValueError, "chunk_map: arrays of different lengths, or ends not from > 0 to size");
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t *e = ends.buf;
        if (((const uint32_t *)fdi.buf)[i] >= (uint32_t)nfds || (i && e[i] <= e[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "chunk_map: ends must grow, path indexes be in range");
            goto out;
        }
    }
    if (nfds > CMAP_MAX_FDS) {  /* a file spread over more packs than all maps may hold open */
        result = Py_NewRef(Py_False);
        goto out;
    }
    struct cmap *old = cmap_find(ino);
    if (old != NULL)
        cmap_free(old);
    while (cmap_oldest != NULL && cmap_fds + (unsigned)nfds > CMAP_MAX_FDS)
        cmap_free(cmap_oldest);
    struct cmap *m = calloc(1, sizeof *m);
    if (m == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    m->ino = ino;
    m->size = size;
    m->n = (uint32_t)n;
    m->last_end = (unsigned long long)-1;
    m->ends = malloc(ends.len);
    m->ids = malloc(ids.len);
    m->fd_index = malloc(fdi.len);
    m->offsets = malloc(offs.len);
    m->fds = malloc(sizeof(int) * (size_t)nfds);
    if (!m->ends || !m->ids || !m->fd_index || !m->offsets || !m->fds) {
        free(m->ends); free(m->ids); free(m->fd_index); free(m->offsets); free(m->fds); free(m);
        PyErr_NoMemory();
        goto out;
    }
    memcpy(m->ends, ends.buf, ends.len);
    memcpy(m->ids, ids.buf, ids.len);
    memcpy(m->fd_index, fdi.buf, fdi.len);
    memcpy(m->offsets, offs.buf, offs.len);
    m->nfds = (uint32_t)nfds;
    cmap_fds += (unsigned)nfds;
    for (Py_ssize_t i = 0; i < nfds; i++) {
        const char *path = PyUnicode_Check(PyTuple_GET_ITEM(paths, i)) ? PyUnicode_AsUTF8(PyTuple_GET_ITEM(paths, i)) : NULL;
        if (path == NULL)
            PyErr_Clear();
        m->fds[i] = path == NULL ? -1 : open(path, O_RDONLY | O_CLOEXEC);  /* -1: its chunks go to Python */
    }
    m->bytes = sizeof *m + ends.len + ids.len + fdi.len + offs.len + sizeof(int) * (size_t)nfds;
    m->next_in_bucket = cmap_buckets[ino % CMAP_BUCKETS];
    cmap_buckets[ino % CMAP_BUCKETS] = m;
    m->older = cmap_newest;
    if (cmap_newest) cmap_newest->newer = m; else cmap_oldest = m;
    cmap_newest = m;
    cmap_bytes += m->bytes;
    while (cmap_bytes > CMAP_CAP && cmap_oldest != NULL && cmap_oldest != m)
        cmap_free(cmap_oldest);
    if (cmap_bytes > CMAP_CAP) {  /* one map past the cap alone: not kept */
        cmap_free(m);
        result = Py_NewRef(Py_False);
        goto out;
    }
    result = Py_NewRef(Py_True);
out:
    PyBuffer_Release(&ends);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&fdi);
    PyBuffer_Release(&offs);
    return result;
}

/* chunk_mapped(inode) -> bool: whether file ``inode`` has a chunk map now. */
static PyObject *py_chunk_mapped(PyObject *self, PyObject *arg) {
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (ino == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(cmap_find(ino) != NULL);
}

static PyObject *py_map_counts(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KK)", reads_from_maps, map_misses);
}

static PyObject *py_yield_loop(PyObject *self, PyObject *unused) {
    loop_wanted = 1;
    Py_RETURN_NONE;
}

static PyObject *py_read_counts(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KKK)", reads_offered, reads_in_c, read_errors);
}

static PyMethodDef methods[] = {
    {"reads", py_reads, METH_O,
     "reads(read_now): from now on a READ with file handle 0 is first offered, as it is read, to "
     "read_now(inode, offset, size) -> bytes-like (the reply, at most size bytes) or None (the READ "
     "goes to pyfuse3's read); reads(None): none is.  RuntimeError unless wrapped()."},
    {"chunk_maps", py_chunk_maps, METH_O,
     "chunk_maps(hasher): small READs that do not continue their file's last READ are "
     "answered from chunk maps (chunk_map) from now on, each chunk read whole and hashed with hasher; "
     "chunk_maps(None): none are, and every map goes."},
    {"chunk_map", py_chunk_map, METH_VARARGS,
     "chunk_map(inode, size, paths, ends, ids, fd_index, offsets) -> bool: where file inode's "
     "chunks lie in local pack files (False: past the cap, or chunk maps are off)."},
    {"chunk_mapped", py_chunk_mapped, METH_O,
     "chunk_mapped(inode) -> bool: whether file inode has a chunk map now (maps go oldest first)."},
    {"map_counts", py_map_counts, METH_NOARGS,
     "map_counts() -> (READs answered from chunk maps, READs a map could not answer)."},
    {"yield_loop", py_yield_loop, METH_NOARGS,
     "yield_loop(): after the answer at hand, fuse_session_receive_buf returns to pyfuse3's loop "
     "(read_now started tasks) instead of waiting for the next request itself."},
    {"read_counts", py_read_counts, METH_NOARGS,
     "read_counts() -> (READs offered to read_now, answered with its bytes, refused for an error)."},
    {"writes", py_writes, METH_VARARGS,
     "writes(write_fd, wrote): from now on a WRITE calls write_fd(fh) -> descriptor or -1; for a "
     "descriptor the bytes are pwritten to it here, then wrote(fh, off, written) is called and the "
     "WRITE answered here; -1 sends it to pyfuse3's write.  writes(None, None): every WRITE goes "
     "to pyfuse3.  RuntimeError unless wrapped()."},
    {"writes_in_c", py_writes_in_c, METH_NOARGS,
     "writes_in_c() -> int: WRITEs pwritten and answered here."},
    {"lookups", py_lookups, METH_VARARGS,
     "lookups(on, uid, gid, kinds, blksize): LOOKUPs of published entries are answered in C from now on "
     "(kinds: (Kind.FILE, Kind.EXEC, Kind.SYMLINK)); off drops every table.  RuntimeError unless wrapped()."},
    {"publish", py_publish, METH_VARARGS,
     "publish(parent, base, first, entries, mtime_ns, timeout) -> bool: the files and symlinks of entries "
     "(TreeEntry tuples, the first at position first) of directory parent, whose block starts at base."},
    {"take_lookups", py_take_lookups, METH_NOARGS,
     "take_lookups() -> list of (parent, base, pos, code, size) | None: LOOKUPs answered in C since the last call."},
    {"pending_lookups", py_pending_lookups, METH_NOARGS,
     "pending_lookups() -> int: LOOKUPs answered in C and not taken yet."},
    {"drop", py_drop, METH_O, "drop(parent): directory parent's table goes (its block left the inode table)."},
    {"lookups_cap", py_lookups_cap, METH_O, "lookups_cap(bytes): the tables' byte cap (oldest dropped first)."},
    {"lookup_counts", py_lookup_counts, METH_NOARGS,
     "lookup_counts() -> (LOOKUPs answered in C; of them, as read, before pyfuse3's loop; of those, read while "
     "waiting for one after answering another; directory tables; their bytes)."},
    {"xattrs", py_xattrs, METH_O,
     "xattrs(prefix): from now on a GETXATTR of a name not starting with the bytes prefix is "
     "answered ENODATA here (None: every one goes to pyfuse3); RuntimeError unless wrapped()."},
    {"xattrs_refused", py_xattrs_refused, METH_NOARGS,
     "xattrs_refused() -> int: GETXATTRs answered ENODATA here."},
    {"listings", py_listings, METH_O,
     "listings(on): the next INIT asks for READDIRPLUS_AUTO (adaptive readdirplus; plain READDIRs "
     "reach readdir() with PLAIN_FH in the handle); RuntimeError unless wrapped()."},
    {"request_capabilities", py_request_capabilities, METH_O,
     "request_capabilities(mask): the next INIT also asks for these FUSE_CAP_* bits (those the "
     "kernel has); 0 asks for none."},
    {"granted", py_granted, METH_NOARGS,
     "granted() -> int | None: conn->want after the last INIT went through the wrapper (None before)."},
    {"counts", py_counts, METH_NOARGS,
     "counts() -> (plain READDIRs, OPENDIRs answered with cache_readdir and keep_cache)."},
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
    if (!resolve_reals()) {
        /* Not reached with a libfuse 3 (they are all public API); the process then has no
           way to use the module's definitions safely, so it must not run a FUSE session. */
        fprintf(stderr, "commitfs.fuse._noopen: libfuse's own reply functions were not found\n");
        abort();
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "PLAIN_FH", PyLong_FromUnsignedLongLong(PLAIN_FH)) < 0
            || PyModule_AddObject(m, "CACHE_FH", PyLong_FromUnsignedLongLong(CACHE_FH)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
