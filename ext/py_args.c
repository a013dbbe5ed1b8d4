/* The glue's one argument parser and the converters of its arguments.
 * Messages follow CPython's, and name the value and its limit. */
#include "glue.h"

#include <limits.h>
#include <string.h>

/* Keywords are compared as objects, so a name UTF-8 cannot carry is an
 * error message, never a crash. */
static int assign_keyword(const shx_py_sig *sig, PyObject *key, PyObject *value, PyObject *vals[])
{
    int slot = -1;
    if (PyUnicode_Check(key)) {
        for (int i = 0; i < sig->n && slot < 0; i++) {
            if (PyUnicode_CompareWithASCIIString(key, sig->names[i]) == 0)
                slot = i;
        }
    }
    if (slot < 0) {
        PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", sig->fname, key);
        return -1;
    }
    if (vals[slot] != NULL) {
        PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", sig->fname, sig->names[slot]);
        return -1;
    }
    vals[slot] = value;
    return 0;
}

static int take_positional(const shx_py_sig *sig, PyObject *const *args, Py_ssize_t nargs, PyObject *vals[])
{
    for (int i = 0; i < sig->n; i++)
        vals[i] = i < nargs ? args[i] : NULL;
    if (nargs > sig->positional) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d %sargument%s (%zd given)", sig->fname, sig->positional,
                     sig->positional < sig->n ? "positional " : "", sig->positional == 1 ? "" : "s", nargs);
        return -1;
    }
    return 0;
}

static int check_required(const shx_py_sig *sig, PyObject *vals[])
{
    for (int i = 0; i < sig->required; i++) {
        if (vals[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", sig->fname, sig->names[i]);
            return -1;
        }
    }
    return 0;
}

int shx_py_parse(const shx_py_sig *sig, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject *vals[])
{
    if (take_positional(sig, args, nargs, vals) < 0)
        return -1;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        if (assign_keyword(sig, PyTuple_GET_ITEM(kwnames, k), args[nargs + k], vals) < 0)
            return -1;
    }
    return check_required(sig, vals);
}

int shx_py_parse_tuple(const shx_py_sig *sig, PyObject *args, PyObject *kwds, PyObject *vals[])
{
    if (take_positional(sig, &PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), vals) < 0)
        return -1;
    if (kwds != NULL) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(kwds, &pos, &key, &value)) {
            if (assign_keyword(sig, key, value, vals) < 0)
                return -1;
        }
    }
    return check_required(sig, vals);
}

const char *shx_py_name_arg(PyObject *arg, const char *what)
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

int shx_py_size_arg(PyObject *arg, const char *what, int none_ok, uint64_t *out)
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

/* Truth, as the "p" format takes it; absent leaves *out alone. */
int shx_py_bool_arg(PyObject *arg, int *out)
{
    if (arg == NULL)
        return 0;
    int v = PyObject_IsTrue(arg);
    if (v < 0)
        return -1;
    *out = v;
    return 0;
}

/* Permission bits, 0 to 0o777; absent leaves *out alone. */
int shx_py_mode_arg(PyObject *arg, int *out)
{
    if (arg == NULL)
        return 0;
    if (!PyLong_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "argument 'mode' must be an int of permission bits such as 0o600, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    int overflow;
    long v = PyLong_AsLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || v < 0 || v > 0777) {
        char text[32];
        if (overflow == 0)
            snprintf(text, sizeof text, v < 0 ? "%ld" : "0o%lo", v);
        else
            snprintf(text, sizeof text, "%s", overflow < 0 ? "below -2**63" : "above 2**63");
        PyErr_Format(PyExc_ValueError, "mode %s is out of range: it must be between 0 and 0o777", text);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* None or a str without NUL characters; absent or None leaves NULL. */
int shx_py_opt_str_arg(PyObject *arg, const char *what, const char **out)
{
    *out = NULL;
    if (arg == NULL || arg == Py_None)
        return 0;
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be str or None, not %.100s", what, Py_TYPE(arg)->tp_name);
        return -1;
    }
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &len);
    if (s == NULL)
        return -1;
    if (strlen(s) != (size_t)len) {
        PyErr_Format(PyExc_ValueError, "argument '%s' contains a NUL character", what);
        return -1;
    }
    *out = s;
    return 0;
}

int shx_py_timeout_arg(const char *fname, PyObject *obj, double *timeout)
{
    if (obj == Py_None) {
        *timeout = -1;
        return 0;
    }
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj) || !PyNumber_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s() argument 'timeout' must be None or a number of seconds, not %.100s", fname,
                     Py_TYPE(obj)->tp_name);
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

int shx_py_index_arg(PyObject *arg, const char *what, Py_ssize_t *out)
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

/* Waits run in slices so that signals (Ctrl-C) and close() are seen in between. */
int64_t shx_py_next_slice(double timeout, uint64_t start)
{
    const int64_t slice_ns = 50 * 1000 * 1000;
    if (timeout < 0)
        return slice_ns;
    int64_t left = (int64_t)(timeout * 1e9) - (int64_t)(shx_os_monotonic_ns() - start);
    return left <= 0 ? 0 : left < slice_ns ? left : slice_ns;
}

PyObject *shx_py_call_aio(const char *fname, PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *module = PyImport_ImportModule("shmemext._aio");
    if (module == NULL)
        return NULL;
    PyObject *f = PyObject_GetAttrString(module, fname);
    Py_DECREF(module);
    if (f == NULL)
        return NULL;
    Py_ssize_t total = nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject **stack = PyMem_New(PyObject *, total + 1);
    if (stack == NULL) {
        Py_DECREF(f);
        return PyErr_NoMemory();
    }
    stack[0] = self;
    for (Py_ssize_t i = 0; i < total; i++)
        stack[i + 1] = args[i];
    PyObject *result = PyObject_Vectorcall(f, stack, (size_t)nargs + 1, kwnames);
    PyMem_Free(stack);
    Py_DECREF(f);
    return result;
}
