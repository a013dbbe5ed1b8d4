/* The second file of the consumer: it uses the API imported by consumer.c. */
#define PY_SSIZE_T_CLEAN
#define SHMEMEXT_API_EXTERN
#include <Python.h>
#include <shmemext.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "work.h"

typedef struct {
    ShmemExt_Block *block;
    int id, iterations, bad, failed;
    size_t size;
} worker;

/* Each value is `size` copies of one byte: a torn read would mix two. */
static void *copy_loop(void *arg)
{
    worker *w = (worker *)arg;
    unsigned char out[4096], in[4096];
    ShmemExt_Error err;
    for (int i = 0; i < w->iterations; i++) {
        memset(out, (w->id * 31 + i) & 0xFF, w->size);
        if (ShmemExtAPI->set_bytes(w->block, out, w->size, &err) != SHMEMEXT_OK) {
            w->failed++;
            continue;
        }
        size_t len;
        int is_text;
        if (ShmemExtAPI->get(w->block, in, sizeof in, &len, &is_text, NULL, &err) != SHMEMEXT_OK) {
            w->failed++;
            continue;
        }
        for (size_t k = 1; k < len; k++)
            if (in[k] != in[0]) {
                w->bad++;
                break;
            }
    }
    return NULL;
}

typedef struct {
    ShmemExt_Block *block;
    long ok;
    int other; /* a result that is neither success nor E_CLOSED */
} closing_worker;

/* Copies through a borrowed handle until the block is closed under it. */
static void *copy_until_closed_loop(void *arg)
{
    closing_worker *w = (closing_worker *)arg;
    unsigned char buf[256];
    memset(buf, 'c', sizeof buf);
    ShmemExt_Error err;
    for (;;) {
        int rc = ShmemExtAPI->set_bytes(w->block, buf, sizeof buf, &err);
        if (rc == SHMEMEXT_OK)
            rc = ShmemExtAPI->get(w->block, buf, sizeof buf, NULL, NULL, NULL, &err);
        if (rc == SHMEMEXT_OK)
            rc = ShmemExtAPI->wait(w->block, ShmemExtAPI->value_version(w->block), 1000000, NULL, &err);
        if (rc == SHMEMEXT_E_TIMEOUT)
            rc = SHMEMEXT_OK;
        if (rc == SHMEMEXT_E_CLOSED)
            return NULL;
        if (rc != SHMEMEXT_OK) {
            w->other = rc;
            return NULL;
        }
        w->ok++;
    }
}

/* copy_until_closed(value, threads, delay_s) -> (copies done, other errors): C threads copy
 * through the object's handle while Python closes it after delay_s. */
PyObject *consumer_copy_until_closed(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *obj;
    int threads;
    double delay;
    if (!PyArg_ParseTuple(args, "Oid", &obj, &threads, &delay))
        return NULL;
    if (threads < 1 || threads > 64)
        return PyErr_Format(PyExc_ValueError, "1..64 threads");
    ShmemExt_Block *b = ShmemExtAPI->from_object(obj);
    if (b == NULL)
        return NULL;
    pthread_t tids[64];
    closing_worker ws[64];
    for (int t = 0; t < threads; t++) {
        ws[t] = (closing_worker){b, 0, 0};
        pthread_create(&tids[t], NULL, copy_until_closed_loop, &ws[t]);
    }
    Py_BEGIN_ALLOW_THREADS
    struct timespec ts = {(time_t)delay, (long)((delay - (double)(time_t)delay) * 1e9)};
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
    PyObject *r = PyObject_CallMethod(obj, "close", NULL); /* with the C threads inside the guard */
    long ok = 0;
    int other = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        ok += ws[t].ok;
        other = other ? other : ws[t].other;
    }
    Py_END_ALLOW_THREADS
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return Py_BuildValue("(li)", ok, other);
}

/* threaded_copies(name, threads, iterations, size) -> (bad, failed), copying without the GIL. */
PyObject *consumer_threaded_copies(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    int threads, iterations;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "siin", &name, &threads, &iterations, &size))
        return NULL;
    if (threads < 1 || threads > 64 || size < 1 || size > 4096)
        return PyErr_Format(PyExc_ValueError, "1..64 threads, size 1..4096");
    ShmemExt_Block *b;
    ShmemExt_Error err;
    int created;
    if (ShmemExtAPI->open(name, SHMEMEXT_VALUE, 4096, 0, 0600, &b, &created, &err) != SHMEMEXT_OK)
        return PyErr_Format(PyExc_OSError, "%s", err.message);
    pthread_t tids[64];
    worker ws[64];
    int bad = 0, failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        ws[t] = (worker){b, t, iterations, 0, 0, (size_t)size};
        pthread_create(&tids[t], NULL, copy_loop, &ws[t]);
    }
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        bad += ws[t].bad;
        failed += ws[t].failed;
    }
    Py_END_ALLOW_THREADS
    ShmemExtAPI->close(b, &err);
    return Py_BuildValue("(ii)", bad, failed);
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* bench(name, size, iterations) -> (ns per set, ns per get, ns per memcpy), bytes, from C. */
PyObject *consumer_bench(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    Py_ssize_t size;
    int iterations;
    if (!PyArg_ParseTuple(args, "sni", &name, &size, &iterations))
        return NULL;
    static unsigned char src[1 << 16], dst[1 << 16];
    if (size < 1 || size > (Py_ssize_t)sizeof src)
        return PyErr_Format(PyExc_ValueError, "size 1..65536");
    ShmemExt_Block *b;
    ShmemExt_Error err;
    int created;
    if (ShmemExtAPI->open(name, SHMEMEXT_VALUE, (uint64_t)size, 0, 0600, &b, &created, &err) != SHMEMEXT_OK)
        return PyErr_Format(PyExc_OSError, "%s", err.message);
    memset(src, 'x', (size_t)size);
    double t0 = now_ns();
    for (int i = 0; i < iterations; i++)
        ShmemExtAPI->set_bytes(b, src, (size_t)size, &err);
    double t1 = now_ns();
    size_t len;
    for (int i = 0; i < iterations; i++)
        ShmemExtAPI->get(b, dst, sizeof dst, &len, NULL, NULL, &err);
    double t2 = now_ns();
    for (int i = 0; i < iterations; i++) {
        memcpy(dst, src, (size_t)size);
        __asm__ volatile("" : : "r"(dst) : "memory");
    }
    double t3 = now_ns();
    ShmemExtAPI->close(b, &err);
    return Py_BuildValue("(ddd)", (t1 - t0) / iterations, (t2 - t1) / iterations, (t3 - t2) / iterations);
}
