/* What the CPython glue's files share: the module state, the block object,
 * the handle guard as Python code meets it, and the argument parser.
 *
 *   module.c      the module: state, functions, the default block, exec
 *   py_block.c    what Value and Segment share: open, close, the guard, errors
 *   py_value.c    shmemext.Value
 *   py_segment.c  shmemext.Segment
 *   py_lock.c     shmemext.SegmentLock
 *   py_queue.c    shmemext.Queue
 *   py_args.c     the one argument parser and the converters
 *   py_watch.c    the doorbell and the wait on many Values under wait_async()
 *   capi.c        the C API table
 */
#ifndef SHMEMEXT_GLUE_H
#define SHMEMEXT_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "capi.h"
#include "segment.h"

/* Copies at least this large run with the GIL released. */
#define SHX_PY_LARGE_COPY (64 * 1024)

typedef struct {
    PyTypeObject *value_type;
    PyTypeObject *segment_type;
    PyTypeObject *lock_type;
    PyTypeObject *bell_type;
    PyTypeObject *queue_type;
    /* What a Queue needs of the standard library, imported by the first
     * Queue (under queue_support_lock): queue.Full, queue.Empty,
     * pickle.dumps, pickle.loads. */
    PyObject *queue_full;
    PyObject *queue_empty;
    PyObject *pickle_dumps;
    PyObject *pickle_loads;
    PyObject *default_value; /* a Value, or NULL when disabled */
    /* shmemext.Error (a ValueError) and its subclasses. */
    PyObject *error;
    PyObject *foreign_error; /* the name holds something this shmemext cannot read */
    PyObject *corrupt_error; /* a block of ours whose header or value is not well formed */
    PyObject *closed_error;  /* the handle was closed */
} module_state;

/* A short per-object lock for state that several fields make up.  Without a
 * free-threaded build (3.12 and older) the GIL already serializes it. */
#if PY_VERSION_HEX >= 0x030D0000
typedef PyMutex shx_py_mutex;
#define SHX_PY_LOCK(m)   PyMutex_Lock(m)
#define SHX_PY_UNLOCK(m) PyMutex_Unlock(m)
#else
typedef struct {
    char unused;
} shx_py_mutex;
#define SHX_PY_LOCK(m)   ((void)(m))
#define SHX_PY_UNLOCK(m) ((void)(m))
#endif

/* A Value or a Segment: one attachment.  Every use of its mapping is inside
 * shx_py_enter/shx_py_leave (block.guard); close() goes through the guard. */
typedef struct {
    PyObject_HEAD
    shx_block block;
    int readonly;
    /* Whether a thread of this process holds the segment's lock through a
     * SegmentLock (at most one can: it is a mutex), which thread, a weak
     * reference that dies with that thread, and the lock object (for identity
     * only: it may be gone while the thread holds on).  Under `mutex`. */
    shx_py_mutex mutex;
    int lock_held;
    unsigned long lock_thread;
    PyObject *lock_thread_alive;
    void *lock_holder;
} BlockObject;

/* ---- module state and errors (py_block.c) ---- */

module_state *shx_py_state_of_type(PyTypeObject *type);
/* Raises the exception for a core error about block `name`; returns NULL.
 * st gives shmemext.Error and its subclasses (NULL: plain ValueError). */
PyObject *shx_py_raise(module_state *st, const shx_error *err, const char *name);
#define shx_py_raise_block(self, err) shx_py_raise(shx_py_state_of_type(Py_TYPE(self)), (err), (self)->block.name)
const char *shx_py_type_label(const BlockObject *self);

/* ---- the guard (py_block.c) ---- */

/* 0: entered; -1 with ClosedError when the block is closed or closing. */
int shx_py_enter(BlockObject *self);
/* 1: entered an attached block; 0: not, and nothing is raised or waited for. */
int shx_py_enter_quietly(BlockObject *self);
/* 0 while the block is open; -1 with ClosedError after close(). */
int shx_py_check_open(BlockObject *self);
/* Leaves; the outermost call of a thread whose close() was deferred detaches. */
void shx_py_leave(BlockObject *self);
/* How many of this thread's calls on a block object are suspended where
 * Python code runs (for the C API, which must not wait for its own close). */
long shx_py_own_calls(const void *owner);

/* Where Python code may run inside a call (a signal handler, a finalizer),
 * so that a close() from that code knows the call is its own thread's. */
typedef struct shx_py_reentry {
    const BlockObject *block;
    struct shx_py_reentry *prev;
} shx_py_reentry;
void shx_py_reentry_begin(shx_py_reentry *r, const BlockObject *block);
void shx_py_reentry_end(shx_py_reentry *r);
int shx_py_reentry_init(void);

/* Core hooks for a call inside the guard: the GIL released for long work,
 * signals and close() from another thread ending lock waits. */
typedef struct {
    PyThreadState *saved;
    BlockObject *block;
    int closing; /* a lock wait ended because a close() began: retry once it is decided */
} shx_py_release;
void shx_py_gil_begin(void *ctx);
void shx_py_gil_end(void *ctx);
int shx_py_wait_interrupted(void *ctx);
#define SHX_PY_HOOKS(release, self)                                                                                    \
    {                                                                                                                  \
        shx_py_gil_begin, shx_py_gil_end, ((release).block = (self), (release).closing = 0, &(release)),               \
            SHX_PY_LARGE_COPY, shx_py_wait_interrupted                                                                 \
    }
/* Whether a call that ended with rc should run again: its lock wait gave
 * way to a close() that was then given up (shx_py_enter decides). */
#define SHX_PY_RETRY(rc, release) ((rc) == SHX_E_INTERRUPTED && (release).closing && !PyErr_Occurred())

/* Signals pending, run inside a call (a re-entry point); -1 with the exception. */
int shx_py_check_signals(BlockObject *self);

/* The open flags for the keywords persist= and create=. */
static inline unsigned shx_py_open_flags(int persist, int create)
{
    return (persist ? SHX_PERSIST : 0u) | (create ? 0u : SHX_EXISTING);
}
/* Allocates the object and attaches it; flags SHX_PERSIST, SHX_EXISTING. */
PyObject *shx_py_block_new(PyTypeObject *type, const char *name, uint32_t kind, uint64_t size, unsigned flags, int mode,
                           int readonly, const char *scope, const char *security);
void shx_py_block_dealloc(BlockObject *self);
int shx_py_block_traverse(PyObject *self, visitproc visit, void *arg);

PyObject *shx_py_block_close(BlockObject *self, PyObject *ignored);
PyObject *shx_py_block_enter(BlockObject *self, PyObject *ignored);
PyObject *shx_py_block_exit(BlockObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *shx_py_block_get_holders(BlockObject *self, void *closure);
PyObject *shx_py_block_get_name(BlockObject *self, void *closure);
PyObject *shx_py_block_get_size(BlockObject *self, void *closure);
PyObject *shx_py_block_get_created(BlockObject *self, void *closure);
PyObject *shx_py_block_get_closed(BlockObject *self, void *closure);
PyObject *shx_py_block_get_persist(BlockObject *self, void *closure);
PyObject *shx_py_block_get_inflight(BlockObject *self, void *closure);
/* An int, or None for a count the OS cannot tell (-1). */
PyObject *shx_py_optional_int(int64_t value);

/* The segment lock's holder, as SegmentLock records it (under self->mutex). */
int shx_py_note_lock_holder(BlockObject *self, void *holder);
void shx_py_forget_lock_holder(BlockObject *self);

#define SHX_PY_BLOCK_METHODS                                                                                           \
    {"close", (PyCFunction)shx_py_block_close, METH_NOARGS,                                                            \
     "close($self, /)\n--\n\nDetach from the block. The last process to detach releases it. Idempotent."},             \
        {"__enter__", (PyCFunction)shx_py_block_enter, METH_NOARGS, NULL},                                             \
    {                                                                                                                  \
        "__exit__", (PyCFunction)(void (*)(void))shx_py_block_exit, METH_FASTCALL, NULL                                \
    }

#define SHX_PY_BLOCK_GETSET                                                                                            \
    {"name", (getter)shx_py_block_get_name, NULL, "The block's name.", NULL},                                          \
        {"created", (getter)shx_py_block_get_created, NULL, "True if this process created (or re-created) the block.", \
         NULL},                                                                                                        \
        {"closed", (getter)shx_py_block_get_closed, NULL, "True after close().", NULL},                                \
        {"persist", (getter)shx_py_block_get_persist, NULL, "True if the block outlives its last process.", NULL},     \
        {"holders", (getter)shx_py_block_get_holders, NULL,                                                            \
         "How many attachments the block has, this one included (a fork() child's counts), or None\n"                  \
         "where the OS cannot tell.",                                                                                  \
         NULL},                                                                                                        \
    {                                                                                                                  \
        "_inflight", (getter)shx_py_block_get_inflight, NULL,                                                          \
            "Calls using the block now, in any thread (0 when none: what close() waits for).", NULL                    \
    }

/* ---- the types ---- */

extern PyType_Spec shx_py_value_spec;
extern PyType_Spec shx_py_segment_spec;
extern PyType_Spec shx_py_lock_spec;
extern PyType_Spec shx_py_bell_spec;
extern PyType_Spec shx_py_queue_spec;
/* ---- waiting on many Values (py_watch.c) ---- */
PyObject *shx_py_wait_any(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *shx_py_value_get(BlockObject *self);
/* Where a get copies to (py_value.c): a new str of the stored width, bytes,
 * or a bytearray for a framed pickle.  failed: the last call raised. */
typedef struct {
    PyObject *obj;
    int failed;
} shx_py_dst;
void *shx_py_prepare_dst(void *ctx, uint32_t type, size_t nbytes);
int shx_py_value_set(BlockObject *self, PyObject *value);
/* The same while `expect` is the committed version: 0 with *written set, 1
 * when another set() came first (nothing written), -1 with an exception. */
int shx_py_value_set_if(BlockObject *self, PyObject *value, uint64_t expect, uint64_t *written);
PyObject *shx_py_value_wait(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
PyObject *shx_py_lock_new(BlockObject *segment, double timeout);

/* ---- arguments (py_args.c) ---- */

/* A call's signature: `n` parameters named names[], the first `required`
 * required, the first `positional` accepted by position (the rest keyword-only). */
typedef struct {
    const char *fname;
    const char *const *names;
    int n;
    int required;
    int positional;
} shx_py_sig;

/* Into vals[] (NULL when absent), from a fastcall or from tp_new's tuple and dict. */
int shx_py_parse(const shx_py_sig *sig, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject *vals[]);
int shx_py_parse_tuple(const shx_py_sig *sig, PyObject *args, PyObject *kwds, PyObject *vals[]);

/* Converters: 0, or -1 with TypeError/ValueError naming the argument and the limit. */
const char *shx_py_name_arg(PyObject *arg, const char *what);
int shx_py_size_arg(PyObject *arg, const char *what, int none_ok, uint64_t *out);
int shx_py_bool_arg(PyObject *arg, int *out);
int shx_py_mode_arg(PyObject *arg, int *out);
int shx_py_opt_str_arg(PyObject *arg, const char *what, const char **out);
int shx_py_timeout_arg(const char *fname, PyObject *obj, double *timeout);
int shx_py_index_arg(PyObject *arg, const char *what, Py_ssize_t *out);
/* Calls shmemext._aio.fname(self, *args, **kwargs): the async methods, written in Python. */
PyObject *shx_py_call_aio(const char *fname, PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames);
/* The next wait slice in ns toward a deadline `timeout` s (< 0: none) after start; 0 once passed. */
int64_t shx_py_next_slice(double timeout, uint64_t start);

#endif
