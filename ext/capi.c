/* The C API table (shmemext/include/shmemext.h) over the block core.
 * Everything here runs without the GIL except the two functions that
 * module.c provides, which look at Python objects, and acquire/release of
 * a Python object's handle, which keep that object alive. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "glue.h"
#include "queue.h"

_Static_assert(SHMEMEXT_OK == SHX_OK && SHMEMEXT_E_OS == SHX_E_OS && SHMEMEXT_E_NAME == SHX_E_NAME &&
                   SHMEMEXT_E_SIZE == SHX_E_SIZE && SHMEMEXT_E_FOREIGN == SHX_E_FOREIGN &&
                   SHMEMEXT_E_NEWER == SHX_E_NEWER && SHMEMEXT_E_CORRUPT == SHX_E_CORRUPT &&
                   SHMEMEXT_E_KIND == SHX_E_KIND && SHMEMEXT_E_CAPACITY == SHX_E_CAPACITY &&
                   SHMEMEXT_E_TOOBIG == SHX_E_TOOBIG && SHMEMEXT_E_TIMEOUT == SHX_E_TIMEOUT &&
                   SHMEMEXT_E_NOTOWNER == SHX_E_NOTOWNER && SHMEMEXT_E_BADVALUE == SHX_E_BADVALUE &&
                   SHMEMEXT_E_CLOSED == SHX_E_CLOSED && SHMEMEXT_E_RANGE == SHX_E_RANGE &&
                   SHMEMEXT_E_BUFFER == SHX_E_BUFFER && SHMEMEXT_E_ENCODING == SHX_E_ENCODING &&
                   SHMEMEXT_E_INTERRUPTED == SHX_E_INTERRUPTED && SHMEMEXT_E_PERSIST == SHX_E_PERSIST &&
                   SHMEMEXT_E_BUSY == SHX_E_BUSY && SHMEMEXT_E_NOTFOUND == SHX_E_NOTFOUND,
               "public result codes match the core's");
_Static_assert(SHMEMEXT_VALUE == SHX_KIND_VALUE && SHMEMEXT_SEGMENT == SHX_KIND_SEGMENT, "kinds match");
_Static_assert(SHMEMEXT_PERSIST == SHX_PERSIST && SHMEMEXT_GLOBAL == SHX_GLOBAL && SHMEMEXT_EXISTING == SHX_EXISTING,
               "flags match");

static shx_block *block_of(ShmemExt_Block *handle) { return (shx_block *)handle; }

/* The handles open() made and close() has not freed yet.  close() frees only
 * what it finds here, so a second close() of a handle is SHMEMEXT_E_CLOSED,
 * never a double free.  A short list: C extensions keep few handles. */
static int report(ShmemExt_Error *out, const shx_error *err, const char *name);

/* Made once, by whichever interpreter imports first. */
static _Atomic(PyThread_type_lock) open_handles_lock;
static shx_block **open_handles;
static size_t open_count, open_size;

static int remember_handle(shx_block *b)
{
    if (open_handles_lock == NULL) /* made at module import */
        return -1;
    PyThread_acquire_lock(open_handles_lock, WAIT_LOCK);
    int rc = 0;
    if (open_count == open_size) {
        size_t size = open_size ? 2 * open_size : 16;
        shx_block **grown = (shx_block **)realloc(open_handles, size * sizeof *grown);
        if (grown == NULL)
            rc = -1;
        else {
            open_handles = grown;
            open_size = size;
        }
    }
    if (rc == 0)
        open_handles[open_count++] = b;
    PyThread_release_lock(open_handles_lock);
    return rc;
}

/* Takes b out of the list; 0 when it was not there (closed already, or not open()'s). */
static int forget_handle(const ShmemExt_Block *handle)
{
    int found = 0;
    if (open_handles_lock == NULL)
        return 0;
    PyThread_acquire_lock(open_handles_lock, WAIT_LOCK);
    for (size_t i = 0; i < open_count; i++) {
        if ((const ShmemExt_Block *)open_handles[i] == handle) {
            open_handles[i] = open_handles[--open_count];
            found = 1;
            break;
        }
    }
    PyThread_release_lock(open_handles_lock);
    return found;
}

/* Fills the public error from a core one; returns its code. */
static int report(ShmemExt_Error *out, const shx_error *err, const char *name)
{
    char msg[256];
    shx_strerror(err, msg, sizeof msg);
    if (out != NULL) {
        out->code = err->status;
        out->os_error = err->os_error;
        if (snprintf(out->message, sizeof out->message, "block '%s': %s", name, msg) < 0)
            out->message[0] = '\0';
    }
    return err->status;
}

static int report_closed(ShmemExt_Error *perr, const char *name, const char *why)
{
    if (perr != NULL) {
        perr->code = SHMEMEXT_E_CLOSED;
        perr->os_error = 0;
        if (snprintf(perr->message, sizeof perr->message, "block '%s': %s", name, why) < 0)
            perr->message[0] = '\0';
    }
    return SHMEMEXT_E_CLOSED;
}

/* Waits a moment, letting Python threads run if the caller holds the GIL. */
static void pause_briefly(void *ctx)
{
    (void)ctx;
    if (PyGILState_Check()) {
        Py_BEGIN_ALLOW_THREADS
        shx_os_pause_briefly();
        Py_END_ALLOW_THREADS
    } else {
        shx_os_pause_briefly();
    }
}

/* Every call that uses a handle's mapping enters its guard (handle.h), so
 * that a close() from another thread (Python's, or this table's) waits for
 * it instead of unmapping under it.  A close() under way is waited for: a
 * refused one must not fail the call (but not from inside a call of this
 * thread on the block, which the close waits for).  0: closed, with *perr
 * filled. */
static int enter(ShmemExt_Block *handle, ShmemExt_Error *perr)
{
    shx_block *b = block_of(handle);
    if (b == NULL) {
        report_closed(perr, "?", "is no handle");
        return 0;
    }
    while (!shx_guard_enter(&b->guard)) {
        if (shx_guard_closed(&b->guard) || atomic_load(&b->guard.deferred) ||
            (b->owner != NULL && shx_py_own_calls(b->owner) > 0)) {
            report_closed(perr, b->name, "is closed");
            return 0;
        }
        if (!shx_guard_settle_inherited(&b->guard))
            pause_briefly(NULL);
    }
    if (b->attached)
        return 1;
    shx_guard_leave(&b->guard);
    report_closed(perr, b->name, "is closed");
    return 0;
}

static void leave(ShmemExt_Block *handle) { shx_guard_leave(&block_of(handle)->guard); }

/* Waits in slices, so that a close() of the handle from another thread ends
 * the wait instead of waiting for it. */
#define CAPI_SLICE_NS (50 * 1000 * 1000)

static int64_t slice_of(int64_t timeout_ns, uint64_t start)
{
    if (timeout_ns < 0)
        return CAPI_SLICE_NS;
    int64_t left = timeout_ns - (int64_t)(shx_os_monotonic_ns() - start);
    return left <= 0 ? 0 : left < CAPI_SLICE_NS ? left : CAPI_SLICE_NS;
}

static int capi_open(const char *name, int kind, uint64_t size, unsigned flags, unsigned mode, ShmemExt_Block **out,
                     int *created, ShmemExt_Error *perr)
{
    shx_error err;
    *out = NULL;
    if (kind != SHX_KIND_VALUE && kind != SHX_KIND_SEGMENT && kind != SHX_KIND_QUEUE) {
        shx_fail(&err, SHX_E_KIND, (uint64_t)kind, SHX_KIND_VALUE, NULL);
        return report(perr, &err, name);
    }
    if (mode > 0777) {
        shx_fail(&err, SHX_E_SIZE, mode, 0777, NULL);
        return report(perr, &err, name);
    }
    shx_block *b = (shx_block *)calloc(1, sizeof *b);
    if (b == NULL) {
        shx_fail(&err, SHX_E_OS, 0, 0, "out of memory");
        return report(perr, &err, name);
    }
    unsigned core_flags =
        (flags & (SHX_PERSIST | SHX_GLOBAL | SHX_EXISTING)) | ((mode & 077) == 0 ? SHX_PRIVATE_OWNER : 0);
    int rc = shx_block_open(b, name, (uint32_t)kind, size, core_flags, mode, &err);
    if (rc != SHX_OK) {
        free(b);
        return report(perr, &err, name);
    }
    b->heap_owned = 1;
    if (remember_handle(b) != 0) {
        (void)shx_block_close(b, 0, &err);
        free(b);
        shx_fail(&err, SHX_E_OS, 0, 0, "out of memory");
        return report(perr, &err, name);
    }
    if (created != NULL)
        *created = b->created;
    *out = (ShmemExt_Block *)b;
    return SHMEMEXT_OK;
}

static int capi_close(ShmemExt_Block *handle, ShmemExt_Error *perr)
{
    shx_block *b = block_of(handle);
    shx_error err;
    /* Taking it out of the list first makes this the only close() of it. */
    if (b == NULL || !forget_handle(handle)) {
        /* Closed already, or the default block or a Python object's block,
         * which belong to Python: nothing of it is touched. */
        shx_fail(&err, SHX_E_CLOSED, 0, 0, NULL);
        return report(perr, &err, "?");
    }
    static const shx_guard_waiter waiter = {pause_briefly, NULL};
    long pins = atomic_load(&b->guard.pins);
    if (pins == 0) {
        (void)shx_guard_close(&b->guard, 0, &waiter);
        pins = atomic_load(&b->guard.pins);
        if (pins > 0)
            shx_guard_close_end(&b->guard, 0);
    }
    if (pins > 0) {
        (void)remember_handle(b); /* room: it was in the list a moment ago */
        shx_fail(&err, SHX_E_BUSY, (uint64_t)pins, 0, NULL);
        return report(perr, &err, b->name);
    }
    int rc = shx_block_close(b, 0, &err);
    shx_guard_close_end(&b->guard, 1);
    if (rc != SHX_OK)
        report(perr, &err, b->name);
    free(b);
    return rc;
}

static int capi_set_bytes(ShmemExt_Block *handle, const void *data, size_t len, ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    int rc = shx_value_set(block_of(handle), SHX_TYPE_BYTES, data, len, NULL, &err);
    leave(handle);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_set_utf8(ShmemExt_Block *handle, const char *text, size_t len, ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    int rc = shx_value_set_utf8(block_of(handle), text, len, NULL, &err);
    leave(handle);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_get(ShmemExt_Block *handle, void *buf, size_t cap, size_t *len, int *is_text, uint64_t *version,
                    ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    size_t ignored;
    int rc = shx_value_get_utf8(block_of(handle), buf, cap, len ? len : &ignored, is_text, version, NULL, &err);
    leave(handle);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_queue_put(ShmemExt_Block *handle, const void *data, size_t len, int64_t timeout_ns,
                          ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    shx_iov iov = {data, len};
    int rc = shx_queue_put(block_of(handle), SHX_TYPE_BYTES, &iov, 1, timeout_ns, NULL, &err);
    leave(handle);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_queue_get(ShmemExt_Block *handle, void *buf, size_t cap, size_t *len, int *is_text, int *is_pickle,
                          int64_t timeout_ns, ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    size_t ignored;
    int rc = shx_queue_get_utf8(block_of(handle), buf, cap, len ? len : &ignored, is_text, is_pickle, timeout_ns, NULL,
                                &err);
    leave(handle);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static uint64_t capi_version(ShmemExt_Block *handle)
{
    if (!enter(handle, NULL))
        return 0;
    uint64_t version = shx_value_version(block_of(handle));
    leave(handle);
    return version;
}

static void *capi_data(ShmemExt_Block *handle, size_t *size)
{
    shx_block *b = block_of(handle);
    void *data = NULL;
    if (size != NULL)
        *size = 0;
    if (!enter(handle, NULL))
        return NULL;
    if (b->kind == SHX_KIND_SEGMENT) {
        data = b->data;
        if (size != NULL)
            *size = (size_t)b->capacity;
    }
    leave(handle);
    return data;
}

static int capi_lock(ShmemExt_Block *handle, int64_t timeout_ns, int *owner_died, ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_block *b = block_of(handle);
    shx_error err;
    int died = 0;
    uint64_t start = shx_os_monotonic_ns();
    int rc =
        shx_block_lock(b, timeout_ns < 0 || timeout_ns > CAPI_SLICE_NS ? CAPI_SLICE_NS : timeout_ns, &died, NULL, &err);
    for (;;) {
        if (rc == SHX_OK && shx_guard_closing(&b->guard)) {
            (void)shx_block_unlock(b, &err); /* won as a close() began: it goes on */
            rc = SHX_E_TIMEOUT;
        }
        if (rc == SHX_E_TIMEOUT && shx_guard_closing(&b->guard)) {
            leave(handle); /* out of its way; back in if it is given up */
            if (!enter(handle, perr))
                return SHMEMEXT_E_CLOSED;
        }
        int64_t wait = slice_of(timeout_ns, start);
        if (rc != SHX_E_TIMEOUT || wait == 0)
            break;
        rc = shx_block_lock(b, wait, &died, NULL, &err);
    }
    if (rc == SHX_OK)
        died = shx_block_take_owner_died(b); /* however many acquires gave it back untold */
    leave(handle);
    if (owner_died != NULL)
        *owner_died = died;
    return rc == SHX_OK ? rc : report(perr, &err, b->name);
}

static int capi_unlock(ShmemExt_Block *handle, ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    int rc = shx_block_unlock(block_of(handle), &err);
    leave(handle);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_wait(ShmemExt_Block *handle, uint64_t seen, int64_t timeout_ns, uint64_t *now, ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_block *b = block_of(handle);
    shx_error err;
    uint64_t ignored, start = shx_os_monotonic_ns();
    if (now == NULL)
        now = &ignored;
    int rc;
    for (;;) {
        rc = shx_value_wait(b, seen, slice_of(timeout_ns, start), now, &err);
        if (rc != SHX_E_TIMEOUT || slice_of(timeout_ns, start) == 0)
            break;
        if (shx_guard_closing(&b->guard)) {
            leave(handle); /* out of its way; back in if it is given up */
            if (!enter(handle, perr))
                return SHMEMEXT_E_CLOSED;
        }
    }
    leave(handle);
    return rc == SHX_OK ? rc : report(perr, &err, b->name);
}

/* A consumer's hold on a handle: close() of it (Python's or this table's) is
 * refused until the matching release(), and a Python object's handle keeps
 * its object alive meanwhile. */
static int capi_acquire(ShmemExt_Block *handle, ShmemExt_Error *perr)
{
    if (!enter(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_block *b = block_of(handle);
    if (b->owner != NULL)
        Py_INCREF((PyObject *)b->owner);
    atomic_fetch_add(&b->guard.pins, 1);
    leave(handle);
    return SHMEMEXT_OK;
}

static int capi_release(ShmemExt_Block *handle, ShmemExt_Error *perr)
{
    shx_block *b = block_of(handle);
    if (b == NULL)
        return report_closed(perr, "?", "is no handle");
    long pins = atomic_load(&b->guard.pins);
    do {
        if (pins <= 0)
            return report_closed(perr, b->name, "was not acquired: release() without acquire()");
    } while (!atomic_compare_exchange_weak(&b->guard.pins, &pins, pins - 1));
    if (b->owner != NULL)
        Py_DECREF((PyObject *)b->owner); /* last: it may free the handle */
    return SHMEMEXT_OK;
}

static const char *capi_name(ShmemExt_Block *handle) { return block_of(handle)->name; }

static int capi_created(ShmemExt_Block *handle) { return block_of(handle)->created; }

static ShmemExt_CAPI table = {
    SHMEMEXT_CAPI_LATEST,
    sizeof(ShmemExt_CAPI),
    capi_open,
    capi_close,
    shmemext_default_block,
    shmemext_block_from_object,
    capi_set_bytes,
    capi_set_utf8,
    capi_get,
    capi_version,
    capi_data,
    capi_lock,
    capi_unlock,
    capi_name,
    capi_created,
    capi_wait,
    capi_acquire,
    capi_release,
    capi_queue_put,
    capi_queue_get,
};

PyObject *shmemext_capi_capsule(void)
{
    if (atomic_load(&open_handles_lock) == NULL) {
        PyThread_type_lock fresh = PyThread_allocate_lock(), expected = NULL;
        if (fresh == NULL)
            return PyErr_NoMemory();
        if (!atomic_compare_exchange_strong(&open_handles_lock, &expected, fresh))
            PyThread_free_lock(fresh);
    }
    return PyCapsule_New(&table, SHMEMEXT_CAPSULE_NAME, NULL);
}
