/* Errors: recording one, and saying it in words (platform.h, segment.h). */
#include "segment.h"

#include <stdio.h>
#include <string.h>

int shx_fail(shx_error *err, int status, uint64_t a, uint64_t b, const char *detail)
{
    err->status = status;
    err->os_error = 0;
    err->win32 = 0;
    err->op = NULL;
    err->detail = detail;
    err->a = a;
    err->b = b;
    return status;
}

static const char *kind_name(uint64_t kind)
{
    return kind == SHX_KIND_VALUE     ? "a value cell"
           : kind == SHX_KIND_SEGMENT ? "a raw segment"
           : kind == SHX_KIND_QUEUE   ? "a queue"
                                      : "unknown";
}

void shx_strerror(const shx_error *err, char *buf, size_t size)
{
    unsigned long long a = err->a, b = err->b;
    switch (err->status) {
    case SHX_OK: snprintf(buf, size, "no error"); break;
    case SHX_E_OS:
        if (err->op != NULL && err->win32)
            snprintf(buf, size, "%s failed: Windows error %d", err->op, err->os_error);
        else if (err->op != NULL && err->detail != NULL && err->a != 0)
            snprintf(buf, size, "%s of %llu bytes failed: %s: %s", err->op, a, strerror(err->os_error), err->detail);
        else if (err->op != NULL && err->detail != NULL)
            snprintf(buf, size, "%s", err->detail);
        else if (err->op != NULL && err->a != 0)
            snprintf(buf, size, "%s of %llu bytes failed: %s", err->op, a, strerror(err->os_error));
        else if (err->op != NULL)
            snprintf(buf, size, "%s failed: %s", err->op, strerror(err->os_error));
        else
            snprintf(buf, size, "%s", err->detail ? err->detail : "system error");
        break;
    case SHX_E_NAME:
        snprintf(buf, size, "it %s; names are 1 to %llu characters from [A-Za-z0-9_.-], not starting with '.' or '-'",
                 err->detail, b);
        break;
    case SHX_E_SIZE: snprintf(buf, size, "size %llu is out of range: it must be between 1 and %llu bytes", a, b); break;
    case SHX_E_FOREIGN: snprintf(buf, size, "exists but is not a shmemext block (it %s)", err->detail); break;
    case SHX_E_NEWER:
        snprintf(buf, size, "was made by a newer shmemext (block layout %llu; this one reads layout %llu)", a, b);
        break;
    case SHX_E_CORRUPT: snprintf(buf, size, "has a corrupt header: it %s", err->detail); break;
    case SHX_E_KIND: snprintf(buf, size, "is %s, not %s", kind_name(a), kind_name(b)); break;
    case SHX_E_CAPACITY:
        snprintf(buf, size, "exists with a capacity of %llu bytes, less than the %llu bytes asked for", b, a);
        break;
    case SHX_E_TOOBIG: snprintf(buf, size, "value of %llu bytes does not fit the capacity of %llu bytes", a, b); break;
    case SHX_E_TIMEOUT:
        if (err->detail != NULL)
            snprintf(buf, size, "timed out after %.3g s: %s", (double)a / 1e9, err->detail);
        else
            snprintf(buf, size, "timed out");
        break;
    case SHX_E_NOTOWNER:
        snprintf(buf, size,
                 "is a private block owned by another user (uid %llu, you are %llu); "
                 "blocks meant to be shared across users need an explicit mode",
                 a, b);
        break;
    case SHX_E_BADVALUE: snprintf(buf, size, "holds a corrupt value: it %s", err->detail); break;
    case SHX_E_CLOSED: snprintf(buf, size, "is closed"); break;
    case SHX_E_PERSIST:
        snprintf(buf, size,
                 "is already open without persist=True, and the kernel frees it with its last holder: "
                 "that cannot be undone while it is held; open it with persist=True before anyone else, "
                 "or keep it alive with `python -m shmemext hold`");
        break;
    case SHX_E_INUSE: snprintf(buf, size, "handle is still attached to a block"); break;
    case SHX_E_BUSY: snprintf(buf, size, "cannot be closed: %llu acquire() of the C API not yet released", a); break;
    case SHX_E_NOTFOUND:
        snprintf(buf, size, "does not exist: no process holds a block of that name, and none persists");
        break;
    case SHX_E_BUFFER: snprintf(buf, size, "value of %llu bytes does not fit the buffer of %llu bytes", a, b); break;
    case SHX_E_ENCODING: snprintf(buf, size, "text %s (at %llu)", err->detail, a); break;
    case SHX_E_INTERRUPTED: snprintf(buf, size, "wait for the writer lock interrupted"); break;
    case SHX_E_RANGE: snprintf(buf, size, "range ends at byte %llu, beyond the size of %llu bytes", a, b); break;
    case SHX_E_EMPTY: snprintf(buf, size, "has no message"); break;
    case SHX_E_FULL: snprintf(buf, size, "has no room for a record of %llu bytes (capacity %llu bytes)", a, b); break;
    case SHX_E_MOVED: snprintf(buf, size, "moved on to %llu from the expected %llu", a, b); break;
    default: snprintf(buf, size, "unknown error %d", err->status);
    }
}
