/* The C API table (shmemext/include/shmemext.h) over the block core.
 * Everything here runs without the GIL except the two functions that
 * module.c provides, which look at Python objects. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdio.h>
#include <stdlib.h>

#include "capi.h"
#include "segment.h"

_Static_assert(SHMEMEXT_OK == SHX_OK && SHMEMEXT_E_OS == SHX_E_OS && SHMEMEXT_E_NAME == SHX_E_NAME &&
                   SHMEMEXT_E_SIZE == SHX_E_SIZE && SHMEMEXT_E_FOREIGN == SHX_E_FOREIGN &&
                   SHMEMEXT_E_NEWER == SHX_E_NEWER && SHMEMEXT_E_CORRUPT == SHX_E_CORRUPT &&
                   SHMEMEXT_E_KIND == SHX_E_KIND && SHMEMEXT_E_CAPACITY == SHX_E_CAPACITY &&
                   SHMEMEXT_E_TOOBIG == SHX_E_TOOBIG && SHMEMEXT_E_TIMEOUT == SHX_E_TIMEOUT &&
                   SHMEMEXT_E_NOTOWNER == SHX_E_NOTOWNER && SHMEMEXT_E_BADVALUE == SHX_E_BADVALUE &&
                   SHMEMEXT_E_CLOSED == SHX_E_CLOSED && SHMEMEXT_E_RANGE == SHX_E_RANGE &&
                   SHMEMEXT_E_BUFFER == SHX_E_BUFFER && SHMEMEXT_E_ENCODING == SHX_E_ENCODING &&
                   SHMEMEXT_E_INTERRUPTED == SHX_E_INTERRUPTED && SHMEMEXT_E_PERSIST == SHX_E_PERSIST,
               "public result codes match the core's");
_Static_assert(SHMEMEXT_VALUE == SHX_KIND_VALUE && SHMEMEXT_SEGMENT == SHX_KIND_SEGMENT, "kinds match");
_Static_assert(SHMEMEXT_PERSIST == SHX_PERSIST && SHMEMEXT_GLOBAL == SHX_GLOBAL, "flags match");

static shx_block *block_of(ShmemExt_Block *handle) { return (shx_block *)handle; }

/* The handles open() made and close() has not freed yet.  close() frees only
 * what it finds here, so a second close() of a handle is SHMEMEXT_E_CLOSED,
 * never a double free.  A short list: C extensions keep few handles. */
static int report(ShmemExt_Error *out, const shx_error *err, const char *name);

static PyThread_type_lock open_handles_lock;
static shx_block **open_handles;
static size_t open_count, open_size;

static int remember_handle(shx_block *b)
{
    if (open_handles_lock == NULL)   /* first made under the GIL, at module import */
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

/* A handle whose block was closed (by close() of a Python object, or at exit). */
static int closed(ShmemExt_Block *handle, ShmemExt_Error *perr)
{
    shx_block *b = block_of(handle);
    if (b != NULL && b->attached)
        return 0;
    shx_error err;
    shx_fail(&err, SHX_E_CLOSED, 0, 0, NULL);
    report(perr, &err, b ? b->name : "?");
    return 1;
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

static int capi_open(const char *name, int kind, uint64_t size, unsigned flags, unsigned mode, ShmemExt_Block **out,
                     int *created, ShmemExt_Error *perr)
{
    shx_error err;
    *out = NULL;
    if (kind != SHX_KIND_VALUE && kind != SHX_KIND_SEGMENT) {
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
    unsigned core_flags = (flags & (SHX_PERSIST | SHX_GLOBAL)) | ((mode & 077) == 0 ? SHX_PRIVATE_OWNER : 0);
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
    if (b == NULL || !forget_handle(handle)) {
        /* Closed already, or the default block or a Python object's block,
         * which belong to Python: nothing of it is touched. */
        shx_fail(&err, SHX_E_CLOSED, 0, 0, NULL);
        return report(perr, &err, "?");
    }
    int rc = shx_block_close(b, 0, &err);
    if (rc != SHX_OK)
        report(perr, &err, b->name);
    free(b);
    return rc;
}

static int capi_set_bytes(ShmemExt_Block *handle, const void *data, size_t len, ShmemExt_Error *perr)
{
    if (closed(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    int rc = shx_value_set(block_of(handle), SHX_TYPE_BYTES, data, len, NULL, &err);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_set_utf8(ShmemExt_Block *handle, const char *text, size_t len, ShmemExt_Error *perr)
{
    if (closed(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    int rc = shx_value_set_utf8(block_of(handle), text, len, NULL, &err);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_get(ShmemExt_Block *handle, void *buf, size_t cap, size_t *len, int *is_text, uint64_t *version,
                    ShmemExt_Error *perr)
{
    if (closed(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    size_t ignored;
    int rc = shx_value_get_utf8(block_of(handle), buf, cap, len ? len : &ignored, is_text, version, NULL, &err);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static uint64_t capi_version(ShmemExt_Block *handle)
{
    return closed(handle, NULL) ? 0 : shx_value_version(block_of(handle));
}

static void *capi_data(ShmemExt_Block *handle, size_t *size)
{
    shx_block *b = block_of(handle);
    if (b->kind != SHX_KIND_SEGMENT || !b->attached) {
        if (size != NULL)
            *size = 0;
        return NULL;
    }
    if (size != NULL)
        *size = (size_t)b->capacity;
    return b->data;
}

static int capi_lock(ShmemExt_Block *handle, int64_t timeout_ns, int *owner_died, ShmemExt_Error *perr)
{
    if (closed(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    int died = 0;
    int rc = shx_block_lock(block_of(handle), timeout_ns, &died, NULL, &err);
    if (owner_died != NULL)
        *owner_died = died;
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_unlock(ShmemExt_Block *handle, ShmemExt_Error *perr)
{
    if (closed(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    int rc = shx_block_unlock(block_of(handle), &err);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static int capi_wait(ShmemExt_Block *handle, uint64_t seen, int64_t timeout_ns, uint64_t *now, ShmemExt_Error *perr)
{
    if (closed(handle, perr))
        return SHMEMEXT_E_CLOSED;
    shx_error err;
    uint64_t ignored;
    int rc = shx_value_wait(block_of(handle), seen, timeout_ns, now ? now : &ignored, &err);
    return rc == SHX_OK ? rc : report(perr, &err, block_of(handle)->name);
}

static const char *capi_name(ShmemExt_Block *handle) { return block_of(handle)->name; }

static int capi_created(ShmemExt_Block *handle) { return block_of(handle)->created; }

static ShmemExt_CAPI table = {
    SHMEMEXT_CAPI_VERSION,
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
};

PyObject *shmemext_capi_capsule(void)
{
    if (open_handles_lock == NULL && (open_handles_lock = PyThread_allocate_lock()) == NULL)
        return PyErr_NoMemory();
    return PyCapsule_New(&table, SHMEMEXT_CAPSULE_NAME, NULL);
}
