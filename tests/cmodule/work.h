#ifndef CONSUMER_WORK_H
#define CONSUMER_WORK_H
#include <Python.h>
PyObject *consumer_threaded_copies(PyObject *self, PyObject *args);
PyObject *consumer_bench(PyObject *self, PyObject *args);
PyObject *consumer_copy_until_closed(PyObject *self, PyObject *args);
#endif
