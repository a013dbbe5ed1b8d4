/* shmemext C API: shared blocks from other C and C++ extensions.
 *
 * Build against it with include_dirs=[shmemext.get_include()].  In one .c
 * file, import the API once (in your module's exec function):
 *
 *     #include <Python.h>
 *     #include <shmemext.h>
 *     ...
 *     if (ShmemExt_IMPORT < 0) return -1;       // ImportError set
 *
 *     ShmemExt_Error err;
 *     ShmemExt_Block *b;
 *     int created;
 *     if (ShmemExtAPI->open("jobs", SHMEMEXT_VALUE, 4096, 0, 0600, &b, &created, &err) != SHMEMEXT_OK)
 *         ... err.message says why ...
 *     ShmemExtAPI->set_utf8(b, "hello", 5, &err);
 *
 * A consumer made of several .c files defines SHMEMEXT_API_DEFINE in the file
 * that calls ShmemExt_IMPORT and SHMEMEXT_API_EXTERN in the others, before
 * including this header; a single-file consumer defines neither.
 *
 * Every `err` argument may be NULL: the result code alone is returned then.
 *
 * Functions marked [no GIL] may be called without holding the GIL, from any
 * thread; [GIL] ones need it (an attached thread state, on free-threaded
 * CPython).
 *
 * Threads and close(): each call on a handle is safe against a close() of it
 * from another thread (the close waits for the call, or the call sees
 * SHMEMEXT_E_CLOSED).  What a call cannot guard is the pointer itself: a
 * handle from default_block() or from_object() lives inside a Python object,
 * and one from open() until its close().  To keep using a handle across
 * calls while other code may close it, acquire() it and release() it when
 * done: meanwhile its close() is refused (BufferError in Python,
 * SHMEMEXT_E_BUSY here) and its Python object stays alive.  data()'s
 * pointer, too, stays valid only while the handle is acquired (or nothing
 * can close it).  Errors are returned as SHMEMEXT_* codes with
 * the details in a ShmemExt_Error; no Python exception is set except where
 * a function says so.
 *
 * The table only grows by appending: a newer shmemext serves consumers built
 * against an older header; an older one is refused at import with a clear
 * ImportError.
 */
#ifndef SHMEMEXT_H
#define SHMEMEXT_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The newest table this header describes.  A consumer that needs no more
 * than an older one may define SHMEMEXT_CAPI_VERSION to it before including
 * this header, to run against an older shmemext too. */
#define SHMEMEXT_CAPI_LATEST 3
#ifndef SHMEMEXT_CAPI_VERSION
#define SHMEMEXT_CAPI_VERSION SHMEMEXT_CAPI_LATEST
#endif
#define SHMEMEXT_CAPSULE_NAME "shmemext._C_API"

/* Result codes. */
#define SHMEMEXT_OK            0
#define SHMEMEXT_E_OS          1  /* a system call failed: os_error */
#define SHMEMEXT_E_NAME        2  /* invalid block name */
#define SHMEMEXT_E_SIZE        3  /* invalid size */
#define SHMEMEXT_E_FOREIGN     4  /* the name holds something that is not a shmemext block */
#define SHMEMEXT_E_NEWER       5  /* the block was made by a newer shmemext */
#define SHMEMEXT_E_CORRUPT     6  /* the block's header is corrupt */
#define SHMEMEXT_E_KIND        7  /* a value cell used as a segment or the other way round */
#define SHMEMEXT_E_CAPACITY    8  /* the existing block is smaller than asked */
#define SHMEMEXT_E_TOOBIG      9  /* the value does not fit the block's capacity */
#define SHMEMEXT_E_TIMEOUT     10 /* a lock wait timed out */
#define SHMEMEXT_E_NOTOWNER    11 /* a private block of another user */
#define SHMEMEXT_E_BADVALUE    12 /* the stored value is corrupt */
#define SHMEMEXT_E_CLOSED      13 /* the handle was closed, or is not one open() made */
#define SHMEMEXT_E_RANGE       15 /* an offset or length beyond a segment's size */
#define SHMEMEXT_E_BUFFER      16 /* the caller's buffer is too small: *len says how much is needed */
#define SHMEMEXT_E_ENCODING    17 /* text that is not valid UTF-8 */
#define SHMEMEXT_E_INTERRUPTED 18 /* reserved: a lock wait given up (never returned by this table's calls) */
#define SHMEMEXT_E_PERSIST                                                                                             \
    19                         /* SHMEMEXT_PERSIST asked of a block that exists without it, on an OS
                                   (Linux) whose kernel frees such a block with its last holder */
#define SHMEMEXT_E_BUSY     20 /* close() refused: acquire() of the handle not yet released (version 2) */
#define SHMEMEXT_E_NOTFOUND 21 /* SHMEMEXT_EXISTING, and no live block has the name (version 2) */
#define SHMEMEXT_E_EMPTY    22 /* a queue had no message in time (version 3) */
#define SHMEMEXT_E_FULL     23 /* a queue had no room for the message in time (version 3) */

/* Block kinds for open(). */
#define SHMEMEXT_VALUE   1
#define SHMEMEXT_SEGMENT 2
#define SHMEMEXT_QUEUE   3 /* version 3; capacity is bytes of room for messages (0: 1 MiB) */

/* Flags for open(). */
#define SHMEMEXT_PERSIST 1u /* keep the block after the last process detaches */
#define SHMEMEXT_GLOBAL  4u /* Windows: name it in Global\ (every session; needs SeCreateGlobalPrivilege) */
#define SHMEMEXT_EXISTING                                                                                              \
    8u /* never create: SHMEMEXT_E_NOTFOUND unless a live block has the name (version 2;
                                   a version 1 shmemext ignores it and creates) */

typedef struct ShmemExt_Block ShmemExt_Block;

typedef struct ShmemExt_Error {
    int code;          /* a SHMEMEXT_* result code */
    int os_error;      /* errno (or GetLastError() on Windows) for SHMEMEXT_E_OS */
    char message[512]; /* a sentence naming the block and the cause */
} ShmemExt_Error;

typedef struct ShmemExt_CAPI {
    uint32_t version; /* the API version this shmemext provides */
    uint32_t size;    /* sizeof(ShmemExt_CAPI) in this shmemext */

    /* -- version 1 -- */

    /* [no GIL] Opens the block `name`, creating it zero-filled with `size` bytes
     * (0: the default, 4096) if no process has it.  `mode` is its permission bits
     * when created; 0600 keeps it to the current user.  `flags`: SHMEMEXT_PERSIST,
     * SHMEMEXT_GLOBAL, SHMEMEXT_EXISTING.  *created tells whether this call created it.  Close the
     * handle with close(). */
    int (*open)(const char *name, int kind, uint64_t size, unsigned flags, unsigned mode, ShmemExt_Block **out,
                int *created, ShmemExt_Error *err);
    /* [no GIL] Detaches and frees a handle from open(); the last process to
     * detach releases the block.  A second close() of the same handle, or
     * close() of a handle open() did not make, is SHMEMEXT_E_CLOSED and
     * touches nothing.  Any other use of a handle after its close() is
     * undefined, as for free(): drop the pointer. */
    int (*close)(ShmemExt_Block *block, ShmemExt_Error *err);
    /* [GIL] The default block of the calling interpreter's shmemext module, or
     * NULL with RuntimeError set when it is disabled.  Owned by the module:
     * do not close it. */
    ShmemExt_Block *(*default_block)(void);
    /* [GIL] The block of a shmemext.Value or shmemext.Segment object, or NULL
     * with TypeError/ValueError set.  Valid while the object is alive and
     * open (acquire() it to be sure): do not close it. */
    ShmemExt_Block *(*from_object)(PyObject *obj);

    /* [no GIL] Commits `len` bytes as a bytes value / valid UTF-8 as a str value
     * (SHMEMEXT_E_ENCODING otherwise).  A value cell's capacity counts the value
     * as stored: bytes as they are, a str in CPython's PEP 393 form, 1, 2 or 4
     * bytes per character by its widest one (28 bytes of UTF-8 holding one
     * emoji and 24 ASCII characters take 100 bytes); SHMEMEXT_E_TOOBIG when it
     * does not fit. */
    int (*set_bytes)(ShmemExt_Block *block, const void *data, size_t len, ShmemExt_Error *err);
    int (*set_utf8)(ShmemExt_Block *block, const char *text, size_t len, ShmemExt_Error *err);
    /* [no GIL] Copies one committed value into buf (capacity `cap`): bytes as
     * they are, str as UTF-8 (not NUL-terminated).  *len (may be NULL) is set
     * to the value's length; SHMEMEXT_E_BUFFER when it exceeds cap.  buf may be
     * NULL with cap 0: then an empty value succeeds, any other is E_BUFFER with
     * the length needed.  *is_text (may be NULL)
     * tells str from bytes.  *version (may be NULL) is the value's version.
     * A str that UTF-8 cannot carry (one with a lone surrogate, set from
     * Python) is SHMEMEXT_E_ENCODING. */
    int (*get)(ShmemExt_Block *block, void *buf, size_t cap, size_t *len, int *is_text, uint64_t *version,
               ShmemExt_Error *err);
    /* Every call below on a block that was closed (a Python object's, by its
     * close(); the default block, at exit) is SHMEMEXT_E_CLOSED. */
    /* [no GIL] How many values have been committed to a value cell (0 once closed). */
    uint64_t (*value_version)(ShmemExt_Block *block);

    /* [no GIL] A raw segment's memory and size (NULL for a value cell). */
    void *(*data)(ShmemExt_Block *block, size_t *size);
    /* [no GIL] The block's cross-process lock.  timeout_ns < 0 waits forever,
     * 0 only tries.  *owner_died (may be NULL) is set when a holder died
     * holding it since the last lock() (or Segment.lock()) that reported one.
     * The lock is per thread and not re-entrant. */
    int (*lock)(ShmemExt_Block *block, int64_t timeout_ns, int *owner_died, ShmemExt_Error *err);
    int (*unlock)(ShmemExt_Block *block, ShmemExt_Error *err);
    /* [no GIL] The block's name and whether this process created it. */
    const char *(*name)(ShmemExt_Block *block);
    int (*created)(ShmemExt_Block *block);
    /* [no GIL] Sleeps until the value cell's version differs from `seen`, at
     * most timeout_ns (< 0: forever); *now (may be NULL) is the version then.
     * SHMEMEXT_E_TIMEOUT when the time ran out.  Signals do not end the wait:
     * to stay interruptible, wait in slices and check in between.  It takes
     * the cell's lock for a moment: a thread that holds it (lock() above)
     * gets an error instead of a wait no set() could end. */
    int (*wait)(ShmemExt_Block *block, uint64_t seen, int64_t timeout_ns, uint64_t *now, ShmemExt_Error *err);

    /* -- version 2 -- */

    /* Holds the handle open: until the matching release(), close() of it is
     * refused and the Python object it belongs to (if any) stays alive.
     * SHMEMEXT_E_CLOSED when it is closed or closing.  Counted: n acquire()s
     * need n release()s.  [GIL] for a handle from default_block() or
     * from_object() (it takes a reference to the object), [no GIL] for one
     * from open(). */
    int (*acquire)(ShmemExt_Block *block, ShmemExt_Error *err);
    /* Ends one acquire(); SHMEMEXT_E_CLOSED (and nothing changed) when there
     * is none to end.  [GIL] and [no GIL] as for acquire(). */
    int (*release)(ShmemExt_Block *block, ShmemExt_Error *err);

    /* -- version 3 -- */

    /* [no GIL] Puts `len` bytes as one message on a queue (a handle of kind
     * SHMEMEXT_QUEUE, or from_object() of a shmemext.Queue); Python's get()
     * returns it as bytes.  timeout_ns: 0 only tries, < 0 waits for room for
     * ever.  SHMEMEXT_E_FULL when there was no room in time; SHMEMEXT_E_TOOBIG
     * for a message that can never fit (nothing written). */
    int (*queue_put)(ShmemExt_Block *block, const void *data, size_t len, int64_t timeout_ns, ShmemExt_Error *err);
    /* [no GIL] Takes the oldest message into buf (cap bytes): *len is its
     * length, *is_text whether Python put a str (copied as UTF-8), *is_pickle
     * whether it is a pickle (its bytes as they are; may be NULL).  A buffer
     * too small is SHMEMEXT_E_BUFFER with *len the size needed, and the message
     * stays in the queue.  SHMEMEXT_E_EMPTY when none came within timeout_ns
     * (0 only looks, < 0 waits for ever). */
    int (*queue_get)(ShmemExt_Block *block, void *buf, size_t cap, size_t *len, int *is_text, int *is_pickle,
                     int64_t timeout_ns, ShmemExt_Error *err);
} ShmemExt_CAPI;

/* The size of the table up to the version a consumer needs, for the check at import. */
#define SHMEMEXT_CAPI_NEEDED_SIZE                                                                                      \
    (SHMEMEXT_CAPI_VERSION < 2   ? offsetof(ShmemExt_CAPI, acquire)                                                    \
     : SHMEMEXT_CAPI_VERSION < 3 ? offsetof(ShmemExt_CAPI, queue_put)                                                  \
                                 : sizeof(ShmemExt_CAPI))

#if defined(SHMEMEXT_API_EXTERN)
extern ShmemExt_CAPI *ShmemExtAPI;
#elif defined(SHMEMEXT_API_DEFINE)
ShmemExt_CAPI *ShmemExtAPI = NULL;
#else
static ShmemExt_CAPI *ShmemExtAPI = NULL;
#endif

#if !defined(SHMEMEXT_API_EXTERN)
/* Imports the API into ShmemExtAPI.  Returns 0, or -1 with ImportError set. */
static inline int ShmemExt_Import(void)
{
    /* The package first: PyCapsule_Import would put its own words over the
     * reason an import of shmemext failed. */
    ShmemExt_CAPI *api = NULL;
    PyObject *package = PyImport_ImportModule("shmemext");
    if (package != NULL) {
        Py_DECREF(package);
        api = (ShmemExt_CAPI *)PyCapsule_Import(SHMEMEXT_CAPSULE_NAME, 0);
    }
    if (api == NULL) {
        /* Say what went wrong (shmemext missing, or its own import failing:
         * a bad SHMEMEXT_NAME, say), with the real error as the cause. */
        PyObject *type, *value, *tb, *ntype, *nvalue, *ntb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (value == NULL) {
            PyErr_Format(PyExc_ImportError, "cannot import the shmemext C API (%s)", SHMEMEXT_CAPSULE_NAME);
        } else {
            if (tb != NULL)
                PyException_SetTraceback(value, tb);
            if (PyErr_GivenExceptionMatches(type, PyExc_ModuleNotFoundError))
                PyErr_Format(PyExc_ImportError, "cannot import the shmemext C API (%s): is shmemext installed? (%S)",
                             SHMEMEXT_CAPSULE_NAME, value);
            else
                PyErr_Format(PyExc_ImportError, "cannot import the shmemext C API (%s): importing shmemext failed: %S",
                             SHMEMEXT_CAPSULE_NAME, value);
            PyErr_Fetch(&ntype, &nvalue, &ntb);
            PyErr_NormalizeException(&ntype, &nvalue, &ntb);
            if (nvalue != NULL)
                PyException_SetCause(nvalue, value); /* steals value */
            else
                Py_DECREF(value);
            PyErr_Restore(ntype, nvalue, ntb);
        }
        Py_XDECREF(type);
        Py_XDECREF(tb);
        return -1;
    }
    if (api->version < SHMEMEXT_CAPI_VERSION || api->size < SHMEMEXT_CAPI_NEEDED_SIZE) {
        PyErr_Format(PyExc_ImportError,
                     "this extension needs version %d of the shmemext C API, but the installed shmemext "
                     "provides version %u: upgrade shmemext (pip install -U shmemext)",
                     (int)SHMEMEXT_CAPI_VERSION, (unsigned)api->version);
        return -1;
    }
    ShmemExtAPI = api;
    return 0;
}

#define ShmemExt_IMPORT ShmemExt_Import()
#endif

#ifdef __cplusplus
}
#endif

#endif /* SHMEMEXT_H */
