/* shmemext._shmemext: the CPython glue over the block core.
 *
 * Parses arguments, calls the core (with the GIL released for lock waits and
 * large copies), and turns core errors into exceptions.  Importing the module
 * maps the default block, like a DLL that maps its shared section in
 * DLL_PROCESS_ATTACH; freeing the module, or process exit, detaches it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdlib.h>
#include <limits.h>
#include <string.h>
#ifndef _WIN32
#include <unistd.h>
#endif

#include "capi.h"
#include "segment.h"

#ifndef SHMEMEXT_VERSION
#error "setup.py defines SHMEMEXT_VERSION"
#endif

/* Copies at least this large run with the GIL released. */
#define LARGE_COPY (64 * 1024)

typedef struct {
    PyTypeObject *value_type;
    PyTypeObject *segment_type;
    PyTypeObject *lock_type;
    PyObject *default_value;   /* a Value, or NULL when disabled */
    /* shmemext.Error (a ValueError) and its subclasses. */
    PyObject *error;
    PyObject *foreign_error;   /* the name holds something this shmemext cannot read */
    PyObject *corrupt_error;   /* a block of ours whose header or value is not well formed */
    PyObject *closed_error;    /* the handle was closed */
} module_state;

/* A Value or a Segment: one attachment, with what must be settled before it
 * may be detached. */
typedef struct {
    PyObject_HEAD
    shx_block block;
    int busy;              /* calls in progress that may run without the GIL */
#define CALL_THREADS 16
    unsigned long call_threads[CALL_THREADS];   /* the threads in them (the first CALL_THREADS) */
    int closing;           /* close() waits for those calls: refuse new ones, end waits */
    int close_deferred;    /* close() came from a call of this thread's (a signal handler): the last call detaches */
    Py_ssize_t exports;    /* buffers exported (Segment) */
    /* Whether a thread of this process holds the segment's lock through a
     * SegmentLock (at most one can: it is a mutex), which thread, and the
     * lock object (for identity only: it may be gone while the thread holds on). */
    int lock_held;
    unsigned long lock_thread;
    void *lock_holder;
    int readonly;
} BlockObject;

typedef struct {
    PyObject_HEAD
    BlockObject *segment;
    double timeout;        /* seconds; < 0: wait forever */
    int owner_died;
} LockObject;

static inline module_state *get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

static inline module_state *state_of(PyObject *obj)
{
    return get_state(PyType_GetModule(Py_TYPE(obj)));
}

/* ---- errors -------------------------------------------------------------- */

static PyObject *raise_os_error(PyObject *type, int code, const char *msg, const char *name)
{
    /* OSError(errno, text, filename) picks the subclass for the errno. */
    PyObject *exc = PyObject_CallFunction(type, "iss", code, msg, name);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* Raises the exception for a core error about block `name`; returns NULL.
 * st gives shmemext.Error and its subclasses (NULL: plain ValueError). */
static PyObject *raise_error_in(module_state *st, const shx_error *err, const char *name)
{
    char msg[512];
    shx_strerror(err, msg, sizeof msg);
    switch (err->status) {
    case SHX_E_OS:
        if (err->op == NULL)
            return PyErr_NoMemory();
#ifdef _WIN32
        if (err->win32) {
            /* OSError with winerror set, and the errno (so the subclass) Python maps it to. */
            PyObject *filename = PyUnicode_FromString(name);
            if (filename == NULL)
                return NULL;
            if (err->detail == NULL) {
                PyErr_SetExcFromWindowsErrWithFilenameObject(PyExc_OSError, err->os_error, filename);
            } else {
                PyObject *exc = PyObject_CallFunction(PyExc_OSError, "isOi", 0, err->detail, filename, err->os_error);
                if (exc != NULL) {
                    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                    Py_DECREF(exc);
                }
            }
            Py_DECREF(filename);
            return NULL;
        }
#endif
        return raise_os_error(PyExc_OSError, err->os_error, msg, name);
    case SHX_E_NOTOWNER:
        return raise_os_error(PyExc_PermissionError, EACCES, msg, name);
    case SHX_E_NAME:
        return PyErr_Format(st ? st->error : PyExc_ValueError, "invalid block name '%s': %s", name, msg);
    case SHX_E_TIMEOUT:
        return PyErr_Format(PyExc_TimeoutError, "block '%s': %s", name, msg);
    case SHX_E_INTERRUPTED:
        if (PyErr_Occurred())   /* the signal handler's exception */
            return NULL;
        return PyErr_Format(PyExc_InterruptedError, "block '%s': %s", name, msg);
    case SHX_E_FOREIGN:
    case SHX_E_NEWER:
        return PyErr_Format(st ? st->foreign_error : PyExc_ValueError, "block '%s': %s", name, msg);
    case SHX_E_CORRUPT:
    case SHX_E_BADVALUE:
        return PyErr_Format(st ? st->corrupt_error : PyExc_ValueError, "block '%s': %s", name, msg);
    case SHX_E_CLOSED:
        return PyErr_Format(st ? st->closed_error : PyExc_ValueError, "block '%s': %s", name, msg);
    default:
        return PyErr_Format(st ? st->error : PyExc_ValueError, "block '%s': %s", name, msg);
    }
}

static module_state *state_of_type(PyTypeObject *type) { return (module_state *)PyType_GetModuleState(type); }

/* The same, for a block object's own block. */
#define raise_block_error(err, name) raise_error_in(state_of_type(Py_TYPE(self)), (err), (name))

/* ---- GIL hooks -------------------------------------------------------------- */

typedef struct {
    PyThreadState *saved;
    BlockObject *block;
} gil_release;

static void gil_begin(void *ctx) { ((gil_release *)ctx)->saved = PyEval_SaveThread(); }
static void gil_end(void *ctx) { PyEval_RestoreThread(((gil_release *)ctx)->saved); }

static int block_check_open(BlockObject *self);
static void finish_close(BlockObject *self);
static int detach(BlockObject *self, shx_error *err);

/* Around every call that may run without the GIL (copies, waits): close()
 * lets those finish before it detaches.  The threads in them are noted, so
 * that a close() from a signal handler that interrupted one of this thread's
 * calls does not wait for it (it never ends while the handler runs). */
static void call_begin(BlockObject *self)
{
    if (self->busy < CALL_THREADS)
        self->call_threads[self->busy] = PyThread_get_thread_ident();
    self->busy++;
}

static void call_end(BlockObject *self)
{
    unsigned long me = PyThread_get_thread_ident();
    int n = self->busy < CALL_THREADS ? self->busy : CALL_THREADS;
    for (int i = n - 1; i >= 0; i--) {
        if (self->call_threads[i] == me) {
            self->call_threads[i] = self->call_threads[n - 1];
            break;
        }
    }
    if (--self->busy == 0 && self->close_deferred)
        finish_close(self);
}

static int in_call_here(const BlockObject *self)
{
    unsigned long me = PyThread_get_thread_ident();
    int n = self->busy < CALL_THREADS ? self->busy : CALL_THREADS;
    for (int i = 0; i < n; i++) {
        if (self->call_threads[i] == me)
            return 1;
    }
    return 0;
}

/* Between lock-wait slices, with the GIL held: a pending KeyboardInterrupt
 * (or any exception a signal handler raises), or a close() from another
 * thread, ends the wait. */
static int wait_interrupted(void *ctx)
{
    return PyErr_CheckSignals() < 0 || block_check_open(((gil_release *)ctx)->block) < 0;
}

/* The same for an open, whose block is not attached yet: signals only. */
static int signal_pending(void *ctx)
{
    (void)ctx;
    return PyErr_CheckSignals() < 0;
}

#define GIL_HOOKS(release, self) \
    {gil_begin, gil_end, ((release).block = (self), &(release)), LARGE_COPY, wait_interrupted}

/* ---- argument helpers ---------------------------------------------------- */

/* The UTF-8 of a block name argument, or NULL with TypeError/ValueError. */
static const char *name_arg(PyObject *arg, const char *what)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", what, Py_TYPE(arg)->tp_name);
        return NULL;
    }
    Py_ssize_t len;
    const char *name = PyUnicode_AsUTF8AndSize(arg, &len);
    if (name == NULL)
        return NULL;
    shx_error err;
    if (shx_name_check(name, (size_t)len, &err) != SHX_OK) {
        char msg[256];
        shx_strerror(&err, msg, sizeof msg);
        PyErr_Format(PyExc_ValueError, "invalid block name %R: %s", arg, msg);
        return NULL;
    }
    return name;
}

/* A size argument named `what`: None -> 0 when allowed, else 1..SHX_MAX_CAPACITY. */
static int size_arg(PyObject *arg, const char *what, int none_ok, uint64_t *out)
{
    if ((arg == NULL || arg == Py_None) && none_ok) {
        *out = 0;
        return 0;
    }
    if (arg == NULL || !PyLong_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be int%s, not %.100s", what, none_ok ? " or None" : "",
                     arg ? Py_TYPE(arg)->tp_name : "nothing");
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || v < 1 || (unsigned long long)v > SHX_MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "%s %R is out of range: it must be between 1 and %llu bytes", what, arg,
                     (unsigned long long)SHX_MAX_CAPACITY);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* PyArg "O&" converter for mode=: an int (its range is checked by mode_arg). */
static int mode_converter(PyObject *obj, void *out)
{
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument 'mode' must be an int of permission bits such as 0o600, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    int overflow;
    long v = PyLong_AsLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return 0;
    /* Out of range is mode_arg's to say, naming the value when an int holds it. */
    *(int *)out = overflow != 0 || v > INT_MAX ? INT_MAX : v < INT_MIN ? INT_MIN : (int)v;
    return 1;
}

static int mode_arg(int mode)
{
    if (mode < 0 || mode > 0777) {
        char text[32];
        snprintf(text, sizeof text, mode < 0 ? "%d" : "0o%o", mode);
        PyErr_Format(PyExc_ValueError, "mode %s is out of range: it must be between 0 and 0o777", text);
        return -1;
    }
    return 0;
}

/* Parses an optional `timeout` (None or seconds >= 0; None -> -1) from a
 * fastcall; leaves *timeout alone when it is not given. */
/* The one argument parser of every METH_FASTCALL method: up to `n` arguments
 * named names[], the first `required` of them required, by position or by
 * keyword, into vals[] (NULL when absent).  Keywords are compared as objects,
 * so a name that UTF-8 cannot carry is an error message, never a crash. */
static int parse_fastcall(const char *fname, const char *const names[], int n, int required, PyObject *const *args,
                          Py_ssize_t nargs, PyObject *kwnames, PyObject *vals[])
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (int i = 0; i < n; i++)
        vals[i] = i < nargs ? args[i] : NULL;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d argument%s (%zd given)", fname, n, n == 1 ? "" : "s",
                     nargs);
        return -1;
    }
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int slot = -1;
        for (int i = 0; i < n && slot < 0; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0)
                slot = i;
        }
        if (slot < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname, key);
            return -1;
        }
        if (vals[slot] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname, names[slot]);
            return -1;
        }
        vals[slot] = args[nargs + k];
    }
    for (int i = 0; i < required; i++) {
        if (vals[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* A timeout argument's value: None (-1: no deadline) or seconds >= 0. */
static int timeout_value(const char *fname, PyObject *obj, double *timeout)
{
    if (obj == Py_None) {
        *timeout = -1;
        return 0;
    }
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj) || !PyNumber_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s() argument 'timeout' must be None or a number of seconds, not %.100s",
                     fname, Py_TYPE(obj)->tp_name);
        return -1;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1 && PyErr_Occurred())
        return -1;
    if (!(t >= 0)) {
        PyErr_Format(PyExc_ValueError, "timeout must be None or a number of seconds >= 0, not %R", obj);
        return -1;
    }
    /* Beyond ~31 years (infinity included) is no deadline: it would overflow nanoseconds. */
    *timeout = t > 1e9 ? -1 : t;
    return 0;
}

/* Parses an optional `timeout` alone; leaves *timeout alone when it is not given. */
static int timeout_arg(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       double *timeout)
{
    static const char *const names[] = {"timeout"};
    PyObject *obj;
    if (parse_fastcall(fname, names, 1, 0, args, nargs, kwnames, &obj) < 0)
        return -1;
    return obj == NULL ? 0 : timeout_value(fname, obj, timeout);
}

/* Waits run in slices so that signals (Ctrl-C) are handled in between.
 * Returns the next slice in ns toward a deadline `timeout` seconds (< 0:
 * none) after `start`, or 0 once the deadline has passed. */
static int64_t next_slice(double timeout, uint64_t start)
{
    const int64_t slice_ns = 50 * 1000 * 1000;
    if (timeout < 0)
        return slice_ns;
    int64_t left = (int64_t)(timeout * 1e9) - (int64_t)(shx_os_monotonic_ns() - start);
    return left <= 0 ? 0 : left < slice_ns ? left : slice_ns;
}


/* ---- what Value and Segment share ------------------------------------------ */

static const char *type_label(BlockObject *self) { return self->block.kind == SHX_KIND_SEGMENT ? "Segment" : "Value"; }

static int block_check_open(BlockObject *self)
{
    if (!self->block.attached || self->closing) {
        module_state *st = state_of_type(Py_TYPE(self));
        PyErr_Format(st ? st->closed_error : PyExc_ValueError, "%s '%s' is closed", type_label(self),
                     self->block.name);
        return -1;
    }
    return 0;
}

/* Allocates the object and attaches it (without the GIL: creation may wait
 * for other processes or reserve much memory). */
/* scope="session" (the default) or "global": the SHX_GLOBAL flag, or -1 with ValueError. */
static int scope_arg(const char *scope)
{
    if (scope == NULL || strcmp(scope, "session") == 0)
        return 0;
    if (strcmp(scope, "global") == 0)
        return SHX_GLOBAL;
    PyErr_Format(PyExc_ValueError, "scope must be 'session' or 'global', not '%s'", scope);
    return -1;
}

/* security= is an SDDL string for Windows; elsewhere permissions come from mode. */
static int security_arg(const char *security)
{
#ifdef _WIN32
    (void)security;
    return 0;
#else
    if (security == NULL)
        return 0;
    PyErr_Format(PyExc_ValueError, "security='%.100s' is a Windows SDDL descriptor; on this system use mode= "
                 "(e.g. mode=0o660) to share a block", security);
    return -1;
#endif
}

static PyObject *block_new(PyTypeObject *type, const char *name, uint32_t kind, uint64_t size, int persist,
                           int mode, int readonly, const char *scope_name, const char *security)
{
    int scope;
    if (mode_arg(mode) < 0 || (scope = scope_arg(scope_name)) < 0 || security_arg(security) < 0)
        return NULL;
    BlockObject *self = (BlockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->readonly = readonly;
    /* A caller's own security descriptor says who may open the block: no owner check then. */
    unsigned flags = (persist ? SHX_PERSIST : 0) | ((mode & 077) == 0 && security == NULL ? SHX_PRIVATE_OWNER : 0) |
                     (unsigned)scope;
    shx_error err;
    /* Without the GIL (creation may reserve much memory, and another
     * process may hold the attach gate), giving way to Ctrl-C meanwhile. */
    gil_release release = {NULL, self};
    shx_hooks hooks = {gil_begin, gil_end, &release, 0, signal_pending};
    int rc = shx_block_open_hooked(&self->block, name, kind, size, flags, (unsigned)mode, security, &hooks, &err);
    if (rc != SHX_OK) {
        raise_block_error(&err, name);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void block_dealloc(BlockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    shx_error err;
    (void)detach(self, &err);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int block_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

/* Whether the segment's lock is held by a thread of ours that still runs.
 * One that ended holding it handed it on (the kernel marks it), so it is
 * forgotten here. */
static int lock_held_by_live_thread(BlockObject *self)
{
    if (!self->lock_held)
        return 0;
    PyInterpreterState *interp = PyInterpreterState_Get();
    for (PyThreadState *t = PyInterpreterState_ThreadHead(interp); t != NULL; t = PyThreadState_Next(t)) {
        if (t->thread_id == self->lock_thread)
            return 1;
    }
    self->lock_held = 0;
    self->lock_holder = NULL;
    return 0;
}

static int refuse_close_while_locked(BlockObject *self)
{
    if (!lock_held_by_live_thread(self))
        return 0;
    if (self->lock_thread == PyThread_get_thread_ident())
        PyErr_Format(PyExc_RuntimeError, "cannot close %s '%s' while this thread holds its lock; release it first",
                     type_label(self), self->block.name);
    else
        PyErr_Format(PyExc_RuntimeError, "cannot close %s '%s' while another thread of this process (%lu) holds "
                     "its lock; release it there first", type_label(self), self->block.name, self->lock_thread);
    return -1;
}

/* Detaches, waiting for the attach gate (another process may hold it) without the GIL. */
static int detach(BlockObject *self, shx_error *err)
{
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shx_block_close(&self->block, 0, err);
    Py_END_ALLOW_THREADS
    return rc;
}

/* The detach a deferred close() left to the last call in progress. */
static void finish_close(BlockObject *self)
{
    shx_error ignored;
    self->close_deferred = 0;
    if (!lock_held_by_live_thread(self))
        (void)detach(self, &ignored);
    self->closing = 0;
}

static PyObject *block_close(BlockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closing) {
        /* Another close() is under way: a signal handler's returns at once
         * (the call it interrupted detaches as it ends), others wait for it. */
        if (in_call_here(self) || self->close_deferred)
            Py_RETURN_NONE;
        while (self->closing) {
            Py_BEGIN_ALLOW_THREADS
            shx_os_pause_briefly();
            Py_END_ALLOW_THREADS
        }
        Py_RETURN_NONE;
    }
    if (!self->block.attached)
        Py_RETURN_NONE;
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close %s '%s': %zd exported buffer(s) (memoryview, NumPy array...) still use it",
                     type_label(self), self->block.name, self->exports);
        return NULL;
    }
    if (refuse_close_while_locked(self) < 0)
        return NULL;
    /* Other threads may be copying without the GIL: refuse new calls, let
     * those finish (waits and lock waits end at their next slice), then
     * detach.  From a signal handler that interrupted a call of this very
     * thread, waiting would never end: that call detaches as it leaves. */
    self->closing = 1;
    if (in_call_here(self)) {
        self->close_deferred = 1;
        Py_RETURN_NONE;
    }
    while (self->busy > 0) {
        Py_BEGIN_ALLOW_THREADS
        shx_os_pause_briefly();
        Py_END_ALLOW_THREADS
    }
    if (refuse_close_while_locked(self) < 0) {   /* taken by a wait that ended just now */
        self->closing = 0;
        return NULL;
    }
    /* Waiting for another process's attach gate gives way to Ctrl-C; the
     * block stays attached then, and close() can be called again. */
    shx_error err;
    gil_release release = {NULL, self};
    shx_hooks hooks = {gil_begin, gil_end, &release, 0, signal_pending};
    int rc = shx_block_close_hooked(&self->block, &hooks, &err);
    self->closing = 0;
    if (rc != SHX_OK)
        return raise_block_error(&err, self->block.name);
    Py_RETURN_NONE;
}

static PyObject *block_enter(BlockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (block_check_open(self) < 0)
        return NULL;
    return Py_NewRef(self);
}

static PyObject *block_exit(BlockObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return block_close(self, NULL);
}

static PyObject *block_sole_holder(BlockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (block_check_open(self) < 0)
        return NULL;
    int alone = 0, rc;
    shx_error err;
    Py_BEGIN_ALLOW_THREADS
    rc = shx_block_sole_holder(&self->block, &alone, &err);
    Py_END_ALLOW_THREADS
    if (rc != SHX_OK)
        return raise_block_error(&err, self->block.name);
    return PyBool_FromLong(alone);
}

/* An int, or None for a count the OS cannot tell (-1). */
static PyObject *optional_int(int64_t value) { return value < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(value); }

static PyObject *block_get_holders(BlockObject *self, void *Py_UNUSED(c))
{
    if (block_check_open(self) < 0)
        return NULL;
    int64_t count = -1;
    shx_error err;
    if (shx_block_holders(&self->block, &count, &err) != SHX_OK)
        return raise_block_error(&err, self->block.name);
    return optional_int(count);
}

static PyObject *block_get_name(BlockObject *self, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(self->block.name);
}

static PyObject *block_get_size(BlockObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->block.capacity);
}

static PyObject *block_get_created(BlockObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->block.created);
}

static PyObject *block_get_closed(BlockObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(!self->block.attached);
}

static PyObject *block_get_persist(BlockObject *self, void *Py_UNUSED(c))
{
    if (block_check_open(self) < 0)
        return NULL;
    return PyBool_FromLong(shx_block_is_persistent(&self->block));
}

#define BLOCK_METHODS                                                                                    \
    {"close", (PyCFunction)block_close, METH_NOARGS,                                                     \
     "close($self, /)\n--\n\nDetach from the block. The last process to detach releases it. Idempotent."}, \
    {"__enter__", (PyCFunction)block_enter, METH_NOARGS, NULL},                                          \
    {"__exit__", (PyCFunction)(void (*)(void))block_exit, METH_FASTCALL, NULL},                          \
    {"_sole_holder", (PyCFunction)block_sole_holder, METH_NOARGS,                                        \
     "_sole_holder($self, /)\n--\n\nWhether no other process holds this block."}

#define BLOCK_GETSET                                                                                \
    {"name", (getter)block_get_name, NULL, "The block's name.", NULL},                              \
    {"created", (getter)block_get_created, NULL,                                                    \
     "True if this process created (or re-created) the block.", NULL},                              \
    {"closed", (getter)block_get_closed, NULL, "True after close().", NULL},                        \
    {"persist", (getter)block_get_persist, NULL, "True if the block outlives its last process.", NULL},         \
    {"holders", (getter)block_get_holders, NULL,                                                    \
     "How many attachments the block has, this one included (a fork() child's counts), or None\n"  \
     "where the OS cannot tell.", NULL}

/* ---- Value ------------------------------------------------------------------- */

/* Where shx_value_get copies to: a new str of the stored width, or bytes. */
typedef struct {
    PyObject *obj;
} value_dst;

static void *prepare_dst(void *ctx, uint32_t type, size_t nbytes)
{
    value_dst *d = (value_dst *)ctx;
    Py_CLEAR(d->obj);
    Py_UCS4 maxchar;
    size_t unit;
    switch (type) {
    case SHX_TYPE_EMPTY:  maxchar = 0; unit = 1; break;
    case SHX_TYPE_ASCII:  maxchar = 0x7F; unit = 1; break;
    case SHX_TYPE_LATIN1: maxchar = 0xFF; unit = 1; break;
    case SHX_TYPE_UCS2:   maxchar = 0xFFFF; unit = 2; break;
    case SHX_TYPE_UCS4:   maxchar = 0x10FFFF; unit = 4; break;
    default:              maxchar = 0; unit = 0; break;
    }
    if (unit == 0 || nbytes % unit != 0) {
        /* Bytes, or text whose length is no whole number of units (refused after the copy). */
        d->obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
        return d->obj ? PyBytes_AS_STRING(d->obj) : NULL;
    }
    d->obj = PyUnicode_New((Py_ssize_t)(nbytes / unit), maxchar);
    return d->obj ? PyUnicode_DATA(d->obj) : NULL;
}

static PyObject *value_get_impl(BlockObject *self)
{
    if (block_check_open(self) < 0)
        return NULL;
    value_dst dst = {NULL};
    gil_release release;
    shx_hooks hooks = GIL_HOOKS(release, self);
    shx_error err;
    uint32_t type;
    size_t nbytes;
    call_begin(self);
    int rc = shx_value_get(&self->block, prepare_dst, &dst, &hooks, &type, &nbytes, NULL, &err);
    call_end(self);
    if (rc != SHX_OK) {
        Py_XDECREF(dst.obj);
        if (PyErr_Occurred())
            return NULL;
        return raise_block_error(&err, self->block.name);
    }
    return dst.obj;
}

static int value_set_impl(BlockObject *self, PyObject *value)
{
    if (block_check_open(self) < 0)
        return -1;
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
        type = PyUnicode_IS_ASCII(value) ? SHX_TYPE_ASCII
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
    gil_release release;
    shx_hooks hooks = GIL_HOOKS(release, self);
    shx_error err;
    call_begin(self);
    int rc = shx_value_set(&self->block, type, data, nbytes, &hooks, &err);
    call_end(self);
    if (have_view)
        PyBuffer_Release(&view);
    if (rc != SHX_OK) {
        raise_block_error(&err, self->block.name);
        return -1;
    }
    return 0;
}

static PyObject *value_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "capacity", "persist", "mode", "scope", "security", NULL};
    PyObject *name_obj, *capacity_obj = Py_None;
    int persist = 0, mode = 0600;
    const char *scope_name = NULL, *security = NULL;
    uint64_t capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$pO&zz:Value", kwlist, &name_obj, &capacity_obj, &persist,
                                     mode_converter, &mode,
                                     &scope_name, &security))
        return NULL;
    const char *name = name_arg(name_obj, "name");
    if (name == NULL || size_arg(capacity_obj, "capacity", 1, &capacity) < 0)
        return NULL;
    return block_new(type, name, SHX_KIND_VALUE, capacity, persist, mode, 0, scope_name, security);
}

static PyObject *value_get(BlockObject *self, PyObject *Py_UNUSED(ignored)) { return value_get_impl(self); }

static PyObject *value_set(BlockObject *self, PyObject *value)
{
    if (value_set_impl(self, value) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *value_repr(BlockObject *self)
{
    if (!self->block.attached)
        return PyUnicode_FromFormat("<shmemext.Value name='%s' closed>", self->block.name);
    return PyUnicode_FromFormat("<shmemext.Value name='%s' capacity=%llu version=%llu%s>", self->block.name,
                                (unsigned long long)self->block.capacity,
                                (unsigned long long)shx_value_version(&self->block),
                                shx_block_is_persistent(&self->block) ? " persist" : "");
}

static PyObject *value_get_version(BlockObject *self, void *Py_UNUSED(c))
{
    if (block_check_open(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(shx_value_version(&self->block));
}

/* Waits until the version differs from `seen` (or `timeout` seconds, < 0:
 * forever) with the GIL released, in slices so that Ctrl-C is handled. */
static PyObject *value_wait_impl(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"version", "timeout"};
    PyObject *vals[2];
    if (parse_fastcall("wait", names, 2, 0, args, nargs, kwnames, vals) < 0)
        return NULL;
    if (block_check_open(self) < 0)
        return NULL;
    uint64_t seen;
    if (vals[0] == NULL || vals[0] == Py_None) {
        seen = shx_value_version(&self->block);
    } else if (!PyLong_Check(vals[0])) {
        return PyErr_Format(PyExc_TypeError, "wait() argument 'version' must be an int or None, not %.100s",
                            Py_TYPE(vals[0])->tp_name);
    } else {
        seen = PyLong_AsUnsignedLongLong(vals[0]);
        if (seen == (uint64_t)-1 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "version %R is out of range: versions are 0 to 2**64-1", vals[0]);
            }
            return NULL;
        }
    }
    double timeout = -1;
    if (vals[1] != NULL && timeout_value("wait", vals[1], &timeout) < 0)
        return NULL;
    uint64_t start = shx_os_monotonic_ns(), now = seen;
    shx_error err;
    for (;;) {
        /* A passed deadline still looks once (a wait of 0), so timeout=0 is a poll. */
        int64_t wait = next_slice(timeout, start);
        int rc;
        call_begin(self);
        Py_BEGIN_ALLOW_THREADS
        rc = shx_value_wait(&self->block, seen, wait, &now, &err);
        Py_END_ALLOW_THREADS
        call_end(self);
        if (rc == SHX_OK)
            return PyLong_FromUnsignedLongLong(now);
        if (rc != SHX_E_TIMEOUT)
            return raise_block_error(&err, self->block.name);
        if (block_check_open(self) < 0)   /* closed by another thread meanwhile */
            return NULL;
        if (next_slice(timeout, start) == 0) {
            char secs[32];
            snprintf(secs, sizeof secs, "%g", timeout);
            return PyErr_Format(PyExc_TimeoutError, "timed out after %s s waiting for a new value in Value '%s' "
                                "(still version %llu)", secs, self->block.name, (unsigned long long)now);
        }
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

static PyObject *value_wait(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return value_wait_impl(self, args, nargs, kwnames);
}

static PyObject *value_read_stats(BlockObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KK)", (unsigned long long)atomic_load(&self->block.read_retries),
                         (unsigned long long)atomic_load(&self->block.locked_reads));
}

static PyMethodDef value_methods[] = {
    {"get", (PyCFunction)value_get, METH_NOARGS,
     "get($self, /)\n--\n\nReturn the committed value: str or bytes, as it was set. A never-written block gives ''."},
    {"set", (PyCFunction)value_set, METH_O,
     "set($self, value, /)\n--\n\nCommit value (str or a contiguous bytes-like object) for every process to see."},
    {"wait", (PyCFunction)(void (*)(void))value_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait($self, /, version=None, timeout=None)\n--\n\nBlock until the committed version differs from `version`\n"
     "(default: the version now) and return the new version. TimeoutError after `timeout` seconds.\n"
     "The OS wakes every waiter in every process at the next set(); nothing spins."},
    {"_read_stats", (PyCFunction)value_read_stats, METH_NOARGS,
     "_read_stats($self, /)\n--\n\n(retries, locked_reads) of this handle's gets so far: copies repeated because\n"
     "a writer overtook them, and gets that fell back to the writer lock."},
    BLOCK_METHODS,
    {NULL, NULL, 0, NULL}};

static PyGetSetDef value_getset[] = {
    BLOCK_GETSET,
    {"capacity", (getter)block_get_size, NULL, "The largest value in bytes (str: characters x their width).", NULL},
    {"version", (getter)value_get_version, NULL, "How many values have been committed to the block.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(value_doc,
"Value(name, capacity=None, *, persist=False, mode=0o600, scope='session', security=None)\n--\n\n"
"A named value cell shared between processes.\n\n"
"The first process to open `name` creates it zero-filled with `capacity` bytes\n"
"(4096 when None); later ones take the existing block's capacity.  The block\n"
"lives while any process has it open, unless persist=True.\n\n"
"scope='global' names it for every session on Windows (Global\\, which needs\n"
"SeCreateGlobalPrivilege); POSIX names are machine-wide either way.  security\n"
"is a Windows SDDL descriptor for a new block, in place of the per-user one.");

static PyType_Slot value_slots[] = {
    {Py_tp_new, value_new},
    {Py_tp_dealloc, block_dealloc},
    {Py_tp_traverse, block_traverse},
    {Py_tp_repr, value_repr},
    {Py_tp_methods, value_methods},
    {Py_tp_getset, value_getset},
    {Py_tp_doc, (void *)value_doc},
    {0, NULL}};

static PyType_Spec value_spec = {
    .name = "shmemext.Value",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = value_slots,
};

/* ---- Segment ------------------------------------------------------------------ */

static PyObject *segment_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "size", "persist", "mode", "readonly", "scope", "security", NULL};
    PyObject *name_obj, *size_obj;
    int persist = 0, mode = 0600, readonly = 0;
    const char *scope_name = NULL, *security = NULL;
    uint64_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$pO&pzz:Segment", kwlist, &name_obj, &size_obj, &persist,
                                     mode_converter, &mode,
                                     &readonly, &scope_name, &security))
        return NULL;
    const char *name = name_arg(name_obj, "name");
    if (name == NULL || size_arg(size_obj, "size", 0, &size) < 0)
        return NULL;
    return block_new(type, name, SHX_KIND_SEGMENT, size, persist, mode, readonly, scope_name, security);
}

/* An offset or length argument as a non-negative size_t, or -1 with ValueError/TypeError. */
static int index_arg(PyObject *arg, const char *what, Py_ssize_t *out)
{
    Py_ssize_t v = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s %R is out of range", what, arg);
        }
        return -1;
    }
    *out = v;
    return 0;
}

static int check_offset(BlockObject *self, Py_ssize_t offset)
{
    if (offset < 0 || (uint64_t)offset > self->block.capacity) {
        PyErr_Format(PyExc_ValueError, "Segment '%s': offset %zd is out of range: it must be between 0 and %llu",
                     self->block.name, offset, (unsigned long long)self->block.capacity);
        return -1;
    }
    return 0;
}

static PyObject *range_error(BlockObject *self, const char *what, unsigned long long end)
{
    return PyErr_Format(PyExc_ValueError, "Segment '%s': %s ends at byte %llu, beyond its size of %llu bytes",
                        self->block.name, what, end, (unsigned long long)self->block.capacity);
}

static PyObject *segment_read(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"n", "offset"};
    PyObject *vals[2];
    if (parse_fastcall("read", names, 2, 0, args, nargs, kwnames, vals) < 0)
        return NULL;
    if (block_check_open(self) < 0)
        return NULL;
    Py_ssize_t n = -1, offset = 0;
    if ((vals[0] && index_arg(vals[0], "n", &n) < 0) || (vals[1] && index_arg(vals[1], "offset", &offset) < 0))
        return NULL;
    uint64_t size = self->block.capacity;
    if (check_offset(self, offset) < 0)
        return NULL;
    if (n < -1)
        return PyErr_Format(PyExc_ValueError, "read(): n must be -1 (to the end) or at least 0, not %zd", n);
    if (n == -1)
        n = (Py_ssize_t)(size - (uint64_t)offset);
    if ((uint64_t)n > size - (uint64_t)offset)
        return range_error(self, "read", (unsigned long long)offset + (unsigned long long)n);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    gil_release release;
    shx_hooks hooks = GIL_HOOKS(release, self);
    shx_error err;
    call_begin(self);
    int rc = shx_segment_read(&self->block, (uint64_t)offset, PyBytes_AS_STRING(out), (size_t)n, &hooks, &err);
    call_end(self);
    if (rc != SHX_OK) {
        Py_DECREF(out);
        return raise_block_error(&err, self->block.name);
    }
    return out;
}

static PyObject *segment_write(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"data", "offset"};
    PyObject *vals[2];
    if (parse_fastcall("write", names, 2, 1, args, nargs, kwnames, vals) < 0)
        return NULL;
    PyObject *data = vals[0], *offset_obj = vals[1];
    if (block_check_open(self) < 0)
        return NULL;
    if (self->readonly)
        return PyErr_Format(PyExc_TypeError, "Segment '%s' was opened readonly", self->block.name);
    Py_ssize_t offset = 0;
    if (offset_obj && index_arg(offset_obj, "offset", &offset) < 0)
        return NULL;
    uint64_t size = self->block.capacity;
    if (check_offset(self, offset) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return PyErr_Format(PyExc_TypeError, "write() needs a contiguous bytes-like object, not %.100s",
                            Py_TYPE(data)->tp_name);
    }
    if ((uint64_t)view.len > size - (uint64_t)offset) {
        unsigned long long end = (unsigned long long)offset + (unsigned long long)view.len;
        PyBuffer_Release(&view);
        return range_error(self, "write", end);
    }
    gil_release release;
    shx_hooks hooks = GIL_HOOKS(release, self);
    shx_error err;
    call_begin(self);
    int rc = shx_segment_write(&self->block, (uint64_t)offset, view.buf, (size_t)view.len, &hooks, &err);
    call_end(self);
    Py_ssize_t written = view.len;
    PyBuffer_Release(&view);
    if (rc != SHX_OK)
        return raise_block_error(&err, self->block.name);
    return PyLong_FromSsize_t(written);
}

static int segment_getbuffer(BlockObject *self, Py_buffer *view, int flags)
{
    if (block_check_open(self) < 0)
        return -1;
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->block.data, (Py_ssize_t)self->block.capacity,
                          self->readonly, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void segment_releasebuffer(BlockObject *self, Py_buffer *Py_UNUSED(view)) { self->exports--; }

/* Takes the segment's lock, waiting at most `timeout` seconds (< 0: forever)
 * with the GIL released, in short slices so that signals (Ctrl-C) are handled. */
static int acquire_block_lock(BlockObject *self, double timeout, int *owner_died)
{
    shx_error err;
    int rc = shx_block_lock(&self->block, 0, owner_died, NULL, &err);
    uint64_t start = rc == SHX_E_TIMEOUT ? shx_os_monotonic_ns() : 0;
    while (rc == SHX_E_TIMEOUT) {
        int64_t wait = next_slice(timeout, start);
        if (wait == 0) {
            char secs[32];
            snprintf(secs, sizeof secs, "%g", timeout);
            PyErr_Format(PyExc_TimeoutError, "timed out after %s s waiting for the lock of Segment '%s'", secs,
                         self->block.name);
            return -1;
        }
        call_begin(self);
        Py_BEGIN_ALLOW_THREADS
        rc = shx_block_lock(&self->block, wait, owner_died, NULL, &err);
        Py_END_ALLOW_THREADS
        if (rc == SHX_OK && self->closing) {   /* won just as close() began: give it back */
            shx_error ignored;
            (void)shx_block_unlock(&self->block, &ignored);
            rc = SHX_E_TIMEOUT;
        }
        call_end(self);
        if (rc == SHX_E_TIMEOUT && (PyErr_CheckSignals() < 0 || block_check_open(self) < 0))
            return -1;
    }
    if (rc == SHX_E_OS && err.os_error == EDEADLK) {
        PyErr_Format(PyExc_RuntimeError, "this thread already holds the lock of Segment '%s' (it is not re-entrant)",
                     self->block.name);
        return -1;
    }
    if (rc != SHX_OK) {
        raise_block_error(&err, self->block.name);
        return -1;
    }
    return 0;
}

static PyObject *segment_lock(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    double timeout = -1;
    if (timeout_arg("lock", args, nargs, kwnames, &timeout) < 0)
        return NULL;
    if (block_check_open(self) < 0)
        return NULL;
    LockObject *lock = PyObject_GC_New(LockObject, state_of((PyObject *)self)->lock_type);
    if (lock == NULL)
        return NULL;
    lock->segment = (BlockObject *)Py_NewRef(self);
    lock->timeout = timeout;
    lock->owner_died = 0;
    PyObject_GC_Track(lock);
    return (PyObject *)lock;
}

static PyObject *segment_repr(BlockObject *self)
{
    if (!self->block.attached)
        return PyUnicode_FromFormat("<shmemext.Segment name='%s' closed>", self->block.name);
    return PyUnicode_FromFormat("<shmemext.Segment name='%s' size=%llu%s%s>", self->block.name,
                                (unsigned long long)self->block.capacity, self->readonly ? " readonly" : "",
                                shx_block_is_persistent(&self->block) ? " persist" : "");
}

static PyObject *segment_get_readonly(BlockObject *self, void *Py_UNUSED(c)) { return PyBool_FromLong(self->readonly); }

static PyObject *segment_get_exports(BlockObject *self, void *Py_UNUSED(c)) { return PyLong_FromSsize_t(self->exports); }

static PyMethodDef segment_methods[] = {
    {"read", (PyCFunction)(void (*)(void))segment_read, METH_FASTCALL | METH_KEYWORDS,
     "read($self, /, n=-1, offset=0)\n--\n\nCopy n bytes (to the end if -1) from offset into a new bytes object."},
    {"write", (PyCFunction)(void (*)(void))segment_write, METH_FASTCALL | METH_KEYWORDS,
     "write($self, /, data, offset=0)\n--\n\nCopy a bytes-like object into the segment at offset; return its length."},
    {"lock", (PyCFunction)(void (*)(void))segment_lock, METH_FASTCALL | METH_KEYWORDS,
     "lock($self, /, timeout=None)\n--\n\nThe segment's cross-process lock, as a context manager\n"
     "(also acquire()/release()). It survives its holder's death: see SegmentLock.owner_died."},
    BLOCK_METHODS,
    {NULL, NULL, 0, NULL}};

static PyGetSetDef segment_getset[] = {
    BLOCK_GETSET,
    {"size", (getter)block_get_size, NULL, "The segment's size in bytes, exactly as asked at creation.", NULL},
    {"readonly", (getter)segment_get_readonly, NULL, "True if opened readonly.", NULL},
    {"_exports", (getter)segment_get_exports, NULL, "Buffers exported and not yet released.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(segment_doc,
"Segment(name, size, *, persist=False, mode=0o600, readonly=False, scope='session', security=None)\n--\n\n"
"A named block of raw shared memory with the buffer protocol.\n\n"
"The first process to open `name` creates it zero-filled with `size` bytes;\n"
"later ones get the existing block (which must be at least `size` bytes).\n"
"It lives while any process has it open, unless persist=True.  scope and\n"
"security are as for Value.");

static PyType_Slot segment_slots[] = {
    {Py_tp_new, segment_new},
    {Py_tp_dealloc, block_dealloc},
    {Py_tp_traverse, block_traverse},
    {Py_tp_repr, segment_repr},
    {Py_tp_methods, segment_methods},
    {Py_tp_getset, segment_getset},
    {Py_tp_doc, (void *)segment_doc},
    {Py_bf_getbuffer, segment_getbuffer},
    {Py_bf_releasebuffer, segment_releasebuffer},
    {0, NULL}};

static PyType_Spec segment_spec = {
    .name = "shmemext.Segment",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = segment_slots,
};

/* ---- SegmentLock ---------------------------------------------------------------- */

static PyObject *lock_acquire_impl(LockObject *self, double timeout)
{
    if (block_check_open(self->segment) < 0)
        return NULL;
    int owner_died = 0;
    if (acquire_block_lock(self->segment, timeout, &owner_died) < 0)
        return NULL;
    /* A holder recorded here but found dead by the kernel was a thread of ours that ended. */
    self->owner_died = owner_died;
    self->segment->lock_held = 1;
    self->segment->lock_holder = self;
    self->segment->lock_thread = PyThread_get_thread_ident();
    Py_RETURN_TRUE;
}

static PyObject *lock_acquire(LockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    double timeout = self->timeout;
    if (timeout_arg("acquire", args, nargs, kwnames, &timeout) < 0)
        return NULL;
    return lock_acquire_impl(self, timeout);
}

static PyObject *lock_release(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    BlockObject *seg = self->segment;
    if (block_check_open(seg) < 0)
        return NULL;
    shx_error err;
    if (shx_block_unlock(&seg->block, &err) != SHX_OK) {
        if (err.status == SHX_E_OS && err.os_error == EPERM)
            return PyErr_Format(PyExc_RuntimeError, "the lock of Segment '%s' is not held by this thread",
                                seg->block.name);
        return raise_block_error(&err, seg->block.name);
    }
    seg->lock_held = 0;
    seg->lock_holder = NULL;
    Py_RETURN_NONE;
}

static PyObject *lock_enter(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *r = lock_acquire_impl(self, self->timeout);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return Py_NewRef(self);
}

static PyObject *lock_exit(LockObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return lock_release(self, NULL);
}

static PyObject *lock_get_owner_died(LockObject *self, void *Py_UNUSED(c)) { return PyBool_FromLong(self->owner_died); }

static PyObject *lock_get_segment(LockObject *self, void *Py_UNUSED(c)) { return Py_NewRef(self->segment); }

static int lock_traverse(LockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->segment);
    return 0;
}

/* A lock object going away.  Dropped by the thread that holds the lock
 * through it, it releases it, so the mapping is never unmapped under a held
 * lock.  Dropped elsewhere (another thread, the cycle collector), the lock
 * stays held by its thread, and the segment remembers that: close() refuses
 * until that thread releases it (with another SegmentLock) or ends. */
static void lock_let_go(LockObject *self)
{
    BlockObject *seg = self->segment;
    if (seg == NULL || seg->lock_holder != self)
        return;
    if (seg->lock_held && seg->lock_thread == PyThread_get_thread_ident() && seg->block.attached) {
        shx_error err;
        if (shx_block_unlock(&seg->block, &err) == SHX_OK)
            seg->lock_held = 0;
    }
    seg->lock_holder = NULL;
}

static int lock_clear(LockObject *self)
{
    lock_let_go(self);
    Py_CLEAR(self->segment);
    return 0;
}

static void lock_dealloc(LockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)lock_clear(self);
    PyObject_GC_Del(self);
    Py_DECREF(tp);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, /, timeout=None)\n--\n\nTake the lock, waiting at most timeout seconds (TimeoutError after).\n"
     "Returns True. Afterwards owner_died tells whether the previous holder died holding it."},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "release($self, /)\n--\n\nRelease the lock (held by this thread)."},
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))lock_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef lock_getset[] = {
    {"owner_died", (getter)lock_get_owner_died, NULL,
     "True if the last acquire() took the lock from a holder that died holding it:\n"
     "the data it guarded may be half-updated.", NULL},
    {"segment", (getter)lock_get_segment, NULL, "The Segment this lock belongs to.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot lock_slots[] = {
    {Py_tp_dealloc, lock_dealloc},
    {Py_tp_traverse, lock_traverse},
    {Py_tp_clear, lock_clear},
    {Py_tp_methods, lock_methods},
    {Py_tp_getset, lock_getset},
    {Py_tp_doc, (void *)"A Segment's cross-process lock; made by Segment.lock()."},
    {0, NULL}};

static PyType_Spec lock_spec = {
    .name = "shmemext.SegmentLock",
    .basicsize = sizeof(LockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = lock_slots,
};

/* ---- module functions ---------------------------------------------------- */

static BlockObject *default_value(PyObject *module)
{
    module_state *st = get_state(module);
    if (st->default_value == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the default block is disabled (SHMEMEXT_SIZE=0); use shmemext.Value(name) instead");
        return NULL;
    }
    return (BlockObject *)st->default_value;
}

static PyObject *mod_get(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    BlockObject *v = default_value(module);
    return v ? value_get_impl(v) : NULL;
}

static PyObject *mod_set(PyObject *module, PyObject *value)
{
    BlockObject *v = default_value(module);
    if (v == NULL || value_set_impl(v, value) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *mod_wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    BlockObject *v = default_value(module);
    return v ? value_wait_impl(v, args, nargs, kwnames) : NULL;
}

static PyObject *mod_unlink(PyObject *module, PyObject *arg)
{
    const char *name = name_arg(arg, "name");
    if (name == NULL)
        return NULL;
    shx_error err;
    if (shx_unlink(name, &err) != SHX_OK)
        return raise_error_in(get_state(module), &err, name);
    Py_RETURN_NONE;
}

/* ---- listing and sweeping ---------------------------------------------------- */

typedef struct {
    PyObject *list;
    int failed;
} info_sink;

static void append_info(void *ctx, const shx_block_info *info)
{
    info_sink *sink = (info_sink *)ctx;
    if (sink->failed)
        return;
    const char *kind = info->kind == SHX_KIND_VALUE ? "value" : info->kind == SHX_KIND_SEGMENT ? "segment" : NULL;
    PyObject *d = Py_BuildValue(
        "{s:s,s:z,s:K,s:N,s:N,s:N,s:O,s:N,s:N}", "name", info->os.name, "kind", kind, "size",
        (unsigned long long)info->os.size, "capacity",
        info->kind ? PyLong_FromUnsignedLongLong(info->capacity) : Py_NewRef(Py_None), "holders",
        optional_int(info->os.holders), "persist",
        info->os.persist < 0 ? Py_NewRef(Py_None) : PyBool_FromLong(info->os.persist), "alive",
        info->os.alive ? Py_True : Py_False, "creator_pid",
        info->os.creator_pid ? PyLong_FromUnsignedLong(info->os.creator_pid) : Py_NewRef(Py_None), "created",
        info->os.created > 0 ? PyFloat_FromDouble((double)info->os.created) : Py_NewRef(Py_None));
    if (d == NULL || PyList_Append(sink->list, d) < 0)
        sink->failed = 1;
    Py_XDECREF(d);
}

static PyObject *collect_blocks(PyObject *module, int (*walk)(shx_block_info_fn, void *, shx_error *))
{
    info_sink sink = {PyList_New(0), 0};
    if (sink.list == NULL)
        return NULL;
    shx_error err;
    int rc = walk(append_info, &sink, &err);
    if (sink.failed) {
        Py_DECREF(sink.list);
        return NULL;
    }
    if (rc != SHX_OK) {
        Py_DECREF(sink.list);
        return raise_error_in(get_state(module), &err, "*");
    }
    return sink.list;
}

static PyObject *mod_blocks(PyObject *module, PyObject *Py_UNUSED(ignored)) { return collect_blocks(module, shx_list); }
static PyObject *mod_sweep(PyObject *module, PyObject *Py_UNUSED(ignored)) { return collect_blocks(module, shx_sweep); }

static PyMethodDef module_methods[] = {
    {"get", mod_get, METH_NOARGS, "get()\n--\n\nReturn the default block's committed value (str or bytes)."},
    {"set", mod_set, METH_O, "set(value, /)\n--\n\nCommit value (str or bytes-like) to the default block."},
    {"wait", (PyCFunction)(void (*)(void))mod_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(version=None, timeout=None)\n--\n\nBlock until the default block's version differs from `version`\n"
     "(default: the version now); return the new version. TimeoutError after `timeout` seconds."},
    {"blocks", mod_blocks, METH_NOARGS,
     "blocks()\n--\n\nThis user's blocks as the OS sees them, one dict each (name, kind, size,\n"
     "capacity, holders, persist, alive, creator_pid, created); a value the OS cannot tell is None.\n"
     "Changes nothing."},
    {"sweep", mod_sweep, METH_NOARGS,
     "sweep()\n--\n\nRemove what dead blocks of this user's left behind (a name whose memory is\n"
     "gone; memory that nothing names or holds); return what was removed, as blocks() describes it."},
    {"unlink", mod_unlink, METH_O,
     "unlink(name, /)\n--\n\nRemove the name of a block (a persistent one, typically). Processes\n"
     "that have it open keep it; the next open of the name creates a new block."},
    {NULL, NULL, 0, NULL}};

/* ---- the Python side of the C API ------------------------------------------ */

static struct PyModuleDef shmemext_module;

/* This interpreter's module state, importing the module if need be. */
static module_state *current_state(void)
{
    PyObject *mod = PyImport_ImportModule("shmemext._shmemext");
    if (mod == NULL)
        return NULL;
    module_state *st = PyModule_GetDef(mod) == &shmemext_module ? get_state(mod) : NULL;
    Py_DECREF(mod);   /* sys.modules keeps it */
    if (st == NULL)
        PyErr_SetString(PyExc_ImportError, "shmemext._shmemext is not the shmemext extension module");
    return st;
}

ShmemExt_Block *shmemext_default_block(void)
{
    module_state *st = current_state();
    if (st == NULL)
        return NULL;
    if (st->default_value == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the default block is disabled (SHMEMEXT_SIZE=0)");
        return NULL;
    }
    return (ShmemExt_Block *)&((BlockObject *)st->default_value)->block;
}

ShmemExt_Block *shmemext_block_from_object(PyObject *obj)
{
    module_state *st = current_state();
    if (st == NULL)
        return NULL;
    if (!PyObject_TypeCheck(obj, st->value_type) && !PyObject_TypeCheck(obj, st->segment_type)) {
        PyErr_Format(PyExc_TypeError, "expected a shmemext.Value or shmemext.Segment, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    BlockObject *b = (BlockObject *)obj;
    if (block_check_open(b) < 0)
        return NULL;
    return (ShmemExt_Block *)&b->block;
}

/* ---- the default block ----------------------------------------------------- */

static void default_name(char *out, size_t size)
{
    const char *env = getenv("SHMEMEXT_NAME");
    if (env != NULL && env[0] != '\0') {
        snprintf(out, size, "%s", env);
        return;
    }
#ifdef _WIN32
    snprintf(out, size, "shmemext-default");
#else
    snprintf(out, size, "shmemext-%lu", (unsigned long)geteuid());
#endif
}

/* SHMEMEXT_SIZE: -1 when unset, else its value; raises ValueError when malformed. */
static int default_size(long long *out)
{
    const char *env = getenv("SHMEMEXT_SIZE");
    *out = -1;
    if (env == NULL || env[0] == '\0')
        return 0;
    char *end;
    errno = 0;
    long long v = strtoll(env, &end, 10);
    if (*end != '\0' || errno != 0 || v < 0 || (unsigned long long)v > SHX_MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError,
                     "SHMEMEXT_SIZE=%s is not a capacity: it must be a whole number of bytes from 1 to %llu, "
                     "or 0 to disable the default block", env, (unsigned long long)SHX_MAX_CAPACITY);
        return -1;
    }
    *out = v;
    return 0;
}

/* Maps the default block, as a DLL maps its shared section when it is loaded.
 * A failure fails the import with the OSError/ValueError that names the block. */
static int open_default_block(module_state *st)
{
    long long size;
    if (default_size(&size) < 0)
        return -1;
    if (size == 0)
        return 0;
    char name[SHX_NAME_MAX + 64];
    default_name(name, sizeof name);
    PyObject *args = size < 0 ? Py_BuildValue("(s)", name) : Py_BuildValue("(sL)", name, size);
    if (args == NULL)
        return -1;
    st->default_value = PyObject_Call((PyObject *)st->value_type, args, NULL);
    Py_DECREF(args);
    return st->default_value ? 0 : -1;
}

static void detach_all_at_exit(void) { shx_detach_all_at_exit(); }

/* shmemext.Error and its subclasses: ValueErrors, so that code catching
 * ValueError keeps working, that a caller can tell apart. */
static int add_error(PyObject *module, PyObject **slot, const char *qualified, const char *doc, PyObject *base)
{
    *slot = PyErr_NewExceptionWithDoc(qualified, doc, base, NULL);
    return *slot == NULL ? -1 : PyModule_AddObjectRef(module, strrchr(qualified, '.') + 1, *slot);
}

static int add_errors(PyObject *module, module_state *st)
{
    if (add_error(module, &st->error, "shmemext.Error",
                  "A shmemext failure that is not the operating system's: a bad name or size, a block of the\n"
                  "wrong kind or too small, a value over the capacity. A ValueError.", PyExc_ValueError) < 0)
        return -1;
    if (add_error(module, &st->foreign_error, "shmemext.ForeignBlockError",
                  "The name holds something this shmemext does not read: another program's object, or a\n"
                  "block of a newer layout. It is never overwritten.", st->error) < 0)
        return -1;
    if (add_error(module, &st->corrupt_error, "shmemext.CorruptBlockError",
                  "A block whose header or committed value is not well formed: bytes another process\n"
                  "wrote over it. Nothing is built from them.", st->error) < 0)
        return -1;
    return add_error(module, &st->closed_error, "shmemext.ClosedError",
                     "The Value, Segment or handle was closed.", st->error);
}

static int module_exec(PyObject *module)
{
    static atomic_flag at_exit_registered = ATOMIC_FLAG_INIT;
    module_state *st = get_state(module);
    st->value_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &value_spec, NULL);
    if (st->value_type == NULL)
        return -1;
    st->segment_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &segment_spec, NULL);
    st->lock_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &lock_spec, NULL);
    if (st->segment_type == NULL || st->lock_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "Value", (PyObject *)st->value_type) < 0 ||
        PyModule_AddObjectRef(module, "Segment", (PyObject *)st->segment_type) < 0 ||
        PyModule_AddObjectRef(module, "SegmentLock", (PyObject *)st->lock_type) < 0)
        return -1;
    if (PyModule_AddStringConstant(module, "__version__", SHMEMEXT_VERSION) < 0 ||
        PyModule_AddStringConstant(module, "_BACKEND", SHX_BACKEND) < 0 ||
        PyModule_AddIntConstant(module, "DEFAULT_CAPACITY", SHX_DEFAULT_CAPACITY) < 0 ||
        PyModule_AddIntConstant(module, "NAME_MAX", SHX_NAME_MAX) < 0 ||
        PyModule_AddObject(module, "MAX_CAPACITY", PyLong_FromUnsignedLongLong(SHX_MAX_CAPACITY)) < 0)
        return -1;
    PyObject *capsule = shmemext_capi_capsule();
    if (capsule == NULL || PyModule_AddObject(module, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        return -1;
    }
    if (!atomic_flag_test_and_set(&at_exit_registered) && Py_AtExit(detach_all_at_exit) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "no room to register the exit hook (Py_AtExit)");
        return -1;
    }
    if (add_errors(module, st) < 0 || open_default_block(st) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "default", st->default_value ? st->default_value : Py_None);
}

static int module_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = get_state(module);
    Py_VISIT(st->value_type);
    Py_VISIT(st->segment_type);
    Py_VISIT(st->lock_type);
    Py_VISIT(st->default_value);
    Py_VISIT(st->error);
    Py_VISIT(st->foreign_error);
    Py_VISIT(st->corrupt_error);
    Py_VISIT(st->closed_error);
    return 0;
}

static int module_clear(PyObject *module)
{
    module_state *st = get_state(module);
    Py_CLEAR(st->default_value);
    Py_CLEAR(st->value_type);
    Py_CLEAR(st->segment_type);
    Py_CLEAR(st->lock_type);
    Py_CLEAR(st->error);
    Py_CLEAR(st->foreign_error);
    Py_CLEAR(st->corrupt_error);
    Py_CLEAR(st->closed_error);
    return 0;
}

/* DLL_PROCESS_DETACH: dropping the default Value detaches its block. */
static void module_free(void *module) { (void)module_clear((PyObject *)module); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL}};

static struct PyModuleDef shmemext_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmemext._shmemext",
    .m_doc = "Named shared-memory blocks with the lifetime of a DLL's shared section.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__shmemext(void) { return PyModuleDef_Init(&shmemext_module); }
