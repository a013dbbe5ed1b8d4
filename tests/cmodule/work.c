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
