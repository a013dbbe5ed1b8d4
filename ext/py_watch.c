/* What shmemext/_aio.py builds its watcher threads on: a doorbell, and one
 * wait on many Values.  The threads themselves, and handing versions to
 * event loops, are Python (shmemext/_aio.py says how). */
#include "glue.h"

typedef struct {
    PyObject_HEAD
    shx_os_bell bell; /* zeroed by tp_alloc, which shx_os_bell_free accepts */
} BellObject;

static PyObject *bell_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "_Bell() takes no arguments");
        return NULL;
    }
    BellObject *self = (BellObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    shx_error err;
    if (shx_os_bell_init(&self->bell, &err) != SHX_OK) {
        Py_DECREF(self);
        return shx_py_raise(NULL, &err, "(bell)");
    }
    return (PyObject *)self;
}

static void bell_dealloc(BellObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    shx_os_bell_free(&self->bell);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *bell_ring(BellObject *self, PyObject *Py_UNUSED(ignored))
{
    shx_os_bell_ring(&self->bell);
    Py_RETURN_NONE;
}

static PyObject *bell_get_rings(BellObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(shx_os_bell_rings(&self->bell));
}

static PyMethodDef bell_methods[] = {
    {"ring", (PyCFunction)bell_ring, METH_NOARGS, "ring($self, /)\n--\n\nEnd the bell's current or next _wait_any."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef bell_getset[] = {{"rings", (getter)bell_get_rings, NULL,
                                     "A count to give _wait_any: read it before choosing what to wait for.", NULL},
                                    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot bell_slots[] = {{Py_tp_new, bell_new},
                                   {Py_tp_dealloc, bell_dealloc},
                                   {Py_tp_methods, bell_methods},
                                   {Py_tp_getset, bell_getset},
                                   {Py_tp_doc, (void *)"A doorbell that ends another thread's _wait_any."},
                                   {0, NULL}};

PyType_Spec shx_py_bell_spec = {
    .name = "shmemext._Bell",
    .basicsize = sizeof(BellObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = bell_slots,
};

/* _wait_any(values, versions, bell, rings, timeout[, room]) -> list of the
 * indexes of values closed or being closed (then nothing was waited for: the caller
 * learns the outcome from any call on them), or [] after the wait:
 * a version moved, the bell rang, or timeout seconds passed.  The GIL is
 * released while it sleeps; each Value is held open meanwhile, and a close()
 * of one wakes it (shx_value_nudge_watchers).  room, a tuple of bools as
 * long as values, asks for room in each Queue where it is true: versions[i]
 * is then the queue's _taken. */
PyObject *shx_py_wait_any(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    module_state *st = (module_state *)PyModule_GetState(module);
    if (nargs != 5 && nargs != 6) {
        PyErr_Format(PyExc_TypeError, "_wait_any() takes 5 or 6 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyTuple_Check(args[0]) || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[0]) != PyTuple_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_wait_any() takes a tuple of Values and a tuple of versions of one length");
        return NULL;
    }
    if (!PyObject_TypeCheck(args[2], st->bell_type)) {
        PyErr_SetString(PyExc_TypeError, "_wait_any() argument 3 must be a _Bell");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args[0]);
    if (n > SHX_WAIT_ANY_MAX) {
        PyErr_Format(PyExc_ValueError, "_wait_any() waits on at most %d Values, not %zd", SHX_WAIT_ANY_MAX, n);
        return NULL;
    }
    unsigned long rung = PyLong_AsUnsignedLong(args[3]);
    double timeout = PyFloat_AsDouble(args[4]);
    if ((rung == (unsigned long)-1 || timeout == -1) && PyErr_Occurred())
        return NULL;
    /* room=() (its default) asks for no room at all. */
    int with_room = nargs == 6 && !(PyTuple_Check(args[5]) && PyTuple_GET_SIZE(args[5]) == 0);
    if (with_room && (!PyTuple_Check(args[5]) || PyTuple_GET_SIZE(args[5]) != n)) {
        PyErr_SetString(PyExc_TypeError, "_wait_any() argument 6 must be () or a tuple of bools as long as the Values");
        return NULL;
    }
    BlockObject *values[SHX_WAIT_ANY_MAX];
    shx_block *blocks[SHX_WAIT_ANY_MAX];
    uint64_t seen[SHX_WAIT_ANY_MAX];
    unsigned char room[SHX_WAIT_ANY_MAX] = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(args[0], i);
        if (!PyObject_TypeCheck(v, st->value_type) && !PyObject_TypeCheck(v, st->queue_type)) {
            PyErr_Format(PyExc_TypeError, "_wait_any() waits on Values and Queues, not %.100s", Py_TYPE(v)->tp_name);
            return NULL;
        }
        values[i] = (BlockObject *)v;
        blocks[i] = &values[i]->block;
        seen[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args[1], i));
        if (seen[i] == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        if (with_room) {
            int wants = PyObject_IsTrue(PyTuple_GET_ITEM(args[5], i));
            if (wants < 0)
                return NULL;
            if (wants && !PyObject_TypeCheck(v, st->queue_type)) {
                PyErr_Format(PyExc_TypeError, "_wait_any() waits for room in Queues, not %.100s", Py_TYPE(v)->tp_name);
                return NULL;
            }
            room[i] = (unsigned char)wants;
        }
    }
    PyObject *closed = PyList_New(0);
    if (closed == NULL)
        return NULL;
    Py_ssize_t entered = 0;
    for (; entered < n; entered++) {
        if (!shx_py_enter_quietly(values[entered]))
            break;
    }
    if (entered < n) {
        for (Py_ssize_t i = 0; i < entered; i++)
            shx_py_leave(values[i]);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (shx_guard_closing(&values[i]->block.guard) || !values[i]->block.attached) {
                PyObject *index = PyLong_FromSsize_t(i);
                if (index == NULL || PyList_Append(closed, index) < 0) {
                    Py_XDECREF(index);
                    Py_DECREF(closed);
                    return NULL;
                }
                Py_DECREF(index);
            }
        }
        return closed;
    }
    shx_error err;
    int rc;
    int64_t timeout_ns = timeout > 3600 ? INT64_C(3600000000000) : timeout > 0 ? (int64_t)(timeout * 1e9) : 0;
    Py_BEGIN_ALLOW_THREADS
    rc = shx_wait_any(blocks, room, seen, (size_t)n, &((BellObject *)args[2])->bell, (uint32_t)rung, timeout_ns, &err);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        shx_py_leave(values[i]);
    if (rc != SHX_OK && rc != SHX_E_TIMEOUT) {
        Py_DECREF(closed);
        return shx_py_raise(st, &err, n > 0 ? blocks[0]->name : "");
    }
    return closed;
}
