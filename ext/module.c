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
#include <string.h>
#ifndef _WIN32
#include <unistd.h>
#endif

#include "segment.h"

#ifndef SHMEMEXT_VERSION
#error "setup.py defines SHMEMEXT_VERSION"
#endif

/* Copies at least this large run with the GIL released. */
#define LARGE_COPY (64 * 1024)

typedef struct {
    PyTypeObject *value_type;
    PyObject *default_value;   /* a Value, or NULL when disabled */
} module_state;

typedef struct {
    PyObject_HEAD
    shx_block block;
    int busy;   /* calls in progress that may run without the GIL */
} ValueObject;

static inline module_state *get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* ---- errors -------------------------------------------------------------- */

/* Raises the exception for a core error about block `name`; returns NULL. */
static PyObject *raise_block_error(const shx_error *err, const char *name)
{
    char msg[512];
    shx_strerror(err, msg, sizeof msg);
    switch (err->status) {
    case SHX_E_OS:
        if (err->op == NULL)
            return PyErr_NoMemory();
        /* OSError(errno, text, filename) picks the subclass for the errno. */
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iss", err->os_error, msg, name);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    case SHX_E_NOTOWNER: {
        PyObject *perm = PyObject_CallFunction(PyExc_PermissionError, "iss", 13, msg, name);
        if (perm != NULL) {
            PyErr_SetObject(PyExc_PermissionError, perm);
            Py_DECREF(perm);
        }
        return NULL;
    }
    case SHX_E_NAME:
        return PyErr_Format(PyExc_ValueError, "invalid block name '%s': %s", name, msg);
    case SHX_E_TIMEOUT:
        return PyErr_Format(PyExc_TimeoutError, "block '%s': %s", name, msg);
    default:
        return PyErr_Format(PyExc_ValueError, "block '%s': %s", name, msg);
    }
}

/* ---- GIL hooks -------------------------------------------------------------- */

typedef struct {
    PyThreadState *saved;
} gil_release;

static void gil_begin(void *ctx) { ((gil_release *)ctx)->saved = PyEval_SaveThread(); }
static void gil_end(void *ctx) { PyEval_RestoreThread(((gil_release *)ctx)->saved); }

#define GIL_HOOKS(release) {gil_begin, gil_end, &(release), LARGE_COPY}

/* ---- argument helpers ---------------------------------------------------- */

/* The UTF-8 of a block name argument, or NULL with TypeError. */
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

/* A capacity argument: None -> 0 (the default, or the existing block's), else 1..max. */
static int capacity_arg(PyObject *arg, uint64_t *out)
{
    if (arg == NULL || arg == Py_None) {
        *out = 0;
        return 0;
    }
    if (!PyLong_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "capacity must be int or None, not %.100s", Py_TYPE(arg)->tp_name);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || v < 1 || (unsigned long long)v > SHX_MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "capacity %R is out of range: it must be between 1 and %llu bytes",
                     arg, (unsigned long long)SHX_MAX_CAPACITY);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* ---- Value ------------------------------------------------------------------- */

static int value_check_open(ValueObject *self)
{
    if (!self->block.attached) {
        PyErr_Format(PyExc_ValueError, "Value '%s' is closed", self->block.name);
        return -1;
    }
    return 0;
}

/* Maps a value type to the Python object that receives it. */
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

static PyObject *value_get_impl(ValueObject *self)
{
    if (value_check_open(self) < 0)
        return NULL;
    value_dst dst = {NULL};
    gil_release release;
    shx_hooks hooks = GIL_HOOKS(release);
    shx_error err;
    uint32_t type;
    size_t nbytes;
    self->busy++;
    int rc = shx_value_get(&self->block, prepare_dst, &dst, &hooks, &type, &nbytes, NULL, &err);
    self->busy--;
    if (rc == SHX_OK && type != SHX_TYPE_BYTES) {
        const void *data = PyBytes_Check(dst.obj) ? (const void *)PyBytes_AS_STRING(dst.obj)
                                                  : PyUnicode_DATA(dst.obj);
        rc = shx_value_check(type, data, nbytes, &err);
    }
    if (rc != SHX_OK) {
        Py_XDECREF(dst.obj);
        if (PyErr_Occurred())
            return NULL;
        return raise_block_error(&err, self->block.name);
    }
    return dst.obj;
}

static int value_set_impl(ValueObject *self, PyObject *value)
{
    if (value_check_open(self) < 0)
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
    shx_hooks hooks = GIL_HOOKS(release);
    shx_error err;
    self->busy++;
    int rc = shx_value_set(&self->block, type, data, nbytes, &hooks, &err);
    self->busy--;
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
    static char *kwlist[] = {"name", "capacity", "persist", "mode", NULL};
    PyObject *name_obj, *capacity_obj = Py_None;
    int persist = 0;
    int mode = 0600;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$pi:Value", kwlist, &name_obj, &capacity_obj,
                                     &persist, &mode))
        return NULL;
    const char *name = name_arg(name_obj, "name");
    if (name == NULL)
        return NULL;
    uint64_t capacity;
    if (capacity_arg(capacity_obj, &capacity) < 0)
        return NULL;
    if (mode < 0 || mode > 0777) {
        char text[32];
        snprintf(text, sizeof text, mode < 0 ? "%d" : "0o%o", mode);
        PyErr_Format(PyExc_ValueError, "mode %s is out of range: it must be between 0 and 0o777", text);
        return NULL;
    }
    ValueObject *self = (ValueObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    unsigned flags = (persist ? SHX_PERSIST : 0) | ((mode & 077) == 0 ? SHX_PRIVATE_OWNER : 0);
    shx_error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shx_block_open(&self->block, name, SHX_KIND_VALUE, capacity, flags, (unsigned)mode, &err);
    Py_END_ALLOW_THREADS
    if (rc != SHX_OK) {
        raise_block_error(&err, name);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void value_dealloc(ValueObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    shx_error err;
    (void)shx_block_close(&self->block, 0, &err);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int value_traverse(ValueObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static PyObject *value_get(ValueObject *self, PyObject *Py_UNUSED(ignored)) { return value_get_impl(self); }

static PyObject *value_set(ValueObject *self, PyObject *value)
{
    if (value_set_impl(self, value) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *value_close(ValueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy > 0) {
        PyErr_Format(PyExc_RuntimeError, "cannot close Value '%s' while another thread is using it",
                     self->block.name);
        return NULL;
    }
    shx_error err;
    if (shx_block_close(&self->block, 0, &err) != SHX_OK)
        return raise_block_error(&err, self->block.name);
    Py_RETURN_NONE;
}

static PyObject *value_enter(ValueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (value_check_open(self) < 0)
        return NULL;
    return Py_NewRef(self);
}

static PyObject *value_exit(ValueObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return value_close(self, NULL);
}

static PyObject *value_sole_holder(ValueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (value_check_open(self) < 0)
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

static PyObject *value_repr(ValueObject *self)
{
    if (!self->block.attached)
        return PyUnicode_FromFormat("<shmemext.Value name='%s' closed>", self->block.name);
    return PyUnicode_FromFormat("<shmemext.Value name='%s' capacity=%llu version=%llu%s>", self->block.name,
                                (unsigned long long)self->block.capacity,
                                (unsigned long long)shx_value_version(&self->block),
                                shx_block_is_persistent(&self->block) ? " persist" : "");
}

static PyObject *value_get_name(ValueObject *self, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(self->block.name);
}

static PyObject *value_get_capacity(ValueObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->block.capacity);
}

static PyObject *value_get_created(ValueObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->block.created);
}

static PyObject *value_get_closed(ValueObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(!self->block.attached);
}

static PyObject *value_get_version(ValueObject *self, void *Py_UNUSED(c))
{
    if (value_check_open(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(shx_value_version(&self->block));
}

static PyObject *value_get_persist(ValueObject *self, void *Py_UNUSED(c))
{
    if (value_check_open(self) < 0)
        return NULL;
    return PyBool_FromLong(shx_block_is_persistent(&self->block));
}

static PyMethodDef value_methods[] = {
    {"get", (PyCFunction)value_get, METH_NOARGS,
     "get($self, /)\n--\n\nReturn the committed value: str or bytes, as it was set. A never-written block gives ''."},
    {"set", (PyCFunction)value_set, METH_O,
     "set($self, value, /)\n--\n\nCommit value (str or a contiguous bytes-like object) for every process to see."},
    {"close", (PyCFunction)value_close, METH_NOARGS,
     "close($self, /)\n--\n\nDetach from the block. The last process to detach releases it. Idempotent."},
    {"__enter__", (PyCFunction)value_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))value_exit, METH_FASTCALL, NULL},
    {"_sole_holder", (PyCFunction)value_sole_holder, METH_NOARGS,
     "_sole_holder($self, /)\n--\n\nWhether no other process holds this block."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef value_getset[] = {
    {"name", (getter)value_get_name, NULL, "The block's name.", NULL},
    {"capacity", (getter)value_get_capacity, NULL, "The largest value in bytes (str: code units x width).", NULL},
    {"created", (getter)value_get_created, NULL, "True if this process created (or re-created) the block.", NULL},
    {"closed", (getter)value_get_closed, NULL, "True after close().", NULL},
    {"version", (getter)value_get_version, NULL, "How many values have been committed to the block.", NULL},
    {"persist", (getter)value_get_persist, NULL, "True if the block outlives its last process.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(value_doc,
"Value(name, capacity=None, *, persist=False, mode=0o600)\n--\n\n"
"A named value cell shared between processes.\n\n"
"The first process to open `name` creates it zero-filled with `capacity` bytes\n"
"(4096 when None); later ones take the existing block's capacity.  The block\n"
"lives while any process has it open, unless persist=True.");

static PyType_Slot value_slots[] = {
    {Py_tp_new, value_new},
    {Py_tp_dealloc, value_dealloc},
    {Py_tp_traverse, value_traverse},
    {Py_tp_repr, value_repr},
    {Py_tp_methods, value_methods},
    {Py_tp_getset, value_getset},
    {Py_tp_doc, (void *)value_doc},
    {0, NULL}};

static PyType_Spec value_spec = {
    .name = "shmemext.Value",
    .basicsize = sizeof(ValueObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = value_slots,
};

/* ---- module functions ---------------------------------------------------- */

static ValueObject *default_value(PyObject *module)
{
    module_state *st = get_state(module);
    if (st->default_value == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the default block is disabled (SHMEMEXT_SIZE=0); use shmemext.Value(name) instead");
        return NULL;
    }
    return (ValueObject *)st->default_value;
}

static PyObject *mod_get(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    ValueObject *v = default_value(module);
    return v ? value_get_impl(v) : NULL;
}

static PyObject *mod_set(PyObject *module, PyObject *value)
{
    ValueObject *v = default_value(module);
    if (v == NULL || value_set_impl(v, value) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *mod_unlink(PyObject *Py_UNUSED(module), PyObject *arg)
{
    const char *name = name_arg(arg, "name");
    if (name == NULL)
        return NULL;
    shx_error err;
    if (shx_unlink(name, &err) != SHX_OK)
        return raise_block_error(&err, name);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"get", mod_get, METH_NOARGS, "get()\n--\n\nReturn the default block's committed value (str or bytes)."},
    {"set", mod_set, METH_O, "set(value, /)\n--\n\nCommit value (str or bytes-like) to the default block."},
    {"unlink", mod_unlink, METH_O,
     "unlink(name, /)\n--\n\nRemove the name of a block (a persistent one, typically). Processes\n"
     "that have it open keep it; the next open of the name creates a new block."},
    {NULL, NULL, 0, NULL}};

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

static int module_exec(PyObject *module)
{
    static atomic_flag at_exit_registered = ATOMIC_FLAG_INIT;
    module_state *st = get_state(module);
    st->value_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &value_spec, NULL);
    if (st->value_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "Value", (PyObject *)st->value_type) < 0)
        return -1;
    if (PyModule_AddStringConstant(module, "__version__", SHMEMEXT_VERSION) < 0 ||
        PyModule_AddIntConstant(module, "DEFAULT_CAPACITY", SHX_DEFAULT_CAPACITY) < 0 ||
        PyModule_AddIntConstant(module, "NAME_MAX", SHX_NAME_MAX) < 0 ||
        PyModule_AddObject(module, "MAX_CAPACITY", PyLong_FromUnsignedLongLong(SHX_MAX_CAPACITY)) < 0)
        return -1;
    if (!atomic_flag_test_and_set(&at_exit_registered) && Py_AtExit(detach_all_at_exit) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "no room to register the exit hook (Py_AtExit)");
        return -1;
    }
    if (open_default_block(st) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "default", st->default_value ? st->default_value : Py_None);
}

static int module_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = get_state(module);
    Py_VISIT(st->value_type);
    Py_VISIT(st->default_value);
    return 0;
}

static int module_clear(PyObject *module)
{
    module_state *st = get_state(module);
    Py_CLEAR(st->default_value);
    Py_CLEAR(st->value_type);
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
