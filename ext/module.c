/* shmemext._shmemext: the module.
 *
 * Importing it maps the default block, like a DLL that maps its shared
 * section in DLL_PROCESS_ATTACH; freeing the module, or process exit,
 * detaches it.  The types live in py_*.c (glue.h says which is where).
 */
#include "glue.h"
#include "queue.h"

#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
#include <unistd.h>
#endif

#ifndef SHMEMEXT_VERSION
#error "setup.py defines SHMEMEXT_VERSION"
#endif

static inline module_state *get_state(PyObject *module) { return (module_state *)PyModule_GetState(module); }

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
    return v ? shx_py_value_get(v) : NULL;
}

static PyObject *mod_set(PyObject *module, PyObject *value)
{
    BlockObject *v = default_value(module);
    if (v == NULL || shx_py_value_set(v, value) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *mod_wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    BlockObject *v = default_value(module);
    return v ? shx_py_value_wait(v, args, nargs, kwnames) : NULL;
}

static PyObject *mod_unlink(PyObject *module, PyObject *arg)
{
    const char *name = shx_py_name_arg(arg, "name");
    if (name == NULL)
        return NULL;
    shx_error err;
    if (shx_unlink(name, &err) != SHX_OK)
        return shx_py_raise(get_state(module), &err, name);
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
    const char *kind = info->kind == SHX_KIND_VALUE     ? "value"
                       : info->kind == SHX_KIND_SEGMENT ? "segment"
                       : info->kind == SHX_KIND_QUEUE   ? "queue"
                                                        : NULL;
    PyObject *d = Py_BuildValue(
        "{s:s,s:z,s:K,s:N,s:N,s:N,s:O,s:N,s:N}", "name", info->os.name, "kind", kind, "size",
        (unsigned long long)info->os.size, "capacity",
        info->kind ? PyLong_FromUnsignedLongLong(info->capacity) : Py_NewRef(Py_None), "holders",
        shx_py_optional_int(info->os.holders), "persist",
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
        return shx_py_raise(get_state(module), &err, "*");
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
    {"_wait_any", (PyCFunction)(void (*)(void))shx_py_wait_any, METH_FASTCALL,
     "_wait_any(values, versions, bell, rings, timeout, room=(), /)\n--\n\nSleep until a version (or, where room[i],\n"
     "a Queue's _taken) moves, the bell rings or timeout seconds pass; return the indexes of the values found\n"
     "closed or closing."},
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
    Py_DECREF(mod); /* sys.modules keeps it */
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
    if (!PyObject_TypeCheck(obj, st->value_type) && !PyObject_TypeCheck(obj, st->segment_type) &&
        !PyObject_TypeCheck(obj, st->queue_type)) {
        PyErr_Format(PyExc_TypeError, "expected a shmemext.Value, Segment or Queue, not %.100s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    BlockObject *b = (BlockObject *)obj;
    return shx_py_check_open(b) < 0 ? NULL : (ShmemExt_Block *)&b->block;
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
                     "or 0 to disable the default block",
                     env, (unsigned long long)SHX_MAX_CAPACITY);
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
                  "wrong kind or too small, a value over the capacity. A ValueError.",
                  PyExc_ValueError) < 0)
        return -1;
    if (add_error(module, &st->foreign_error, "shmemext.ForeignBlockError",
                  "The name holds something this shmemext does not read: another program's object, or a\n"
                  "block of a newer layout. It is never overwritten.",
                  st->error) < 0)
        return -1;
    if (add_error(module, &st->corrupt_error, "shmemext.CorruptBlockError",
                  "A block whose header or committed value is not well formed: bytes another process\n"
                  "wrote over it. Nothing is built from them.",
                  st->error) < 0)
        return -1;
    return add_error(module, &st->closed_error, "shmemext.ClosedError", "The Value, Segment or handle was closed.",
                     st->error);
}

static int module_exec(PyObject *module)
{
    static atomic_flag at_exit_registered = ATOMIC_FLAG_INIT;
    module_state *st = get_state(module);
    if (shx_py_reentry_init() < 0)
        return -1;
    st->value_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &shx_py_value_spec, NULL);
    if (st->value_type == NULL)
        return -1;
    st->segment_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &shx_py_segment_spec, NULL);
    st->lock_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &shx_py_lock_spec, NULL);
    st->bell_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &shx_py_bell_spec, NULL);
    st->queue_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &shx_py_queue_spec, NULL);
    if (st->segment_type == NULL || st->lock_type == NULL || st->bell_type == NULL || st->queue_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "Value", (PyObject *)st->value_type) < 0 ||
        PyModule_AddObjectRef(module, "Segment", (PyObject *)st->segment_type) < 0 ||
        PyModule_AddObjectRef(module, "SegmentLock", (PyObject *)st->lock_type) < 0 ||
        PyModule_AddObjectRef(module, "Queue", (PyObject *)st->queue_type) < 0 ||
        PyModule_AddObjectRef(module, "_Bell", (PyObject *)st->bell_type) < 0)
        return -1;
    if (PyModule_AddStringConstant(module, "__version__", SHMEMEXT_VERSION) < 0 ||
        PyModule_AddStringConstant(module, "_BACKEND", SHX_BACKEND) < 0 ||
        PyModule_AddIntConstant(module, "DEFAULT_CAPACITY", SHX_DEFAULT_CAPACITY) < 0 ||
        PyModule_AddIntConstant(module, "NAME_MAX", SHX_NAME_MAX) < 0 ||
        PyModule_AddIntConstant(module, "QUEUE_DEFAULT_CAPACITY", (long)SHX_QUEUE_DEFAULT_CAPACITY) < 0 ||
        PyModule_AddIntConstant(module, "_WAIT_ANY_MAX", SHX_WAIT_ANY_MAX) < 0 ||
        PyModule_AddIntConstant(module, "_WAIT_ANY_SLEEPS", SHX_OS_WAIT_ANY_MAX > 0) < 0 ||
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
    Py_VISIT(st->bell_type);
    Py_VISIT(st->queue_type);
    Py_VISIT(st->queue_full);
    Py_VISIT(st->queue_empty);
    Py_VISIT(st->pickle_dumps);
    Py_VISIT(st->pickle_loads);
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
    Py_CLEAR(st->bell_type);
    Py_CLEAR(st->queue_type);
    Py_CLEAR(st->queue_full);
    Py_CLEAR(st->queue_empty);
    Py_CLEAR(st->pickle_dumps);
    Py_CLEAR(st->pickle_loads);
    Py_CLEAR(st->error);
    Py_CLEAR(st->foreign_error);
    Py_CLEAR(st->corrupt_error);
    Py_CLEAR(st->closed_error);
    return 0;
}

/* DLL_PROCESS_DETACH: dropping the default Value detaches its block. */
static void module_free(void *module) { (void)module_clear((PyObject *)module); }

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030C0000
                                          {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
                                          {Py_mod_gil, Py_MOD_GIL_NOT_USED},
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
