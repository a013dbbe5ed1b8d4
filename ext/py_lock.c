/* shmemext.SegmentLock: a Segment's cross-process lock, which survives its
 * holder's death (owner_died tells the next holder). */
#include "glue.h"

typedef struct {
    PyObject_HEAD
    BlockObject *segment;
    double timeout; /* seconds; < 0: wait forever */
    int owner_died;
} LockObject;

/* Takes the segment's lock, waiting at most `timeout` seconds (< 0: forever)
 * with the GIL released, in slices so that signals (Ctrl-C) and close() are
 * seen; records this thread as the holder before it leaves the guard, so
 * that a close() never misses a holder. */
static int acquire_block_lock(LockObject *lock, double timeout)
{
    BlockObject *seg = lock->segment;
    if (shx_py_enter(seg) < 0)
        return -1;
    shx_error err;
    int owner_died = 0;
    int rc = shx_block_lock(&seg->block, 0, &owner_died, NULL, &err);
    uint64_t start = rc == SHX_E_TIMEOUT ? shx_os_monotonic_ns() : 0;
    while (rc == SHX_E_TIMEOUT) {
        int64_t wait = shx_py_next_slice(timeout, start);
        if (wait == 0) {
            shx_py_leave(seg);
            char secs[32];
            snprintf(secs, sizeof secs, "%g", timeout);
            PyErr_Format(PyExc_TimeoutError, "timed out after %s s waiting for the lock of Segment '%s'", secs,
                         seg->block.name);
            return -1;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = shx_block_lock(&seg->block, wait, &owner_died, NULL, &err);
        Py_END_ALLOW_THREADS
        if (rc == SHX_E_TIMEOUT && shx_py_check_signals(seg) < 0) {
            shx_py_leave(seg);
            return -1;
        }
        if (rc == SHX_OK && shx_guard_closing(&seg->block.guard)) {
            /* Won just as close() began: give it back, so that close() goes on. */
            shx_error ignored;
            (void)shx_block_unlock(&seg->block, &ignored);
            rc = SHX_E_TIMEOUT;
        }
        if (rc == SHX_E_TIMEOUT && shx_guard_closing(&seg->block.guard)) {
            /* Out of the close()'s way; back in if it was given up. */
            shx_py_leave(seg);
            if (shx_py_enter(seg) < 0)
                return -1;
        }
    }
    if (rc == SHX_OK && shx_guard_closing(&seg->block.guard)) {
        /* Won at the first try as close() began: the same. */
        shx_error ignored;
        (void)shx_block_unlock(&seg->block, &ignored);
        shx_py_leave(seg);
        return shx_py_check_open(seg) < 0 ? -1 : acquire_block_lock(lock, timeout);
    }
    if (rc == SHX_OK && shx_py_note_lock_holder(seg, lock) < 0) {
        shx_error ignored;
        (void)shx_block_unlock(&seg->block, &ignored);
        shx_py_leave(seg);
        return -1;
    }
    /* The death of any holder since the last acquirer was told, however
     * many acquires gave the lock back untold meanwhile. */
    if (rc == SHX_OK)
        owner_died = shx_block_take_owner_died(&seg->block);
    shx_py_leave(seg);
    if (rc == SHX_E_OS && err.os_error == EDEADLK) {
        PyErr_Format(PyExc_RuntimeError, "this thread already holds the lock of Segment '%s' (it is not re-entrant)",
                     seg->block.name);
        return -1;
    }
    if (rc != SHX_OK) {
        shx_py_raise_block(seg, &err);
        return -1;
    }
    /* A holder recorded here but found dead by the kernel was a thread of ours that ended. */
    lock->owner_died = owner_died;
    return 0;
}

static PyObject *lock_acquire(LockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"timeout"};
    static const shx_py_sig sig = {"acquire", names, 1, 0, 1};
    PyObject *v[1];
    double timeout = self->timeout;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || (v[0] && shx_py_timeout_arg("acquire", v[0], &timeout) < 0))
        return NULL;
    if (acquire_block_lock(self, timeout) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *lock_release(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    BlockObject *seg = self->segment;
    if (shx_py_enter(seg) < 0)
        return NULL;
    shx_error err;
    int rc = shx_block_unlock(&seg->block, &err);
    if (rc == SHX_OK)
        shx_py_forget_lock_holder(seg);
    shx_py_leave(seg);
    if (rc != SHX_OK) {
        if (err.status == SHX_E_OS && err.os_error == EPERM)
            return PyErr_Format(PyExc_RuntimeError, "the lock of Segment '%s' is not held by this thread",
                                seg->block.name);
        return shx_py_raise_block(seg, &err);
    }
    Py_RETURN_NONE;
}

static PyObject *lock_enter(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (acquire_block_lock(self, self->timeout) < 0)
        return NULL;
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
    if (seg == NULL)
        return;
    SHX_PY_LOCK(&seg->mutex);
    int mine = seg->lock_holder == (void *)self;
    int held_here = mine && seg->lock_held && seg->lock_thread == PyThread_get_thread_ident();
    if (mine)
        seg->lock_holder = NULL;
    SHX_PY_UNLOCK(&seg->mutex);
    if (!held_here || !shx_py_enter_quietly(seg))
        return;
    shx_error err;
    if (shx_block_unlock(&seg->block, &err) == SHX_OK)
        shx_py_forget_lock_holder(seg);
    shx_py_leave(seg);
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

PyObject *shx_py_lock_new(BlockObject *segment, double timeout)
{
    module_state *st = shx_py_state_of_type(Py_TYPE(segment));
    LockObject *lock = PyObject_GC_New(LockObject, st->lock_type);
    if (lock == NULL)
        return NULL;
    lock->segment = (BlockObject *)Py_NewRef(segment);
    lock->timeout = timeout;
    lock->owner_died = 0;
    PyObject_GC_Track(lock);
    return (PyObject *)lock;
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, /, timeout=None)\n--\n\nTake the lock, waiting at most timeout seconds (TimeoutError after).\n"
     "Returns True. Afterwards owner_died tells whether the previous holder died holding it."},
    {"release", (PyCFunction)lock_release, METH_NOARGS,
     "release($self, /)\n--\n\nRelease the lock (held by this thread)."},
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))lock_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef lock_getset[] = {
    {"owner_died", (getter)lock_get_owner_died, NULL,
     "True if a holder died holding the lock since the last acquire() that reported one\n"
     "(this one's predecessor, usually): the data it guarded may be half-updated.",
     NULL},
    {"segment", (getter)lock_get_segment, NULL, "The Segment this lock belongs to.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot lock_slots[] = {{Py_tp_dealloc, lock_dealloc},
                                   {Py_tp_traverse, lock_traverse},
                                   {Py_tp_clear, lock_clear},
                                   {Py_tp_methods, lock_methods},
                                   {Py_tp_getset, lock_getset},
                                   {Py_tp_doc, (void *)"A Segment's cross-process lock; made by Segment.lock()."},
                                   {0, NULL}};

PyType_Spec shx_py_lock_spec = {
    .name = "shmemext.SegmentLock",
    .basicsize = sizeof(LockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = lock_slots,
};
