/* shmemext.Segment: a named block of raw shared memory with the buffer
 * protocol and a cross-process lock (py_lock.c). */
#include "glue.h"

static PyObject *segment_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static const char *const names[] = {"name", "size", "persist", "mode", "readonly", "scope", "security", "create"};
    static const shx_py_sig sig = {"Segment", names, 8, 2, 2};
    PyObject *v[8];
    int persist = 0, mode = 0600, readonly = 0, create = 1;
    const char *scope = NULL, *security = NULL;
    uint64_t size;
    if (shx_py_parse_tuple(&sig, args, kwds, v) < 0)
        return NULL;
    const char *name = shx_py_name_arg(v[0], "name");
    if (name == NULL || shx_py_size_arg(v[1], "size", 0, &size) < 0 || shx_py_bool_arg(v[2], &persist) < 0 ||
        shx_py_mode_arg(v[3], &mode) < 0 || shx_py_bool_arg(v[4], &readonly) < 0 ||
        shx_py_opt_str_arg(v[5], "scope", &scope) < 0 || shx_py_opt_str_arg(v[6], "security", &security) < 0 ||
        shx_py_bool_arg(v[7], &create) < 0)
        return NULL;
    return shx_py_block_new(type, name, SHX_KIND_SEGMENT, size, shx_py_open_flags(persist, create), mode, readonly,
                            scope, security);
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
    static const shx_py_sig sig = {"read", names, 2, 0, 2};
    PyObject *v[2];
    Py_ssize_t n = -1, offset = 0;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || (v[0] && shx_py_index_arg(v[0], "n", &n) < 0) ||
        (v[1] && shx_py_index_arg(v[1], "offset", &offset) < 0))
        return NULL;
    if (shx_py_check_open(self) < 0) /* closed is said before a bad range */
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
    shx_py_release release;
    shx_error err;
    int rc;
    do {
        if (shx_py_enter(self) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        shx_hooks hooks = SHX_PY_HOOKS(release, self);
        rc = shx_segment_read(&self->block, (uint64_t)offset, PyBytes_AS_STRING(out), (size_t)n, &hooks, &err);
        shx_py_leave(self);
    } while (SHX_PY_RETRY(rc, release));
    if (rc != SHX_OK) {
        Py_DECREF(out);
        return shx_py_raise_block(self, &err);
    }
    return out;
}

static PyObject *segment_write(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"data", "offset"};
    static const shx_py_sig sig = {"write", names, 2, 1, 2};
    PyObject *v[2];
    Py_ssize_t offset = 0;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || (v[1] && shx_py_index_arg(v[1], "offset", &offset) < 0))
        return NULL;
    if (shx_py_check_open(self) < 0)
        return NULL;
    if (self->readonly)
        return PyErr_Format(PyExc_TypeError, "Segment '%s' was opened readonly", self->block.name);
    uint64_t size = self->block.capacity;
    if (check_offset(self, offset) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(v[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return PyErr_Format(PyExc_TypeError, "write() needs a contiguous bytes-like object, not %.100s",
                            Py_TYPE(v[0])->tp_name);
    }
    if ((uint64_t)view.len > size - (uint64_t)offset) {
        unsigned long long end = (unsigned long long)offset + (unsigned long long)view.len;
        PyBuffer_Release(&view);
        return range_error(self, "write", end);
    }
    shx_py_release release;
    shx_error err;
    int rc;
    do {
        if (shx_py_enter(self) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        shx_hooks hooks = SHX_PY_HOOKS(release, self);
        rc = shx_segment_write(&self->block, (uint64_t)offset, view.buf, (size_t)view.len, &hooks, &err);
        shx_py_leave(self);
    } while (SHX_PY_RETRY(rc, release));
    Py_ssize_t written = view.len;
    PyBuffer_Release(&view);
    if (rc != SHX_OK)
        return shx_py_raise_block(self, &err);
    return PyLong_FromSsize_t(written);
}

/* An export is counted inside a call, so a close() that has drained the
 * calls sees every export there is. */
static int segment_getbuffer(BlockObject *self, Py_buffer *view, int flags)
{
    if (shx_py_enter(self) < 0)
        return -1;
    int rc = PyBuffer_FillInfo(view, (PyObject *)self, self->block.data, (Py_ssize_t)self->block.capacity,
                               self->readonly, flags);
    if (rc == 0)
        atomic_fetch_add(&self->block.guard.views, 1);
    shx_py_leave(self);
    return rc;
}

static void segment_releasebuffer(BlockObject *self, Py_buffer *Py_UNUSED(view))
{
    atomic_fetch_sub(&self->block.guard.views, 1);
}

static PyObject *segment_lock(BlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"timeout"};
    static const shx_py_sig sig = {"lock", names, 1, 0, 1};
    PyObject *v[1];
    double timeout = -1;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || (v[0] && shx_py_timeout_arg("lock", v[0], &timeout) < 0))
        return NULL;
    if (shx_py_check_open(self) < 0)
        return NULL;
    return shx_py_lock_new(self, timeout);
}

static PyObject *segment_repr(BlockObject *self)
{
    if (shx_py_enter_quietly(self)) {
        int persist = shx_block_is_persistent(&self->block);
        shx_py_leave(self);
        return PyUnicode_FromFormat("<shmemext.Segment name='%s' size=%llu%s%s>", self->block.name,
                                    (unsigned long long)self->block.capacity, self->readonly ? " readonly" : "",
                                    persist ? " persist" : "");
    }
    return PyUnicode_FromFormat("<shmemext.Segment name='%s' closed>", self->block.name);
}

static PyObject *segment_get_readonly(BlockObject *self, void *Py_UNUSED(c)) { return PyBool_FromLong(self->readonly); }

static PyObject *segment_get_exports(BlockObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(atomic_load(&self->block.guard.views));
}

static PyMethodDef segment_methods[] = {
    {"read", (PyCFunction)(void (*)(void))segment_read, METH_FASTCALL | METH_KEYWORDS,
     "read($self, /, n=-1, offset=0)\n--\n\nCopy n bytes (to the end if -1) from offset into a new bytes object."},
    {"write", (PyCFunction)(void (*)(void))segment_write, METH_FASTCALL | METH_KEYWORDS,
     "write($self, /, data, offset=0)\n--\n\nCopy a bytes-like object into the segment at offset; return its length."},
    {"lock", (PyCFunction)(void (*)(void))segment_lock, METH_FASTCALL | METH_KEYWORDS,
     "lock($self, /, timeout=None)\n--\n\nThe segment's cross-process lock, as a context manager\n"
     "(also acquire()/release()). It survives its holder's death: see SegmentLock.owner_died."},
    SHX_PY_BLOCK_METHODS,
    {NULL, NULL, 0, NULL}};

static PyGetSetDef segment_getset[] = {
    SHX_PY_BLOCK_GETSET,
    {"size", (getter)shx_py_block_get_size, NULL, "The segment's size in bytes, exactly as asked at creation.", NULL},
    {"readonly", (getter)segment_get_readonly, NULL, "True if opened readonly.", NULL},
    {"_exports", (getter)segment_get_exports, NULL, "Buffers exported and not yet released.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(segment_doc,
             "Segment(name, size, *, persist=False, mode=0o600, readonly=False, scope='session', security=None,\n"
             "        create=True)\n--\n\n"
             "A named block of raw shared memory with the buffer protocol.\n\n"
             "The first process to open `name` creates it zero-filled with `size` bytes;\n"
             "later ones get the existing block (which must be at least `size` bytes).\n"
             "It lives while any process has it open, unless persist=True.  scope,\n"
             "security and create are as for Value.");

static PyType_Slot segment_slots[] = {{Py_tp_new, segment_new},
                                      {Py_tp_dealloc, shx_py_block_dealloc},
                                      {Py_tp_traverse, shx_py_block_traverse},
                                      {Py_tp_repr, segment_repr},
                                      {Py_tp_methods, segment_methods},
                                      {Py_tp_getset, segment_getset},
                                      {Py_tp_doc, (void *)segment_doc},
                                      {Py_bf_getbuffer, segment_getbuffer},
                                      {Py_bf_releasebuffer, segment_releasebuffer},
                                      {0, NULL}};

PyType_Spec shx_py_segment_spec = {
    .name = "shmemext.Segment",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = segment_slots,
};
