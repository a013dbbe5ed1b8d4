/* A consumer extension of the shmemext C API, built by the tests against
 * shmemext.get_include() alone.  This file imports the API; work.c uses it. */
#define PY_SSIZE_T_CLEAN
#define SHMEMEXT_API_DEFINE
#include <Python.h>
#include <shmemext.h>

#include <errno.h>
#include <time.h>

#include "work.h"

static PyObject *raise_api_error(const ShmemExt_Error *err)
{
    return PyErr_Format(PyExc_OSError, "shmemext C API error %d: %s", err->code, err->message);
}

/* default_set(text): sets the default block through the C API. */
static PyObject *default_set(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t len;
    const char *text = PyUnicode_AsUTF8AndSize(arg, &len);
    if (text == NULL)
        return NULL;
    ShmemExt_Block *b = ShmemExtAPI->default_block();
    if (b == NULL)
        return NULL;
    ShmemExt_Error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ShmemExtAPI->set_utf8(b, text, (size_t)len, &err);
    Py_END_ALLOW_THREADS
    if (rc != SHMEMEXT_OK)
        return raise_api_error(&err);
    return PyUnicode_FromString(ShmemExtAPI->name(b));
}

/* named_get(name, cap, existing=0) -> (value as str or bytes, version, created): opens
 * (with SHMEMEXT_EXISTING if asked), reads, closes. */
static PyObject *named_get(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    Py_ssize_t cap;
    int existing = 0;
    if (!PyArg_ParseTuple(args, "sn|p", &name, &cap, &existing))
        return NULL;
    ShmemExt_Block *b;
    ShmemExt_Error err;
    int created, is_text = 0, rc;
    size_t len = 0;
    uint64_t version = 0;
    char *buf = (char *)PyMem_Malloc((size_t)cap + 1);
    if (buf == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    rc = ShmemExtAPI->open(name, SHMEMEXT_VALUE, 0, existing ? SHMEMEXT_EXISTING : 0, 0600, &b, &created, &err);
    if (rc == SHMEMEXT_OK) {
        rc = ShmemExtAPI->get(b, buf, (size_t)cap, &len, &is_text, &version, &err);
        ShmemExt_Error ignored;
        ShmemExtAPI->close(b, &ignored);
    }
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (rc == SHMEMEXT_E_BUFFER)
        result = Py_BuildValue("(snO)", "too small", (Py_ssize_t)len, Py_None);
    else if (rc != SHMEMEXT_OK)
        raise_api_error(&err);
    else if (is_text)
        result =
            Py_BuildValue("(s#KO)", buf, (Py_ssize_t)len, (unsigned long long)version, created ? Py_True : Py_False);
    else
        result =
            Py_BuildValue("(y#KO)", buf, (Py_ssize_t)len, (unsigned long long)version, created ? Py_True : Py_False);
    PyMem_Free(buf);
    return result;
}

/* object_set(value_object, data: bytes): sets bytes through a Python Value's block. */
static PyObject *object_set(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *obj;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Oy*", &obj, &data))
        return NULL;
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    ShmemExt_Error err;
    int rc = b ? ShmemExtAPI->set_bytes(b, data.buf, (size_t)data.len, &err) : -1;
    PyBuffer_Release(&data);
    if (b == NULL)
        return NULL;
    if (rc != SHMEMEXT_OK)
        return raise_api_error(&err);
    return PyLong_FromUnsignedLongLong(ShmemExtAPI->value_version(b));
}

/* queue_pass(queue_object, data: bytes, cap: int) -> (rc_put, rc_get, message or None, is_text,
 * is_pickle, length): puts data through the C API and takes the oldest message into a buffer of
 * cap bytes, without the GIL. */
static PyObject *queue_pass(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *obj;
    Py_buffer data;
    Py_ssize_t cap;
    if (!PyArg_ParseTuple(args, "Oy*n", &obj, &data, &cap))
        return NULL;
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    if (b == NULL || cap < 0) {
        PyBuffer_Release(&data);
        return b == NULL ? NULL : PyErr_Format(PyExc_ValueError, "cap must be >= 0");
    }
    char *buf = (char *)PyMem_Malloc((size_t)cap + 1);
    if (buf == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    ShmemExt_Error err;
    size_t len = 0;
    int is_text = -1, is_pickle = -1, put = SHMEMEXT_OK, got;
    Py_BEGIN_ALLOW_THREADS
    if (data.len > 0)
        put = ShmemExtAPI->queue_put(b, data.buf, (size_t)data.len, 0, &err);
    got = ShmemExtAPI->queue_get(b, buf, (size_t)cap, &len, &is_text, &is_pickle, 0, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyObject *msg = got == SHMEMEXT_OK ? PyBytes_FromStringAndSize(buf, (Py_ssize_t)len) : Py_NewRef(Py_None);
    PyMem_Free(buf);
    if (msg == NULL)
        return NULL;
    return Py_BuildValue("(iiNiin)", put, got, msg, is_text, is_pickle, (Py_ssize_t)len);
}

/* queue_named(name, n) -> messages: opens the queue by name, puts n numbered messages and closes. */
static PyObject *queue_named(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    int n;
    if (!PyArg_ParseTuple(args, "si", &name, &n))
        return NULL;
    ShmemExt_Block *b;
    ShmemExt_Error err;
    int created, rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ShmemExtAPI->open(name, SHMEMEXT_QUEUE, 4096, 0, 0600, &b, &created, &err);
    for (int i = 0; rc == SHMEMEXT_OK && i < n; i++) {
        char msg[32];
        int len = snprintf(msg, sizeof msg, "c%d", i);
        rc = ShmemExtAPI->queue_put(b, msg, (size_t)len, -1, &err);
    }
    if (rc == SHMEMEXT_OK)
        rc = ShmemExtAPI->close(b, &err);
    Py_END_ALLOW_THREADS
    if (rc != SHMEMEXT_OK)
        return raise_api_error(&err);
    return PyLong_FromLong(n);
}

/* segment_fill(name, size, byte) -> sum of the bytes, through the segment's pointer, under its lock. */
static PyObject *segment_fill(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    unsigned long long size;
    int byte;
    if (!PyArg_ParseTuple(args, "sKi", &name, &size, &byte))
        return NULL;
    ShmemExt_Block *b;
    ShmemExt_Error err;
    int created, died = 0;
    if (ShmemExtAPI->open(name, SHMEMEXT_SEGMENT, size, 0, 0600, &b, &created, &err) != SHMEMEXT_OK)
        return raise_api_error(&err);
    size_t n;
    unsigned char *p = (unsigned char *)ShmemExtAPI->data(b, &n);
    unsigned long long sum = 0;
    if (ShmemExtAPI->lock(b, -1, &died, &err) != SHMEMEXT_OK) {
        ShmemExtAPI->close(b, &err);
        return raise_api_error(&err);
    }
    memset(p, byte, n);
    for (size_t i = 0; i < n; i++)
        sum += p[i];
    ShmemExtAPI->unlock(b, &err);
    ShmemExtAPI->close(b, &err);
    return Py_BuildValue("(KnO)", sum, (Py_ssize_t)n, created ? Py_True : Py_False);
}

/* close_foreign(value_object): close() must refuse a handle it did not make. */
static PyObject *close_foreign(PyObject *self, PyObject *obj)
{
    (void)self;
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    if (b == NULL)
        return NULL;
    ShmemExt_Error err;
    int rc = ShmemExtAPI->close(b, &err);
    return Py_BuildValue("(is)", rc, err.message);
}

/* misuse(name) -> (first close, second close, empty get, its length): what
 * a careless consumer does; every answer must be a result code, not a crash. */
static PyObject *misuse(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    ShmemExt_Block *b;
    ShmemExt_Error err;
    if (ShmemExtAPI->open(name, SHMEMEXT_VALUE, 64, 0, 0600, &b, NULL, &err) != SHMEMEXT_OK)
        return raise_api_error(&err);
    size_t len = 99;
    int got = ShmemExtAPI->get(b, NULL, 0, &len, NULL, NULL, &err);
    int first = ShmemExtAPI->close(b, &err);
    int second = ShmemExtAPI->close(b, &err);
    return Py_BuildValue("(iiin)", first, second, got, (Py_ssize_t)len);
}

/* after_close(value_object) -> (get, set, version): the object was closed by Python. */
static PyObject *after_close(PyObject *self, PyObject *obj)
{
    (void)self;
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    if (b == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethod(obj, "close", NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    char buf[8];
    size_t len;
    ShmemExt_Error err;
    int got = ShmemExtAPI->get(b, buf, sizeof buf, &len, NULL, NULL, &err);
    int set = ShmemExtAPI->set_bytes(b, "x", 1, &err);
    return Py_BuildValue("(iiK)", got, set, (unsigned long long)ShmemExtAPI->value_version(b));
}

/* lock_for(value_object, seconds): holds the block's writer lock that long, without the GIL. */
static PyObject *lock_for(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *obj;
    double seconds;
    if (!PyArg_ParseTuple(args, "Od", &obj, &seconds))
        return NULL;
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    if (b == NULL)
        return NULL;
    ShmemExt_Error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ShmemExtAPI->lock(b, -1, NULL, &err);
    if (rc == SHMEMEXT_OK) {
        struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        rc = ShmemExtAPI->unlock(b, &err);
    }
    Py_END_ALLOW_THREADS
    if (rc != SHMEMEXT_OK)
        return raise_api_error(&err);
    Py_RETURN_NONE;
}

/* wait_change(name, seen, timeout_ms) -> new version, or None on timeout; without the GIL. */
static PyObject *wait_change(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    unsigned long long seen;
    long long timeout_ms;
    if (!PyArg_ParseTuple(args, "sKL", &name, &seen, &timeout_ms))
        return NULL;
    ShmemExt_Block *b;
    ShmemExt_Error err;
    int created, rc;
    uint64_t now = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = ShmemExtAPI->open(name, SHMEMEXT_VALUE, 0, 0, 0600, &b, &created, &err);
    if (rc == SHMEMEXT_OK) {
        rc = ShmemExtAPI->wait(b, seen, timeout_ms * 1000000, &now, &err);
        ShmemExt_Error ignored;
        ShmemExtAPI->close(b, &ignored);
    }
    Py_END_ALLOW_THREADS
    if (rc == SHMEMEXT_E_TIMEOUT)
        Py_RETURN_NONE;
    if (rc != SHMEMEXT_OK)
        return raise_api_error(&err);
    return PyLong_FromUnsignedLongLong(now);
}

/* The handle pin() acquired last: use_kept() must work after the caller
 * dropped its own reference (the pin keeps the object alive). */
static ShmemExt_Block *pinned;

/* pin(obj) / unpin(obj): acquire() / release() of a Python object's handle; the result code. */
static PyObject *pin(PyObject *self, PyObject *obj)
{
    (void)self;
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    if (b == NULL)
        return NULL;
    ShmemExt_Error err;
    int rc = ShmemExtAPI->acquire(b, &err);
    if (rc == SHMEMEXT_OK)
        pinned = b;
    return PyLong_FromLong(rc);
}

/* use_kept(text) -> (set result, release result, the name): through the handle pin() kept, then released. */
static PyObject *use_kept(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t len;
    const char *text = PyUnicode_AsUTF8AndSize(arg, &len);
    if (text == NULL || pinned == NULL)
        return text == NULL ? NULL : PyErr_Format(PyExc_RuntimeError, "nothing kept");
    ShmemExt_Error err;
    int set = ShmemExtAPI->set_utf8(pinned, text, (size_t)len, &err);
    PyObject *name = PyUnicode_FromString(ShmemExtAPI->name(pinned));
    int released = ShmemExtAPI->release(pinned, &err);
    pinned = NULL;
    return name ? Py_BuildValue("(iiN)", set, released, name) : NULL;
}

static PyObject *unpin(PyObject *self, PyObject *obj)
{
    (void)self;
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    if (b == NULL)
        return NULL;
    ShmemExt_Error err;
    return PyLong_FromLong(ShmemExtAPI->release(b, &err));
}

/* heap_pins(name) -> (close while acquired, release, release again, close): an open() handle. */
static PyObject *heap_pins(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    ShmemExt_Block *b;
    ShmemExt_Error err;
    int created;
    if (ShmemExtAPI->open(name, SHMEMEXT_VALUE, 64, 0, 0600, &b, &created, &err) != SHMEMEXT_OK)
        return raise_api_error(&err);
    int acquired = ShmemExtAPI->acquire(b, &err);
    int busy = ShmemExtAPI->close(b, &err);
    int set = ShmemExtAPI->set_bytes(b, "still open", 10, &err);
    int released = ShmemExtAPI->release(b, &err);
    int again = ShmemExtAPI->release(b, &err);
    int closed = ShmemExtAPI->close(b, &err);
    return Py_BuildValue("(iiiiii)", acquired, busy, set, released, again, closed);
}

static PyMethodDef methods[] = {{"pin", pin, METH_O, NULL},
                                {"unpin", unpin, METH_O, NULL},
                                {"use_kept", use_kept, METH_O, NULL},
                                {"heap_pins", heap_pins, METH_O, NULL},
                                {"copy_until_closed", consumer_copy_until_closed, METH_VARARGS, NULL},
                                {"wait_change", wait_change, METH_VARARGS, NULL},
                                {"lock_for", lock_for, METH_VARARGS, NULL},
                                {"default_set", default_set, METH_O, NULL},
                                {"named_get", named_get, METH_VARARGS, NULL},
                                {"object_set", object_set, METH_VARARGS, NULL},
                                {"queue_pass", queue_pass, METH_VARARGS, NULL},
                                {"queue_named", queue_named, METH_VARARGS, NULL},
                                {"segment_fill", segment_fill, METH_VARARGS, NULL},
                                {"close_foreign", close_foreign, METH_O, NULL},
                                {"misuse", misuse, METH_O, NULL},
                                {"after_close", after_close, METH_O, NULL},
                                {"threaded_copies", consumer_threaded_copies, METH_VARARGS, NULL},
                                {"bench", consumer_bench, METH_VARARGS, NULL},
                                {NULL, NULL, 0, NULL}};

static int consumer_exec(PyObject *module)
{
    (void)module;
    return ShmemExt_IMPORT;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, consumer_exec},
#if PY_VERSION_HEX >= 0x030D0000
                                   /* Every call it makes is one of the C API's, which are safe from any thread. */
                                   {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
                                   {0, NULL}};

static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "consumer", NULL, 0, methods, slots, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_consumer(void) { return PyModuleDef_Init(&def); }
