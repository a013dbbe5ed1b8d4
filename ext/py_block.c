/* What Value and Segment share: errors, the handle guard as Python meets it,
 * open, close and the common attributes. */
#include "glue.h"

#include <string.h>

/* ---- errors ---------------------------------------------------------------- */

module_state *shx_py_state_of_type(PyTypeObject *type) { return (module_state *)PyType_GetModuleState(type); }

const char *shx_py_type_label(const BlockObject *self)
{
    return self->block.kind == SHX_KIND_SEGMENT ? "Segment" : self->block.kind == SHX_KIND_QUEUE ? "Queue" : "Value";
}

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

PyObject *shx_py_raise(module_state *st, const shx_error *err, const char *name)
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
    case SHX_E_NOTOWNER: return raise_os_error(PyExc_PermissionError, EACCES, msg, name);
    case SHX_E_NOTFOUND: return raise_os_error(PyExc_FileNotFoundError, ENOENT, msg, name);
    case SHX_E_NAME: return PyErr_Format(st ? st->error : PyExc_ValueError, "invalid block name '%s': %s", name, msg);
    case SHX_E_TIMEOUT: return PyErr_Format(PyExc_TimeoutError, "block '%s': %s", name, msg);
    case SHX_E_INTERRUPTED:
        if (PyErr_Occurred()) /* the signal handler's exception */
            return NULL;
        return PyErr_Format(PyExc_InterruptedError, "block '%s': %s", name, msg);
    case SHX_E_FOREIGN:
    case SHX_E_NEWER: return PyErr_Format(st ? st->foreign_error : PyExc_ValueError, "block '%s': %s", name, msg);
    case SHX_E_CORRUPT:
    case SHX_E_BADVALUE: return PyErr_Format(st ? st->corrupt_error : PyExc_ValueError, "block '%s': %s", name, msg);
    case SHX_E_CLOSED: return PyErr_Format(st ? st->closed_error : PyExc_ValueError, "block '%s': %s", name, msg);
    default: return PyErr_Format(st ? st->error : PyExc_ValueError, "block '%s': %s", name, msg);
    }
}

/* ---- re-entry points ---------------------------------------------------------- */

/* Each thread's re-entry points under way, innermost first, kept in a
 * thread-specific slot made once per process (by whichever interpreter
 * imports first). */
static Py_tss_t reentry_key = Py_tss_NEEDS_INIT;
static atomic_int reentry_key_state; /* 0: not made, 1: being made, 2: made, 3: failed */
static void own_calls_for_fork(const void *owner, long *inflight, long *serialized);

int shx_py_reentry_init(void)
{
    int expected = 0;
    if (atomic_compare_exchange_strong(&reentry_key_state, &expected, 1))
        atomic_store(&reentry_key_state, PyThread_tss_create(&reentry_key) == 0 ? 2 : 3);
    while (atomic_load(&reentry_key_state) == 1) {
        Py_BEGIN_ALLOW_THREADS
        shx_os_pause_briefly();
        Py_END_ALLOW_THREADS
    }
    if (atomic_load(&reentry_key_state) != 2) {
        PyErr_SetString(PyExc_RuntimeError, "cannot make a thread-specific storage key");
        return -1;
    }
    shx_core_set_own_calls(own_calls_for_fork);
    return 0;
}

void shx_py_reentry_begin(shx_py_reentry *r, const BlockObject *block)
{
    r->block = block;
    r->prev = (shx_py_reentry *)PyThread_tss_get(&reentry_key);
    (void)PyThread_tss_set(&reentry_key, r);
}

void shx_py_reentry_end(shx_py_reentry *r) { (void)PyThread_tss_set(&reentry_key, r->prev); }

/* How many calls of this thread's on the block are suspended at a re-entry
 * point: a close() running now runs inside each of them. */
static long own_calls(const BlockObject *block)
{
    long n = 0;
    for (const shx_py_reentry *r = (const shx_py_reentry *)PyThread_tss_get(&reentry_key); r != NULL; r = r->prev)
        n += r->block == block;
    return n;
}

int shx_py_check_signals(BlockObject *self)
{
    shx_py_reentry r;
    shx_py_reentry_begin(&r, self);
    int rc = PyErr_CheckSignals();
    shx_py_reentry_end(&r);
    return rc;
}

/* ---- GIL hooks -------------------------------------------------------------- */

void shx_py_gil_begin(void *ctx) { ((shx_py_release *)ctx)->saved = PyEval_SaveThread(); }
void shx_py_gil_end(void *ctx) { PyEval_RestoreThread(((shx_py_release *)ctx)->saved); }

/* Between lock-wait slices, with the GIL held: a pending KeyboardInterrupt
 * (or any exception a signal handler raises), or a close() from another
 * thread, ends the wait. */
int shx_py_wait_interrupted(void *ctx)
{
    shx_py_release *release = (shx_py_release *)ctx;
    if (shx_py_check_signals(release->block) < 0)
        return 1;
    if (shx_guard_closing(&release->block->block.guard)) {
        release->closing = 1; /* the caller leaves, then learns whether the close went through */
        return 1;
    }
    return 0;
}

/* For an open or a detach, whose block is not in use: signals only. */
static int signals_pending(void *ctx)
{
    (void)ctx;
    return PyErr_CheckSignals() < 0;
}

static void pause_without_gil(void *ctx)
{
    (void)ctx;
    Py_BEGIN_ALLOW_THREADS
    shx_os_pause_briefly();
    Py_END_ALLOW_THREADS
}

/* A closer waiting for the calls in flight: watchers of wait_async() that
 * sleep on the block are woken, not waited out. */
static void nudge_and_pause(void *ctx)
{
    shx_value_nudge_watchers(&((BlockObject *)ctx)->block);
    pause_without_gil(NULL);
}

/* ---- the guard ------------------------------------------------------------------ */

static PyObject *raise_closed(BlockObject *self)
{
    module_state *st = shx_py_state_of_type(Py_TYPE(self));
    return PyErr_Format(st ? st->closed_error : PyExc_ValueError, "%s '%s' is closed", shx_py_type_label(self),
                        self->block.name);
}

/* Python's calls and close() of a block hold its interpreter's GIL: they are
 * the guard's serialized callers.  Without a GIL they count atomically. */
#ifdef Py_GIL_DISABLED
#define guard_enter shx_guard_enter
#define guard_leave shx_guard_leave
#else
#define guard_enter shx_guard_enter_serialized
#define guard_leave shx_guard_leave_serialized
#endif

/* A call that finds a close() under way waits for its outcome: closed, it
 * raises ClosedError; given up (something still used the block), it goes on,
 * so that a close() that is refused never fails the calls around it.  Not
 * from inside a call of this thread on the block (a signal handler's), nor
 * once the close waits for such a call: that would wait for itself. */
int shx_py_enter(BlockObject *self)
{
    shx_guard *g = &self->block.guard;
    while (!guard_enter(g)) {
        if (shx_guard_closed(g) || atomic_load(&g->deferred) || own_calls(self) > 0)
            goto closed;
        if (!shx_guard_settle_inherited(g))
            pause_without_gil(NULL);
    }
    if (self->block.attached)
        return 0;
    guard_leave(g); /* detached at exit */
closed:
    raise_closed(self);
    return -1;
}

int shx_py_enter_quietly(BlockObject *self)
{
    if (!guard_enter(&self->block.guard))
        return 0;
    if (self->block.attached)
        return 1;
    guard_leave(&self->block.guard);
    return 0;
}

int shx_py_check_open(BlockObject *self)
{
    if (shx_py_enter(self) < 0)
        return -1;
    shx_py_leave(self);
    return 0;
}

long shx_py_own_calls(const void *owner) { return own_calls((const BlockObject *)owner); }

/* For a fork() child (shx_core_set_own_calls): this thread's calls are
 * counted where guard_enter counts them. */
static void own_calls_for_fork(const void *owner, long *inflight, long *serialized)
{
    long n = own_calls((const BlockObject *)owner);
#ifdef Py_GIL_DISABLED
    *inflight = n;
    *serialized = 0;
#else
    *inflight = 0;
    *serialized = n;
#endif
}

static void finish_deferred_close(BlockObject *self);

void shx_py_leave(BlockObject *self)
{
    guard_leave(&self->block.guard);
    if (atomic_load(&self->block.guard.deferred) && own_calls(self) == 0)
        finish_deferred_close(self);
}

/* ---- the lock holder ------------------------------------------------------------ */

/* Something that lives exactly as long as the calling thread: an object in
 * its thread-state dict, which is cleared when the thread ends.  Borrowed. */
static PyObject *thread_token(void)
{
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no thread state dict");
        return NULL;
    }
    PyObject *token = PyDict_GetItemString(dict, "shmemext.thread"); /* borrowed; the dict is this thread's */
    if (token != NULL)
        return token;
    token = PySet_New(NULL); /* any object weak references can point to */
    if (token == NULL || PyDict_SetItemString(dict, "shmemext.thread", token) < 0) {
        Py_XDECREF(token);
        return NULL;
    }
    Py_DECREF(token);
    return token;
}

static int weakref_alive(PyObject *ref)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj;
    if (PyWeakref_GetRef(ref, &obj) <= 0) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(obj);
    return 1;
#else
    return PyWeakref_GetObject(ref) != Py_None;
#endif
}

int shx_py_note_lock_holder(BlockObject *self, void *holder)
{
    PyObject *token = thread_token();
    PyObject *alive = token ? PyWeakref_NewRef(token, NULL) : NULL;
    if (alive == NULL)
        return -1;
    SHX_PY_LOCK(&self->mutex);
    PyObject *old = self->lock_thread_alive;
    self->lock_held = 1;
    self->lock_holder = holder;
    self->lock_thread = PyThread_get_thread_ident();
    self->lock_thread_alive = alive;
    SHX_PY_UNLOCK(&self->mutex);
    Py_XDECREF(old);
    return 0;
}

/* Under self->mutex: no holder any more; returns the weak reference to drop after unlocking. */
static PyObject *clear_lock_holder(BlockObject *self)
{
    PyObject *old = self->lock_thread_alive;
    self->lock_held = 0;
    self->lock_holder = NULL;
    self->lock_thread_alive = NULL;
    return old;
}

void shx_py_forget_lock_holder(BlockObject *self)
{
    SHX_PY_LOCK(&self->mutex);
    PyObject *old = clear_lock_holder(self);
    SHX_PY_UNLOCK(&self->mutex);
    Py_XDECREF(old);
}

/* The thread of ours that holds the segment's lock and still runs, or 0.
 * One that ended holding it handed it on (the kernel marks it), so it is
 * forgotten here. */
static unsigned long live_lock_thread(BlockObject *self)
{
    PyObject *dead = NULL;
    unsigned long thread = 0;
    SHX_PY_LOCK(&self->mutex);
    if (self->lock_held && self->lock_thread_alive != NULL && weakref_alive(self->lock_thread_alive))
        thread = self->lock_thread;
    else
        dead = clear_lock_holder(self);
    SHX_PY_UNLOCK(&self->mutex);
    Py_XDECREF(dead);
    return thread;
}

/* -1 with the exception when something of this process still uses the block. */
static int refuse_close_in_use(BlockObject *self)
{
    long views = atomic_load(&self->block.guard.views), pins = atomic_load(&self->block.guard.pins);
    if (views > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close %s '%s': %ld exported buffer(s) (memoryview, NumPy array...) still use it",
                     shx_py_type_label(self), self->block.name, views);
        return -1;
    }
    if (pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close %s '%s': %ld C extension handle(s) (ShmemExtAPI->acquire) still hold it",
                     shx_py_type_label(self), self->block.name, pins);
        return -1;
    }
    unsigned long holder = live_lock_thread(self);
    if (holder == 0)
        return 0;
    if (holder == PyThread_get_thread_ident())
        PyErr_Format(PyExc_RuntimeError, "cannot close %s '%s' while this thread holds its lock; release it first",
                     shx_py_type_label(self), self->block.name);
    else
        PyErr_Format(PyExc_RuntimeError,
                     "cannot close %s '%s' while another thread of this process (%lu) holds "
                     "its lock; release it there first",
                     shx_py_type_label(self), self->block.name, holder);
    return -1;
}

/* ---- open and close -------------------------------------------------------------- */

static int scope_flag(const char *scope)
{
    if (scope == NULL || strcmp(scope, "session") == 0)
        return 0;
    if (strcmp(scope, "global") == 0)
        return SHX_GLOBAL;
    PyErr_Format(PyExc_ValueError, "scope must be 'session' or 'global', not '%s'", scope);
    return -1;
}

/* security= is an SDDL string for Windows; elsewhere permissions come from mode. */
static int check_security(const char *security)
{
#ifdef _WIN32
    (void)security;
    return 0;
#else
    if (security == NULL)
        return 0;
    PyErr_Format(PyExc_ValueError,
                 "security='%.100s' is a Windows SDDL descriptor; on this system use mode= "
                 "(e.g. mode=0o660) to share a block",
                 security);
    return -1;
#endif
}

PyObject *shx_py_block_new(PyTypeObject *type, const char *name, uint32_t kind, uint64_t size, unsigned flags, int mode,
                           int readonly, const char *scope_name, const char *security)
{
    int scope;
    if ((scope = scope_flag(scope_name)) < 0 || check_security(security) < 0)
        return NULL;
    BlockObject *self = (BlockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->readonly = readonly;
    /* A caller's own security descriptor says who may open the block: no owner check then. */
    flags |= ((mode & 077) == 0 && security == NULL ? SHX_PRIVATE_OWNER : 0) | (unsigned)scope;
    shx_error err;
    /* Without the GIL (creation may reserve much memory, and another
     * process may hold the attach gate), giving way to Ctrl-C meanwhile. */
    shx_py_release release = {NULL, self, 0};
    shx_hooks hooks = {shx_py_gil_begin, shx_py_gil_end, &release, 0, signals_pending};
    int rc = shx_block_open_hooked(&self->block, name, kind, size, flags, (unsigned)mode, security, &hooks, &err);
    self->block.owner = self;
    if (rc != SHX_OK) {
        /* The name is in the handle only once the open got that far. */
        shx_py_raise(shx_py_state_of_type(type), &err, name);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* Detaches, waiting for the attach gate (another process may hold it) without the GIL. */
static int detach_now(BlockObject *self, shx_error *err)
{
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shx_block_close(&self->block, 0, err);
    Py_END_ALLOW_THREADS
    return rc;
}

void shx_py_block_dealloc(BlockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    /* Nothing else refers to the object, so nothing uses the block. */
    shx_error err;
    (void)detach_now(self, &err);
    atomic_store(&self->block.guard.state, SHX_GUARD_CLOSED);
    Py_CLEAR(self->lock_thread_alive);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

int shx_py_block_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

/* The detach a close() from inside this thread's call left to that call. */
static void finish_deferred_close(BlockObject *self)
{
    if (!atomic_exchange(&self->block.guard.deferred, 0))
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb); /* the call's own outcome stands */
    int detached = 0;
    if (refuse_close_in_use(self) == 0) {
        shx_error ignored;
        detached = detach_now(self, &ignored) == SHX_OK;
    } else {
        PyErr_Clear();
    }
    shx_guard_close_end(&self->block.guard, detached || !self->block.attached);
    PyErr_Restore(type, value, tb);
}

PyObject *shx_py_block_close(BlockObject *self, PyObject *Py_UNUSED(ignored))
{
    shx_guard *g = &self->block.guard;
    /* Refused at once when the refusal is plain; checked again once drained. */
    if (!shx_guard_closing(g) && refuse_close_in_use(self) < 0)
        return NULL;
    /* DONE: closed already or by another closer.  DEFER: from a signal
     * handler inside a call of this thread, which detaches as it leaves. */
    shx_guard_waiter waiter = {nudge_and_pause, self};
    if (shx_guard_close(g, own_calls(self), &waiter) != SHX_GUARD_WON)
        Py_RETURN_NONE;
    if (refuse_close_in_use(self) < 0) { /* taken by a call that ended just now */
        shx_guard_close_end(g, 0);
        return NULL;
    }
    /* Waiting for another process's attach gate gives way to Ctrl-C; the
     * block stays attached then, and close() can be called again. */
    shx_error err;
    shx_py_release release = {NULL, self, 0};
    shx_hooks hooks = {shx_py_gil_begin, shx_py_gil_end, &release, 0, signals_pending};
    int rc = shx_block_close_hooked(&self->block, &hooks, &err);
    shx_guard_close_end(g, !self->block.attached);
    if (rc != SHX_OK)
        return shx_py_raise_block(self, &err);
    Py_RETURN_NONE;
}

PyObject *shx_py_block_enter(BlockObject *self, PyObject *Py_UNUSED(ignored))
{
    return shx_py_check_open(self) < 0 ? NULL : Py_NewRef(self);
}

PyObject *shx_py_block_exit(BlockObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return shx_py_block_close(self, NULL);
}

PyObject *shx_py_optional_int(int64_t value) { return value < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(value); }

PyObject *shx_py_block_get_holders(BlockObject *self, void *Py_UNUSED(c))
{
    if (shx_py_enter(self) < 0)
        return NULL;
    int64_t count = -1;
    shx_error err;
    int rc = shx_block_holders(&self->block, &count, &err);
    shx_py_leave(self);
    if (rc != SHX_OK)
        return shx_py_raise_block(self, &err);
    return shx_py_optional_int(count);
}

PyObject *shx_py_block_get_name(BlockObject *self, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(self->block.name);
}

PyObject *shx_py_block_get_size(BlockObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->block.capacity);
}

PyObject *shx_py_block_get_created(BlockObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->block.created);
}

PyObject *shx_py_block_get_closed(BlockObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(shx_guard_closed(&self->block.guard));
}

PyObject *shx_py_block_get_persist(BlockObject *self, void *Py_UNUSED(c))
{
    if (shx_py_enter(self) < 0)
        return NULL;
    int persist = shx_block_is_persistent(&self->block);
    shx_py_leave(self);
    return PyBool_FromLong(persist);
}

PyObject *shx_py_block_get_inflight(BlockObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(shx_guard_inflight(&self->block.guard));
}
