/* shmemext.Value: a named value cell (str or bytes, never read torn). */
#include "glue.h"

void *shx_py_prepare_dst(void *ctx, uint32_t type, size_t nbytes)
{
    /* No Python code runs here: str, bytes and bytearray are not tracked by
     * the cycle collector, so making one never starts a collection (and
     * finalizers). */
    shx_py_dst *d = (shx_py_dst *)ctx;
    if (d->failed) { /* the size asked for last was torn: its MemoryError goes */
        PyErr_Clear();
        d->failed = 0;
    }
    Py_CLEAR(d->obj);
    Py_UCS4 maxchar;
    size_t unit;
    switch (type) {
    case SHX_TYPE_EMPTY:
        maxchar = 0;
        unit = 1;
        break;
    case SHX_TYPE_ASCII:
        maxchar = 0x7F;
        unit = 1;
        break;
    case SHX_TYPE_LATIN1:
        maxchar = 0xFF;
        unit = 1;
        break;
    case SHX_TYPE_UCS2:
        maxchar = 0xFFFF;
        unit = 2;
        break;
    case SHX_TYPE_UCS4:
        maxchar = 0x10FFFF;
        unit = 4;
        break;
    default:
        maxchar = 0;
        unit = 0;
        break;
    }
    void *out;
    if (type == SHX_TYPE_PICKLE_FRAMED) {
        /* Writable, for the out-of-band buffers unpickled as views of it. */
        d->obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
        out = d->obj ? PyByteArray_AS_STRING(d->obj) : NULL;
    } else if (unit == 0 || nbytes % unit != 0) {
        /* Bytes, or text whose length is no whole number of units (refused after the copy). */
        d->obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
        out = d->obj ? PyBytes_AS_STRING(d->obj) : NULL;
    } else {
        d->obj = PyUnicode_New((Py_ssize_t)(nbytes / unit), maxchar);
        out = d->obj ? PyUnicode_DATA(d->obj) : NULL;
    }
    d->failed = out == NULL;
    return out;
}

PyObject *shx_py_value_get(BlockObject *self)
{
    shx_py_dst dst = {NULL, 0};
    shx_py_release release;
    shx_error err;
    uint32_t type;
    size_t nbytes;
    int rc;
    do {
        if (shx_py_enter(self) < 0) {
            Py_XDECREF(dst.obj);
            return NULL;
        }
        shx_hooks hooks = SHX_PY_HOOKS(release, self);
        rc = shx_value_get(&self->block, shx_py_prepare_dst, &dst, &hooks, &type, &nbytes, NULL, &err);
        shx_py_leave(self);
    } while (SHX_PY_RETRY(rc, release));
    if (rc != SHX_OK) {
        Py_XDECREF(dst.obj);
        if (PyErr_Occurred())
            return NULL;
        return shx_py_raise_block(self, &err);
    }
    return dst.obj;
}

/* Both sets, inlined into each so that a plain set() keeps no trace of the
 * condition. */
static inline int set_from(BlockObject *self, PyObject *value, uint64_t expect, uint64_t *written)
{
    Py_buffer view;
    const void *data;
    size_t nbytes;
    uint32_t type;
    int have_view = 0;
    if (PyUnicode_Check(value)) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(value) < 0)
            return -1;
#endif
        int kind = PyUnicode_KIND(value);
        type = PyUnicode_IS_ASCII(value)      ? SHX_TYPE_ASCII
               : kind == PyUnicode_1BYTE_KIND ? SHX_TYPE_LATIN1
               : kind == PyUnicode_2BYTE_KIND ? SHX_TYPE_UCS2
                                              : SHX_TYPE_UCS4;
        data = PyUnicode_DATA(value);
        nbytes = (size_t)PyUnicode_GET_LENGTH(value) * (size_t)kind;
    } else if (PyBytes_CheckExact(value)) {
        /* The common case, without the buffer protocol's bookkeeping. */
        type = SHX_TYPE_BYTES;
        data = PyBytes_AS_STRING(value);
        nbytes = (size_t)PyBytes_GET_SIZE(value);
    } else if (PyObject_CheckBuffer(value)) {
        /* Before entering: an exporter may run Python code. */
        if (PyObject_GetBuffer(value, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "set() needs a contiguous bytes-like object; this %.100s is not contiguous",
                         Py_TYPE(value)->tp_name);
            return -1;
        }
        have_view = 1;
        type = SHX_TYPE_BYTES;
        data = view.buf;
        nbytes = (size_t)view.len;
    } else {
        PyErr_Format(PyExc_TypeError, "set() argument must be str or a bytes-like object, not %.100s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    shx_py_release release;
    shx_error err;
    int rc;
    do {
        if (shx_py_enter(self) < 0) {
            if (have_view)
                PyBuffer_Release(&view);
            return -1;
        }
        shx_hooks hooks = SHX_PY_HOOKS(release, self);
        rc = expect == SHX_ANY_VERSION
                 ? shx_value_set(&self->block, type, data, nbytes, &hooks, &err)
                 : shx_value_set_if(&self->block, type, data, nbytes, expect, written, &hooks, &err);
        shx_py_leave(self);
    } while (SHX_PY_RETRY(rc, release));
    if (have_view)
        PyBuffer_Release(&view);
    if (rc == SHX_E_MOVED)
        return 1;
    if (rc != SHX_OK) {
        shx_py_raise_block(self, &err);
        return -1;
    }
    return 0;
}

int shx_py_value_set(BlockObject *self, PyObject *value) { return set_from(self, value, SHX_ANY_VERSION, NULL); }

int shx_py_value_set_if(BlockObject *self, PyObject *value, uint64_t expect, uint64_t *written)
{
    return set_from(self, value, expect, written);
}

static PyObject *value_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static const char *const names[] = {"name", "capacity", "persist", "mode", "scope", "security", "create"};
    static const shx_py_sig sig = {"Value", names, 7, 1, 2};
    PyObject *v[7];
    int persist = 0, mode = 0600, create = 1;
    const char *scope = NULL, *security = NULL;
    uint64_t capacity;
    if (shx_py_parse_tuple(&sig, args, kwds, v) < 0)
        return NULL;
    const char *name = shx_py_name_arg(v[0], "name");
    if (name == NULL || shx_py_size_arg(v[1], "capacity", 1, &capacity) < 0 || shx_py_bool_arg(v[2], &persist) < 0 ||
        shx_py_mode_arg(v[3], &mode) < 0 || shx_py_opt_str_arg(v[4], "scope", &scope) < 0 ||
        shx_py_opt_str_arg(v[5], "security", &security) < 0 || shx_py_bool_arg(v[6], &create) < 0)
        return NULL;
    return shx_py_block_new(type, name, SHX_KIND_VALUE, capacity, shx_py_open_flags(persist, create), mode, 0, scope,
                            security);
}

static PyObject *value_get(BlockObject *self, PyObject *Py_UNUSED(ignored)) { return shx_py_value_get(self); }

static PyObject *value_set(BlockObject *self, PyObject *value)
{
    if (shx_py_value_set(self, value) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _set_if(value, version): set() only while `version` is the committed
 * one; the version written, or None when another set() came first. */
static PyObject *value_set_if(BlockObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2)
        return PyErr_Format(PyExc_TypeError, "_set_if() takes 2 arguments (%zd given)", nargs);
    unsigned long long expect = PyLong_AsUnsignedLongLong(args[1]);
    if (expect == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (expect == SHX_ANY_VERSION)
        return PyErr_Format(PyExc_ValueError, "_set_if(): version %llu is out of range", expect);
    uint64_t written = 0;
    int rc = shx_py_value_set_if(self, args[0], expect, &written);
    if (rc < 0)
        return NULL;
    if (rc > 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(written);
}

static PyObject *value_repr(BlockObject *self)
{
    if (shx_py_enter_quietly(self)) {
        unsigned long long version = (unsigned long long)shx_value_version(&self->block);
        int persist = shx_block_is_persistent(&self->block);
        shx_py_leave(self);
        return PyUnicode_FromFormat("<shmemext.Value name='%s' capacity=%llu version=%llu%s>", self->block.name,
                                    (unsigned long long)self->block.capacity, version, persist ? " persist" : "");
    }
    return PyUnicode_FromFormat("<shmemext.Value name='%s' closed>", self->block.name);
}

static PyObject *value_get_version(BlockObject *self, void *Py_UNUSED(c))
{
    if (shx_py_enter(self) < 0)
        return NULL;
    uint64_t version = shx_value_version(&self->block);
    shx_py_leave(self);
    return PyLong_FromUnsignedLongLong(version);
}

/* A diagnostic: how many waiters the block's header counts (every process's). */
static PyObject *value_get_waiters(BlockObject *self, void *Py_UNUSED(c))
{
    if (shx_py_enter(self) < 0)
        return NULL;
    uint32_t waiters = shx_value_waiters(&self->block);
    shx_py_leave(self);
    return PyLong_FromUnsignedLong(waiters);
}

static int version_arg(PyObject *arg, uint64_t *out)
{
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "wait() argument 'version' must be an int or None, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(arg);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "version %R is out of range: versions are 0 to 2**64-1", arg);
        }
        return -1;
    }
    return 0;
}

/* Waits until the version differs from `seen` (or `timeout` seconds, < 0:
 * forever) with the GIL released, in slices so that Ctrl-C and close() are
 * seen. */
PyObject *shx_py_value_wait(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"version", "timeout"};
    static const shx_py_sig sig = {"wait", names, 2, 0, 2};
    PyObject *v[2];
    uint64_t seen = 0;
    double timeout = -1;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 ||
        (v[0] != NULL && v[0] != Py_None && version_arg(v[0], &seen) < 0) ||
        (v[1] != NULL && shx_py_timeout_arg("wait", v[1], &timeout) < 0))
        return NULL;
    if (shx_py_enter(self) < 0)
        return NULL;
    if (v[0] == NULL || v[0] == Py_None)
        seen = shx_value_version(&self->block);
    uint64_t start = shx_os_monotonic_ns(), now = seen;
    shx_error err;
    int rc;
    for (;;) {
        /* A passed deadline still looks once (a wait of 0), so timeout=0 is a poll. */
        int64_t wait = shx_py_next_slice(timeout, start);
        Py_BEGIN_ALLOW_THREADS
        rc = shx_value_wait(&self->block, seen, wait, &now, &err);
        Py_END_ALLOW_THREADS
        if (rc != SHX_E_TIMEOUT || shx_py_next_slice(timeout, start) == 0 || shx_py_check_signals(self) < 0)
            break;
        if (shx_guard_closing(&self->block.guard)) {
            /* Out of the close()'s way; back in if it was given up. */
            shx_py_leave(self);
            if (shx_py_enter(self) < 0)
                return NULL;
        }
    }
    shx_py_leave(self);
    if (PyErr_Occurred())
        return NULL;
    if (rc == SHX_OK)
        return PyLong_FromUnsignedLongLong(now);
    if (rc != SHX_E_TIMEOUT)
        return shx_py_raise_block(self, &err);
    char secs[32];
    snprintf(secs, sizeof secs, "%g", timeout);
    return PyErr_Format(PyExc_TimeoutError,
                        "timed out after %s s waiting for a new value in Value '%s' "
                        "(still version %llu)",
                        secs, self->block.name, (unsigned long long)now);
}

static PyObject *value_wait(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return shx_py_value_wait(self, args, nargs, kwnames);
}

/* wait_async() and changes() are Python (shmemext/_aio.py). */

static PyObject *value_wait_async(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return shx_py_call_aio("wait_async", self, args, nargs, kwnames);
}

static PyObject *value_changes(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return shx_py_call_aio("changes", self, args, nargs, kwnames);
}

static PyObject *value_read_stats(BlockObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KK)", (unsigned long long)atomic_load(&self->block.read_retries),
                         (unsigned long long)atomic_load(&self->block.locked_reads));
}

static PyMethodDef value_methods[] = {
    {"get", (PyCFunction)value_get, METH_NOARGS,
     "get($self, /)\n--\n\nReturn the committed value: str or bytes, as it was set. A never-written block gives ''."},
    {"_set_if", (PyCFunction)(void (*)(void))value_set_if, METH_FASTCALL,
     PyDoc_STR("_set_if($self, value, version, /)\n--\n\nset() only while version is the committed one: the version "
               "written, or None when another set() came first (for a bridge).")},
    {"set", (PyCFunction)value_set, METH_O,
     "set($self, value, /)\n--\n\nCommit value (str or a contiguous bytes-like object) for every process to see."},
    {"wait", (PyCFunction)(void (*)(void))value_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait($self, /, version=None, timeout=None)\n--\n\nBlock until the committed version differs from `version`\n"
     "(default: the version now) and return the new version. TimeoutError after `timeout` seconds.\n"
     "The OS wakes every waiter in every process at the next set(); nothing spins."},
    {"wait_async", (PyCFunction)(void (*)(void))value_wait_async, METH_FASTCALL | METH_KEYWORDS,
     "wait_async($self, /, version=None, timeout=None)\n--\n\nwait() for asyncio: `await v.wait_async()` returns the\n"
     "new version; TimeoutError after `timeout` seconds.  Cancelling the task leaves nothing waiting;\n"
     "close() ends it with ClosedError.  One watcher thread sleeps on many Values for all tasks."},
    {"changes", (PyCFunction)(void (*)(void))value_changes, METH_FASTCALL | METH_KEYWORDS,
     "changes($self, /, version=None)\n--\n\nAn async iterator of new versions: `async for version in v.changes()`.\n"
     "Versions it was too slow to see are skipped, as wait() skips them."},
    {"_read_stats", (PyCFunction)value_read_stats, METH_NOARGS,
     "_read_stats($self, /)\n--\n\n(retries, locked_reads) of this handle's gets so far: copies repeated because\n"
     "a writer overtook them, and gets that fell back to the writer lock."},
    SHX_PY_BLOCK_METHODS,
    {NULL, NULL, 0, NULL}};

static PyGetSetDef value_getset[] = {
    SHX_PY_BLOCK_GETSET,
    {"capacity", (getter)shx_py_block_get_size, NULL, "The largest value in bytes (str: characters x their width).",
     NULL},
    {"version", (getter)value_get_version, NULL, "How many values have been committed to the block.", NULL},
    {"_waiters", (getter)value_get_waiters, NULL, "Waiters the block counts now, in every process (a diagnostic).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(
    value_doc,
    "Value(name, capacity=None, *, persist=False, mode=0o600, scope='session', security=None, create=True)\n--\n\n"
    "A named value cell shared between processes.\n\n"
    "The first process to open `name` creates it zero-filled with `capacity` bytes\n"
    "(4096 when None); later ones take the existing block's capacity.  The block\n"
    "lives while any process has it open, unless persist=True.  create=False\n"
    "opens only a block that exists, and raises FileNotFoundError otherwise.\n\n"
    "scope='global' names it for every session on Windows (Global\\, which needs\n"
    "SeCreateGlobalPrivilege); POSIX names are machine-wide either way.  security\n"
    "is a Windows SDDL descriptor for a new block, in place of the per-user one.");

static PyType_Slot value_slots[] = {{Py_tp_new, value_new},
                                    {Py_tp_dealloc, shx_py_block_dealloc},
                                    {Py_tp_traverse, shx_py_block_traverse},
                                    {Py_tp_repr, value_repr},
                                    {Py_tp_methods, value_methods},
                                    {Py_tp_getset, value_getset},
                                    {Py_tp_doc, (void *)value_doc},
                                    {0, NULL}};

PyType_Spec shx_py_value_spec = {
    .name = "shmemext.Value",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = value_slots,
};
