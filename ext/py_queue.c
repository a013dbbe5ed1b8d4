/* shmemext.Queue: a named queue of messages between processes (queue.h).
 * bytes-like objects and str travel as they are; anything else is pickled
 * (protocol 5, its out-of-band buffers gathered into the record). */
#include "glue.h"
#include "queue.h"

typedef struct {
    BlockObject base;
    int unpickle; /* pickled messages are loaded; otherwise refused */
    /* An exception get_many() met after it had taken messages: it returns
     * those, and the next get raises this.  Under base.mutex. */
    PyObject *pending;
} QueueObject;

/* ---- the standard library's part ---------------------------------------------- */

#if PY_VERSION_HEX >= 0x030D0000
static PyMutex support_lock;
#endif

static module_state *queue_support(PyTypeObject *type)
{
    module_state *st = shx_py_state_of_type(type);
    if (st == NULL)
        return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    PyMutex_Lock(&support_lock);
#endif
    int ok = 1;
    if (st->queue_empty == NULL) {
        PyObject *queue = PyImport_ImportModule("queue");
        PyObject *pickle = queue ? PyImport_ImportModule("pickle") : NULL;
        PyObject *full = pickle ? PyObject_GetAttrString(queue, "Full") : NULL;
        PyObject *empty = full ? PyObject_GetAttrString(queue, "Empty") : NULL;
        PyObject *dumps = empty ? PyObject_GetAttrString(pickle, "dumps") : NULL;
        PyObject *loads = dumps ? PyObject_GetAttrString(pickle, "loads") : NULL;
        Py_XDECREF(queue);
        Py_XDECREF(pickle);
        if (loads == NULL) {
            Py_XDECREF(full);
            Py_XDECREF(empty);
            Py_XDECREF(dumps);
            ok = 0;
        } else {
            st->queue_full = full;
            st->pickle_dumps = dumps;
            st->pickle_loads = loads;
            st->queue_empty = empty; /* last: it says the others are there */
        }
    }
#if PY_VERSION_HEX >= 0x030D0000
    PyMutex_Unlock(&support_lock);
#endif
    return ok ? st : NULL;
}

#define STATE(self) shx_py_state_of_type(Py_TYPE(self))

/* ---- outgoing messages -------------------------------------------------------- */

/* The out-of-band frame: counts and lengths, then the pickle, then each
 * buffer, every part starting on a multiple of FRAME_ALIGN bytes. */
#define FRAME_ALIGN       16
#define FRAME_MAX_BUFFERS 4096

static size_t pad_to_align(size_t n) { return (FRAME_ALIGN - n % FRAME_ALIGN) % FRAME_ALIGN; }

static const unsigned char zeros[FRAME_ALIGN];

typedef struct {
    uint32_t type;
    shx_iov *parts;
    size_t n;
    shx_iov inline_parts[1];
    Py_buffer view; /* of a bytes-like message */
    int have_view;
    PyObject *keep;  /* the pickle */
    Py_buffer *oob;  /* the out-of-band buffers' views */
    size_t noob;     /* of them */
    uint64_t *frame; /* the frame's head */
} outgoing;

static void outgoing_release(outgoing *m)
{
    if (m->have_view)
        PyBuffer_Release(&m->view);
    for (size_t i = 0; i < m->noob; i++)
        PyBuffer_Release(&m->oob[i]);
    PyMem_Free(m->oob);
    PyMem_Free(m->frame);
    if (m->parts != m->inline_parts)
        PyMem_Free(m->parts);
    Py_XDECREF(m->keep);
    memset(m, 0, sizeof *m);
}

static int outgoing_one(outgoing *m, uint32_t type, const void *base, size_t len)
{
    m->type = type;
    m->parts = m->inline_parts;
    m->inline_parts[0].base = base;
    m->inline_parts[0].len = len;
    m->n = 1;
    return 0;
}

/* The pickle and its buffers as one framed message; 1 when a buffer is not
 * contiguous (the caller pickles in-band instead). */
static int frame_buffers(outgoing *m, PyObject *pickled, PyObject *buffers)
{
    Py_ssize_t count = PyList_GET_SIZE(buffers);
    if (count > FRAME_MAX_BUFFERS)
        return 1;
    m->oob = PyMem_New(Py_buffer, (size_t)count);
    size_t head_len = (size_t)(2 + count) * sizeof(uint64_t);
    m->frame = (uint64_t *)PyMem_Malloc(head_len);
    m->parts = PyMem_New(shx_iov, 4 + 2 * (size_t)count);
    if (m->oob == NULL || m->frame == NULL || m->parts == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *raw = PyObject_CallMethod(PyList_GET_ITEM(buffers, i), "raw", NULL);
        if (raw == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_BufferError))
                return -1;
            PyErr_Clear();
            return 1;
        }
        int got = PyObject_GetBuffer(raw, &m->oob[m->noob], PyBUF_SIMPLE);
        Py_DECREF(raw);
        if (got < 0)
            return -1;
        m->noob++;
    }
    m->frame[0] = (uint64_t)count;
    m->frame[1] = (uint64_t)PyBytes_GET_SIZE(pickled);
    for (Py_ssize_t i = 0; i < count; i++)
        m->frame[2 + i] = (uint64_t)m->oob[i].len;
    m->type = SHX_TYPE_PICKLE_FRAMED;
    size_t n = 0, at = 0;
    m->parts[n++] = (shx_iov){m->frame, head_len};
    at += head_len;
    m->parts[n++] = (shx_iov){zeros, pad_to_align(at)};
    at += pad_to_align(at);
    m->parts[n++] = (shx_iov){PyBytes_AS_STRING(pickled), (size_t)PyBytes_GET_SIZE(pickled)};
    at += (size_t)PyBytes_GET_SIZE(pickled);
    for (Py_ssize_t i = 0; i < count; i++) {
        m->parts[n++] = (shx_iov){zeros, pad_to_align(at)};
        at += pad_to_align(at);
        m->parts[n++] = (shx_iov){m->oob[i].buf, (size_t)m->oob[i].len};
        at += (size_t)m->oob[i].len;
    }
    m->n = n;
    return 0;
}

static PyObject *dumps(module_state *st, PyObject *obj, PyObject *buffers)
{
    PyObject *args[3] = {obj, NULL, NULL};
    args[1] = PyLong_FromLong(5);
    if (args[1] == NULL)
        return NULL;
    PyObject *result;
    if (buffers != NULL) {
        PyObject *append = PyObject_GetAttrString(buffers, "append");
        if (append == NULL) {
            Py_DECREF(args[1]);
            return NULL;
        }
        args[2] = append;
        PyObject *kwnames = Py_BuildValue("(s)", "buffer_callback");
        result = kwnames ? PyObject_Vectorcall(st->pickle_dumps, args, 2, kwnames) : NULL;
        Py_XDECREF(kwnames);
        Py_DECREF(append);
    } else {
        result = PyObject_Vectorcall(st->pickle_dumps, args, 2, NULL);
    }
    Py_DECREF(args[1]);
    if (result != NULL && !PyBytes_Check(result)) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_TypeError, "pickle.dumps() did not return bytes");
        return NULL;
    }
    return result;
}

/* What to put for obj: str and bytes-like as they are, the rest pickled. */
static int outgoing_make(module_state *st, PyObject *obj, outgoing *m)
{
    memset(m, 0, sizeof *m);
    if (PyUnicode_Check(obj)) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(obj) < 0)
            return -1;
#endif
        int kind = PyUnicode_KIND(obj);
        uint32_t type = PyUnicode_IS_ASCII(obj)        ? SHX_TYPE_ASCII
                        : kind == PyUnicode_1BYTE_KIND ? SHX_TYPE_LATIN1
                        : kind == PyUnicode_2BYTE_KIND ? SHX_TYPE_UCS2
                                                       : SHX_TYPE_UCS4;
        return outgoing_one(m, type, PyUnicode_DATA(obj), (size_t)PyUnicode_GET_LENGTH(obj) * (size_t)kind);
    }
    if (PyBytes_CheckExact(obj))
        return outgoing_one(m, SHX_TYPE_BYTES, PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj));
    if (PyBytes_Check(obj) || PyByteArray_Check(obj) || PyMemoryView_Check(obj)) {
        if (PyObject_GetBuffer(obj, &m->view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "put() needs a contiguous bytes-like object; this %.100s is not contiguous",
                         Py_TYPE(obj)->tp_name);
            return -1;
        }
        m->have_view = 1;
        return outgoing_one(m, SHX_TYPE_BYTES, m->view.buf, (size_t)m->view.len);
    }
    PyObject *buffers = PyList_New(0);
    if (buffers == NULL)
        return -1;
    PyObject *pickled = dumps(st, obj, buffers);
    if (pickled == NULL) {
        Py_DECREF(buffers);
        return -1;
    }
    int rc = 0;
    if (PyList_GET_SIZE(buffers) > 0) {
        m->keep = pickled;
        rc = frame_buffers(m, pickled, buffers);
        if (rc == 1) { /* a buffer out of line cannot be: all in line */
            outgoing_release(m);
            pickled = dumps(st, obj, NULL);
            rc = pickled == NULL ? -1 : 0;
        } else {
            pickled = NULL;
        }
    }
    Py_DECREF(buffers);
    if (pickled != NULL) {
        m->keep = pickled;
        outgoing_one(m, SHX_TYPE_PICKLE, PyBytes_AS_STRING(pickled), (size_t)PyBytes_GET_SIZE(pickled));
    }
    if (rc < 0)
        outgoing_release(m);
    return rc;
}

/* ---- arguments -------------------------------------------------------------- */

/* block= and timeout= as queue.Queue takes them, into ns: 0 only tries, < 0 for ever. */
static int wait_args(const char *fname, PyObject *block, PyObject *timeout, double *seconds)
{
    int blocking = 1;
    if (block != NULL && shx_py_bool_arg(block, &blocking) < 0)
        return -1;
    *seconds = -1;
    if (timeout != NULL && shx_py_timeout_arg(fname, timeout, seconds) < 0)
        return -1;
    if (!blocking)
        *seconds = 0;
    return 0;
}

static int64_t left_ns(double seconds, uint64_t start)
{
    if (seconds < 0)
        return -1;
    int64_t left = (int64_t)(seconds * 1e9) - (int64_t)(shx_os_monotonic_ns() - start);
    return left > 0 ? left : 0;
}

static PyObject *raise_queue(QueueObject *self, const shx_error *err, double seconds)
{
    module_state *st = STATE(self);
    const char *name = self->base.block.name;
    char secs[32];
    snprintf(secs, sizeof secs, "%g", seconds);
    switch (err->status) {
    case SHX_E_FULL:
        if (seconds > 0)
            return PyErr_Format(st->queue_full, "Queue '%s' stayed full for %s s: no room for a record of %llu bytes",
                                name, secs, (unsigned long long)err->a);
        return PyErr_Format(st->queue_full, "Queue '%s' is full: no room for a record of %llu bytes", name,
                            (unsigned long long)err->a);
    case SHX_E_EMPTY:
        if (seconds > 0)
            return PyErr_Format(st->queue_empty, "Queue '%s' stayed empty for %s s", name, secs);
        return PyErr_Format(st->queue_empty, "Queue '%s' is empty", name);
    case SHX_E_TOOBIG:
        return PyErr_Format(PyExc_ValueError,
                            "a message of %llu bytes never fits Queue '%s': its largest message is %llu bytes "
                            "(capacity %llu)",
                            (unsigned long long)err->a, name, (unsigned long long)err->b,
                            (unsigned long long)self->base.block.capacity);
    default: return shx_py_raise_block(&self->base, err);
    }
}

/* ---- put ---------------------------------------------------------------------- */

/* Puts m and releases it.  With no_room set, a full queue is no error:
 * *no_room is then the size of the record that found no room, else 0. */
static int put_outgoing(QueueObject *self, outgoing *m, double seconds, uint64_t start, uint64_t *no_room)
{
    shx_py_release release;
    shx_error err;
    int rc;
    do {
        if (shx_py_enter(&self->base) < 0) {
            outgoing_release(m);
            return -1;
        }
        shx_hooks hooks = SHX_PY_HOOKS(release, &self->base);
        rc = shx_queue_put(&self->base.block, m->type, m->parts, m->n, left_ns(seconds, start), &hooks, &err);
        shx_py_leave(&self->base);
    } while (SHX_PY_RETRY(rc, release));
    outgoing_release(m);
    if (no_room != NULL)
        *no_room = rc == SHX_E_FULL ? err.a : 0;
    if (rc != SHX_OK && !(rc == SHX_E_FULL && no_room != NULL)) {
        if (!PyErr_Occurred())
            raise_queue(self, &err, seconds);
        return -1;
    }
    return 0;
}

static int put_one(QueueObject *self, PyObject *obj, double seconds, uint64_t start, uint64_t *no_room)
{
    outgoing m;
    if (outgoing_make(STATE(self), obj, &m) < 0)
        return -1;
    return put_outgoing(self, &m, seconds, start, no_room);
}

/* _put_raw(kind, data, timeout=None): a message as _peek() gave it (kind 1:
 * bytes, 6: a pickle, 7: a framed pickle), never unpickled here; a bridge
 * carries pickles it may not load.  A framed pickle that is not well formed
 * is refused by whoever loads it (CorruptBlockError), as from the ring. */
static PyObject *queue_put_raw(QueueObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"kind", "data", "timeout"};
    static const shx_py_sig sig = {"_put_raw", names, 3, 2, 3};
    PyObject *v[3];
    double seconds;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || wait_args("_put_raw", NULL, v[2], &seconds) < 0)
        return NULL;
    long kind = PyLong_AsLong(v[0]);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    if (kind != SHX_TYPE_BYTES && kind != SHX_TYPE_PICKLE && kind != SHX_TYPE_PICKLE_FRAMED)
        return PyErr_Format(PyExc_ValueError, "_put_raw(): kind %ld is not 1 (bytes), 6 or 7 (pickles)", kind);
    outgoing m;
    memset(&m, 0, sizeof m);
    if (PyObject_GetBuffer(v[1], &m.view, PyBUF_SIMPLE) < 0)
        return NULL;
    m.have_view = 1;
    outgoing_one(&m, (uint32_t)kind, m.view.buf, (size_t)m.view.len);
    if (put_outgoing(self, &m, seconds, seconds > 0 ? shx_os_monotonic_ns() : 0, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *queue_put(QueueObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"obj", "block", "timeout"};
    static const shx_py_sig sig = {"put", names, 3, 1, 3};
    PyObject *v[3];
    double seconds;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || wait_args("put", v[1], v[2], &seconds) < 0)
        return NULL;
    if (put_one(self, v[0], seconds, shx_os_monotonic_ns(), NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *queue_put_nowait(QueueObject *self, PyObject *obj)
{
    if (put_one(self, obj, 0, 0, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* put_nowait() for put_async(), whose watcher hands the room taken to the
 * awaiting puts it fits, in turn: 0 once put, else the size of the record
 * that found no room. */
static PyObject *queue_try_put(QueueObject *self, PyObject *obj)
{
    uint64_t no_room;
    if (put_one(self, obj, 0, 0, &no_room) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(no_room);
}

static PyObject *queue_put_many(QueueObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"messages", "block", "timeout"};
    static const shx_py_sig sig = {"put_many", names, 3, 1, 3};
    PyObject *v[3];
    double seconds;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || wait_args("put_many", v[1], v[2], &seconds) < 0)
        return NULL;
    PyObject *it = PyObject_GetIter(v[0]);
    if (it == NULL)
        return NULL;
    uint64_t start = shx_os_monotonic_ns();
    Py_ssize_t done = 0;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        int rc = put_one(self, item, seconds, start, NULL);
        Py_DECREF(item);
        if (rc < 0)
            break;
        done++;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(done);
}

/* ---- get ---------------------------------------------------------------------- */

static PyObject *refuse_pickle(QueueObject *self)
{
    return PyErr_Format(STATE(self)->error,
                        "Queue '%s' took a pickled message and did not unpickle it: the queue can be written by "
                        "other users, and unpickling runs code. Open it with unpickle=True if you trust them",
                        self->base.block.name);
}

/* The pickle and buffers of a framed message, each checked against the
 * message: the frame came from shared memory. */
static PyObject *load_framed(QueueObject *self, PyObject *data)
{
    module_state *st = STATE(self);
    const unsigned char *p = (const unsigned char *)PyByteArray_AS_STRING(data);
    size_t total = (size_t)PyByteArray_GET_SIZE(data);
    uint64_t count, pickle_len;
    if (total < 2 * sizeof(uint64_t))
        goto corrupt;
    memcpy(&count, p, sizeof count);
    memcpy(&pickle_len, p + 8, sizeof pickle_len);
    if (count > FRAME_MAX_BUFFERS || (2 + count) * sizeof(uint64_t) > total)
        goto corrupt;
    size_t at = (size_t)(2 + count) * sizeof(uint64_t);
    at += pad_to_align(at);
    if (at > total || pickle_len > total - at)
        goto corrupt;
    size_t pickle_at = at;
    at += (size_t)pickle_len;
    PyObject *whole = PyMemoryView_FromObject(data);
    if (whole == NULL)
        return NULL;
    PyObject *buffers = PyList_New((Py_ssize_t)count);
    if (buffers == NULL) {
        Py_DECREF(whole);
        return NULL;
    }
    for (uint64_t i = 0; i < count; i++) {
        uint64_t len;
        memcpy(&len, p + 16 + 8 * i, sizeof len);
        at += pad_to_align(at);
        if (at > total || len > total - at) {
            Py_DECREF(buffers);
            Py_DECREF(whole);
            goto corrupt;
        }
        PyObject *piece = PySequence_GetSlice(whole, (Py_ssize_t)at, (Py_ssize_t)(at + len));
        if (piece == NULL) {
            Py_DECREF(buffers);
            Py_DECREF(whole);
            return NULL;
        }
        PyList_SET_ITEM(buffers, (Py_ssize_t)i, piece);
        at += (size_t)len;
    }
    PyObject *pickle = PySequence_GetSlice(whole, (Py_ssize_t)pickle_at, (Py_ssize_t)(pickle_at + pickle_len));
    Py_DECREF(whole);
    if (pickle == NULL) {
        Py_DECREF(buffers);
        return NULL;
    }
    PyObject *args[2] = {pickle, buffers};
    PyObject *kwnames = Py_BuildValue("(s)", "buffers");
    PyObject *result = kwnames ? PyObject_Vectorcall(st->pickle_loads, args, 1, kwnames) : NULL;
    Py_XDECREF(kwnames);
    Py_DECREF(pickle);
    Py_DECREF(buffers);
    return result;
corrupt:
    return PyErr_Format(st->corrupt_error, "block '%s': holds a pickled message whose frame does not fit it",
                        self->base.block.name);
}

/* The object a message stands for. */
static PyObject *incoming(QueueObject *self, uint32_t type, PyObject *data)
{
    if (type != SHX_TYPE_PICKLE && type != SHX_TYPE_PICKLE_FRAMED)
        return data;
    PyObject *obj = NULL;
    if (!self->unpickle)
        refuse_pickle(self);
    else if (type == SHX_TYPE_PICKLE)
        obj = PyObject_CallOneArg(STATE(self)->pickle_loads, data);
    else
        obj = load_framed(self, data);
    Py_DECREF(data);
    return obj;
}

static int raise_pending(QueueObject *self)
{
    SHX_PY_LOCK(&self->base.mutex);
    PyObject *pending = self->pending;
    self->pending = NULL;
    SHX_PY_UNLOCK(&self->base.mutex);
    if (pending == NULL)
        return 0;
    PyErr_SetObject((PyObject *)Py_TYPE(pending), pending);
    Py_DECREF(pending);
    return -1;
}

/* Waits (`seconds`: 0 only tries, < 0 for ever) for a message and copies it
 * out as bytes or str into *obj: taken, or with `spot` left in the queue
 * (shx_queue_peek).  Returns SHX_OK, SHX_E_MOVED for a peek at a message
 * another consumer took meanwhile, or -1 with an exception set. */
static int copy_message(QueueObject *self, double seconds, shx_queue_spot *spot, PyObject **obj, uint32_t *type)
{
    shx_py_dst dst = {NULL, 0};
    shx_py_release release;
    shx_error err;
    size_t nbytes;
    int rc;
    uint64_t start = seconds > 0 ? shx_os_monotonic_ns() : 0;
    *type = 0;
    do {
        if (shx_py_enter(&self->base) < 0) {
            Py_XDECREF(dst.obj);
            return -1;
        }
        shx_hooks hooks = SHX_PY_HOOKS(release, &self->base);
        int64_t left = left_ns(seconds, start);
        rc = spot == NULL
                 ? shx_queue_get(&self->base.block, shx_py_prepare_dst, &dst, left, &hooks, type, &nbytes, &err)
                 : shx_queue_peek(&self->base.block, spot, shx_py_prepare_dst, &dst, left, &hooks, type, &nbytes, &err);
        shx_py_leave(&self->base);
    } while (SHX_PY_RETRY(rc, release));
    if (rc == SHX_OK) {
        *obj = dst.obj;
        return SHX_OK;
    }
    Py_XDECREF(dst.obj);
    if (rc == SHX_E_MOVED)
        return rc;
    if (!PyErr_Occurred())
        raise_queue(self, &err, seconds);
    return -1;
}

static PyObject *get_one(QueueObject *self, double seconds)
{
    PyObject *data;
    uint32_t type;
    if (copy_message(self, seconds, NULL, &data, &type) != SHX_OK)
        return NULL;
    return incoming(self, type, data);
}

static PyObject *queue_get(QueueObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"block", "timeout"};
    static const shx_py_sig sig = {"get", names, 2, 0, 2};
    PyObject *v[2];
    double seconds;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || wait_args("get", v[0], v[1], &seconds) < 0 ||
        raise_pending(self) < 0)
        return NULL;
    return get_one(self, seconds);
}

static PyObject *queue_get_nowait(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (raise_pending(self) < 0)
        return NULL;
    return get_one(self, 0);
}

/* _peek(at=None, timeout=None): the message at byte position `at` (the
 * oldest: None) copied and left in the queue, as (at, next, kind, data):
 * data is str for text, else bytes (a pickle is not loaded); kind as
 * _put_raw() takes it, or 0 for text.  None when another consumer took it
 * first; queue.Empty when none came in time.  With _drop(at, next) a
 * bridge takes a message only once it has handed it on. */
static PyObject *queue_peek(QueueObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"at", "timeout"};
    static const shx_py_sig sig = {"_peek", names, 2, 0, 2};
    PyObject *v[2];
    double seconds;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || wait_args("_peek", NULL, v[1], &seconds) < 0)
        return NULL;
    shx_queue_spot spot = {SHX_QUEUE_AT_HEAD, 0};
    if (v[0] != NULL && v[0] != Py_None) {
        unsigned long long at = PyLong_AsUnsignedLongLong(v[0]);
        if (at == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        spot.at = at;
    }
    PyObject *data;
    uint32_t type;
    int rc = copy_message(self, seconds, &spot, &data, &type);
    if (rc == SHX_E_MOVED)
        Py_RETURN_NONE;
    if (rc != SHX_OK)
        return NULL;
    long kind = type <= SHX_TYPE_UCS4 && type != SHX_TYPE_BYTES ? 0 : (long)type;
    return Py_BuildValue("(KKlN)", (unsigned long long)spot.at, (unsigned long long)spot.next, kind, data);
}

static PyObject *queue_drop(QueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2)
        return PyErr_Format(PyExc_TypeError, "_drop() takes 2 arguments (%zd given)", nargs);
    unsigned long long from = PyLong_AsUnsignedLongLong(args[0]), to;
    if (from == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    to = PyLong_AsUnsignedLongLong(args[1]);
    if (to == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (shx_py_enter(&self->base) < 0)
        return NULL;
    shx_error err;
    int rc = shx_queue_drop(&self->base.block, from, to, &err);
    shx_py_leave(&self->base);
    if (rc == SHX_E_MOVED)
        Py_RETURN_FALSE;
    if (rc == SHX_E_RANGE)
        return PyErr_Format(PyExc_ValueError, "_drop(): %llu..%llu is not a run of records in Queue '%s'", from, to,
                            self->base.block.name);
    if (rc != SHX_OK)
        return raise_queue(self, &err, 0);
    Py_RETURN_TRUE;
}

static PyObject *queue_get_many(QueueObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"max_messages", "block", "timeout"};
    static const shx_py_sig sig = {"get_many", names, 3, 1, 3};
    PyObject *v[3];
    double seconds;
    Py_ssize_t most;
    if (shx_py_parse(&sig, args, nargs, kwnames, v) < 0 || shx_py_index_arg(v[0], "max_messages", &most) < 0 ||
        wait_args("get_many", v[1], v[2], &seconds) < 0)
        return NULL;
    if (most < 1)
        return PyErr_Format(PyExc_ValueError, "get_many(): max_messages must be at least 1, not %zd", most);
    if (raise_pending(self) < 0)
        return NULL;
    PyObject *first = get_one(self, seconds);
    if (first == NULL)
        return NULL;
    PyObject *list = PyList_New(1);
    if (list == NULL) {
        Py_DECREF(first); /* taken and dropped: only when no memory is left */
        return NULL;
    }
    PyList_SET_ITEM(list, 0, first);
    module_state *st = STATE(self);
    while (PyList_GET_SIZE(list) < most) {
        PyObject *item = get_one(self, 0);
        if (item == NULL) {
            if (PyErr_ExceptionMatches(st->queue_empty)) {
                PyErr_Clear();
                break;
            }
            /* What was taken is returned; the error waits for the next get. */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL && value != NULL)
                PyException_SetTraceback(value, tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            SHX_PY_LOCK(&self->base.mutex);
            PyObject *old = self->pending;
            self->pending = value;
            SHX_PY_UNLOCK(&self->base.mutex);
            Py_XDECREF(old);
            break;
        }
        int rc = PyList_Append(list, item);
        Py_DECREF(item);
        if (rc < 0) {
            Py_DECREF(list);
            return NULL;
        }
    }
    return list;
}

/* ---- the rest ----------------------------------------------------------------- */

static PyObject *queue_qsize(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (shx_py_enter(&self->base) < 0)
        return NULL;
    uint64_t count = shx_queue_count(&self->base.block);
    shx_py_leave(&self->base);
    return PyLong_FromUnsignedLongLong(count);
}

static PyObject *queue_empty(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (shx_py_enter(&self->base) < 0)
        return NULL;
    uint64_t used = shx_queue_used(&self->base.block);
    shx_py_leave(&self->base);
    return PyBool_FromLong(used == 0);
}

static PyObject *queue_full(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (shx_py_enter(&self->base) < 0)
        return NULL;
    uint64_t used = shx_queue_used(&self->base.block);
    shx_py_leave(&self->base);
    /* No room for even an empty message. */
    return PyBool_FromLong(self->base.block.capacity - used < SHX_QUEUE_RECORD);
}

static PyObject *queue_get_used(QueueObject *self, void *Py_UNUSED(c))
{
    if (shx_py_enter(&self->base) < 0)
        return NULL;
    uint64_t used = shx_queue_used(&self->base.block);
    shx_py_leave(&self->base);
    return PyLong_FromUnsignedLongLong(used);
}

static PyObject *queue_get_max_message(QueueObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(shx_queue_max_message(&self->base.block));
}

static PyObject *queue_get_unpickle(QueueObject *self, void *Py_UNUSED(c)) { return PyBool_FromLong(self->unpickle); }

static PyObject *queue_get_version(QueueObject *self, void *Py_UNUSED(c))
{
    if (shx_py_enter(&self->base) < 0)
        return NULL;
    uint64_t version = shx_value_version(&self->base.block);
    shx_py_leave(&self->base);
    return PyLong_FromUnsignedLongLong(version);
}

static PyObject *queue_get_taken(QueueObject *self, void *Py_UNUSED(c))
{
    if (shx_py_enter(&self->base) < 0)
        return NULL;
    uint64_t taken = shx_queue_taken(&self->base.block);
    shx_py_leave(&self->base);
    return PyLong_FromUnsignedLongLong(taken);
}

static PyObject *queue_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static const char *const names[] = {"name",  "capacity", "persist", "mode",
                                        "scope", "security", "create",  "unpickle"};
    static const shx_py_sig sig = {"Queue", names, 8, 1, 2};
    PyObject *v[8];
    int persist = 0, mode = 0600, create = 1, unpickle = -1;
    const char *scope = NULL, *security = NULL;
    uint64_t capacity;
    if (shx_py_parse_tuple(&sig, args, kwds, v) < 0)
        return NULL;
    const char *name = shx_py_name_arg(v[0], "name");
    if (name == NULL || shx_py_size_arg(v[1], "capacity", 1, &capacity) < 0 || shx_py_bool_arg(v[2], &persist) < 0 ||
        shx_py_mode_arg(v[3], &mode) < 0 || shx_py_opt_str_arg(v[4], "scope", &scope) < 0 ||
        shx_py_opt_str_arg(v[5], "security", &security) < 0 || shx_py_bool_arg(v[6], &create) < 0 ||
        (v[7] != NULL && v[7] != Py_None && shx_py_bool_arg(v[7], &unpickle) < 0))
        return NULL;
    if (v[1] != NULL && v[1] != Py_None && capacity < SHX_QUEUE_MIN_CAPACITY)
        return PyErr_Format(PyExc_ValueError, "Queue capacity %llu is too small: a queue needs at least %d bytes",
                            (unsigned long long)capacity, SHX_QUEUE_MIN_CAPACITY);
    if (queue_support(type) == NULL)
        return NULL;
    QueueObject *self = (QueueObject *)shx_py_block_new(type, name, SHX_KIND_QUEUE, capacity,
                                                        shx_py_open_flags(persist, create), mode, 0, scope, security);
    if (self == NULL)
        return NULL;
    if (unpickle < 0) {
        /* Unpickling runs code: only what nobody else can write is loaded
         * unless the opener says so; where the OS cannot tell, nothing. */
        int shared = shx_os_others_may_write(&self->base.block.map);
        unpickle = (mode & 022) == 0 && security == NULL && shared == 0;
    }
    self->unpickle = unpickle;
    return (PyObject *)self;
}

static PyObject *queue_repr(QueueObject *self)
{
    if (shx_py_enter_quietly(&self->base)) {
        unsigned long long count = (unsigned long long)shx_queue_count(&self->base.block);
        shx_py_leave(&self->base);
        return PyUnicode_FromFormat("<shmemext.Queue name='%s' capacity=%llu messages=%llu>", self->base.block.name,
                                    (unsigned long long)self->base.block.capacity, count);
    }
    return PyUnicode_FromFormat("<shmemext.Queue name='%s' closed>", self->base.block.name);
}

static void queue_dealloc(QueueObject *self)
{
    Py_CLEAR(self->pending);
    shx_py_block_dealloc(&self->base);
}

static int queue_traverse(QueueObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pending);
    return shx_py_block_traverse((PyObject *)self, visit, arg);
}

static int queue_clear(QueueObject *self)
{
    Py_CLEAR(self->pending);
    return 0;
}

/* put_async() and get_async() are Python (shmemext/_aio.py). */

static PyObject *queue_put_async(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return shx_py_call_aio("queue_put_async", self, args, nargs, kwnames);
}

static PyObject *queue_get_async(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return shx_py_call_aio("queue_get_async", self, args, nargs, kwnames);
}

static PyMethodDef queue_methods[] = {
    {"put", (PyCFunction)(void (*)(void))queue_put, METH_FASTCALL | METH_KEYWORDS,
     "put($self, /, obj, block=True, timeout=None)\n--\n\nPut obj at the end of the queue: str and bytes-like objects\n"
     "as they are, anything else pickled.  When full, wait for room (at most `timeout` seconds);\n"
     "queue.Full if there is none.  ValueError for a message that can never fit."},
    {"put_nowait", (PyCFunction)queue_put_nowait, METH_O,
     "put_nowait($self, obj, /)\n--\n\nput(obj, block=False): queue.Full at once when there is no room."},
    {"_try_put", (PyCFunction)queue_try_put, METH_O,
     "_try_put($self, obj, /)\n--\n\nput_nowait(obj), but a full queue returns the size of the record that\n"
     "found no room (0 once put) instead of raising queue.Full."},
    {"put_many", (PyCFunction)(void (*)(void))queue_put_many, METH_FASTCALL | METH_KEYWORDS,
     "put_many($self, /, messages, block=True, timeout=None)\n--\n\nPut each of an iterable of messages, in order,\n"
     "and return how many.  On an error the messages before it are in the queue.  `timeout` is\n"
     "for the whole batch."},
    {"get", (PyCFunction)(void (*)(void))queue_get, METH_FASTCALL | METH_KEYWORDS,
     "get($self, /, block=True, timeout=None)\n--\n\nTake the oldest message: bytes or str as it was put, or the\n"
     "unpickled object.  When empty, wait (at most `timeout` seconds); queue.Empty if none comes."},
    {"get_nowait", (PyCFunction)queue_get_nowait, METH_NOARGS,
     "get_nowait($self, /)\n--\n\nget(block=False): queue.Empty at once when there is no message."},
    {"get_many", (PyCFunction)(void (*)(void))queue_get_many, METH_FASTCALL | METH_KEYWORDS,
     "get_many($self, /, max_messages, block=True, timeout=None)\n--\n\nTake up to max_messages messages: waits as\n"
     "get() does for the first, then takes what is there without waiting.  An error after the\n"
     "first returns what was taken and is raised by the next get."},
    {"qsize", (PyCFunction)queue_qsize, METH_NOARGS,
     "qsize($self, /)\n--\n\nMessages in the queue now (other processes may change it at once)."},
    {"empty", (PyCFunction)queue_empty, METH_NOARGS, "empty($self, /)\n--\n\nTrue if the queue holds no message now."},
    {"full", (PyCFunction)queue_full, METH_NOARGS,
     "full($self, /)\n--\n\nTrue if not even an empty message fits now (a larger one may not fit earlier)."},
    {"put_async", (PyCFunction)(void (*)(void))queue_put_async, METH_FASTCALL | METH_KEYWORDS,
     "put_async($self, /, obj, timeout=None)\n--\n\nput() for asyncio: `await q.put_async(obj)`.  A task waiting\n"
     "for room sleeps in the watcher thread of Value.wait_async() until a consumer takes a message."},
    {"get_async", (PyCFunction)(void (*)(void))queue_get_async, METH_FASTCALL | METH_KEYWORDS,
     "get_async($self, /, timeout=None)\n--\n\nget() for asyncio: `await q.get_async()`.  Sleeping tasks share\n"
     "the watcher thread of Value.wait_async()."},
    {"_peek", (PyCFunction)(void (*)(void))queue_peek, METH_FASTCALL | METH_KEYWORDS,
     "_peek($self, /, at=None, timeout=None)\n--\n\nThe message at byte position `at` (None: the oldest), left in\n"
     "the queue: (at, next, kind, data), or None when another consumer took it first (for a bridge)."},
    {"_drop", (PyCFunction)(void (*)(void))queue_drop, METH_FASTCALL,
     "_drop($self, start, end, /)\n--\n\nTake the messages _peek() saw from start to end: False when the oldest\n"
     "message is not at start (another consumer took it), nothing taken."},
    {"_put_raw", (PyCFunction)(void (*)(void))queue_put_raw, METH_FASTCALL | METH_KEYWORDS,
     "_put_raw($self, /, kind, data, timeout=None)\n--\n\nPut a message as _peek() gave it (kind 1: bytes, 6 or 7:\n"
     "a pickle), without loading it."},
    SHX_PY_BLOCK_METHODS,
    {NULL, NULL, 0, NULL}};

static PyGetSetDef queue_getset[] = {
    SHX_PY_BLOCK_GETSET,
    {"capacity", (getter)shx_py_block_get_size, NULL,
     "Bytes of room for messages (each takes its length rounded up to 16, plus 16).", NULL},
    {"max_message", (getter)queue_get_max_message, NULL, "The largest message in bytes the queue can take.", NULL},
    {"unpickle", (getter)queue_get_unpickle, NULL, "Whether pickled messages are unpickled (see Queue).", NULL},
    {"_used", (getter)queue_get_used, NULL, "Bytes of records in the queue now.", NULL},
    {"_version", (getter)queue_get_version, NULL, "Messages ever committed (modulo 2**64).", NULL},
    {"_taken", (getter)queue_get_taken, NULL, "Bytes of records ever taken (modulo 2**64): moves as room comes.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(queue_doc,
             "Queue(name, capacity=None, *, persist=False, mode=0o600, scope='session', security=None, create=True,\n"
             "      unpickle=None)\n--\n\n"
             "A named, bounded queue of messages between processes.\n\n"
             "The first process to open `name` creates it with `capacity` bytes of room for messages\n"
             "(1 MiB when None); later ones take the existing queue's.  It lives while any process has it\n"
             "open, unless persist=True.  Every message put is taken by exactly one get(), in some\n"
             "process; a process killed at any point loses no committed message and wedges nothing.\n\n"
             "unpickle: whether pickled messages are loaded.  None (the default) loads them only when no\n"
             "other user can write the queue (a private mode, and the OS says so); unpickling runs code.");

static PyType_Slot queue_slots[] = {
    {Py_tp_new, queue_new},       {Py_tp_dealloc, queue_dealloc}, {Py_tp_traverse, queue_traverse},
    {Py_tp_clear, queue_clear},   {Py_tp_repr, queue_repr},       {Py_tp_methods, queue_methods},
    {Py_tp_getset, queue_getset}, {Py_tp_doc, (void *)queue_doc}, {0, NULL}};

PyType_Spec shx_py_queue_spec = {
    .name = "shmemext.Queue",
    .basicsize = sizeof(QueueObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = queue_slots,
};
