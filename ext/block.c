/* The life of a block: names, attach and the header, detach, fork, listing,
 * the writer lock, and a raw segment's bounds-checked copies (segment.h). */
#include "core.h"
#include "queue.h"

#include <string.h>

_Static_assert(offsetof(shx_header, lock_area) == 64, "lock area starts the second cache line");
_Static_assert(offsetof(shx_header, version) == 192, "version has its own cache line");
_Static_assert(offsetof(shx_header, slot) == 256, "slots start on their own cache lines");
_Static_assert(offsetof(shx_header, wake_seq) % 4 == 0, "the futex word is 4-byte aligned");
_Static_assert(offsetof(shx_header, token) == SHX_TOKEN_OFFSET, "the backend's token where platform.h says");
_Static_assert(offsetof(shx_header, flags) == SHX_FLAGS_OFFSET, "the flags where platform.h says");
_Static_assert(SHX_FLAG_PERSIST == SHX_PERSIST_BIT, "the persist bit as platform.h says");
_Static_assert(sizeof(shx_header) <= SHX_PEEK_BYTES, "a peek sees the whole header");
_Static_assert(sizeof(shx_slot) == 64, "one slot header per cache line");
_Static_assert(sizeof(shx_header) <= SHX_HEADER_SIZE, "header fits its page");
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free to work across processes");

static const char MAGIC[8] = {'S', 'H', 'M', 'E', 'M', 'E', 'X', 'T'};
_Static_assert(sizeof SHX_MAGIC - 1 == sizeof MAGIC, "one magic");

static size_t round_up_64(uint64_t n) { return (size_t)((n + 63) & ~(uint64_t)63); }

static int known_kind(uint32_t kind)
{
    return kind == SHX_KIND_VALUE || kind == SHX_KIND_SEGMENT || kind == SHX_KIND_QUEUE;
}

static uint64_t total_size(uint32_t kind, uint64_t capacity)
{
    if (kind == SHX_KIND_VALUE)
        return SHX_HEADER_SIZE + 2 * (uint64_t)round_up_64(capacity);
    return SHX_HEADER_SIZE + capacity;
}

int shx_name_check(const char *name, size_t len, shx_error *err)
{
    if (len == 0)
        return shx_fail(err, SHX_E_NAME, 0, SHX_NAME_MAX, "is empty");
    if (len > SHX_NAME_MAX)
        return shx_fail(err, SHX_E_NAME, len, SHX_NAME_MAX, "is too long");
    if (name[0] == '.' || name[0] == '-')
        return shx_fail(err, SHX_E_NAME, 0, SHX_NAME_MAX, "starts with '.' or '-'");
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
                 c == '-';
        if (!ok)
            return shx_fail(err, SHX_E_NAME, i, SHX_NAME_MAX, "has a character outside [A-Za-z0-9_.-]");
    }
    return SHX_OK;
}

/* ---- attach -------------------------------------------------------------- */

typedef struct open_request {
    shx_block *b;
    uint32_t kind;
    uint64_t capacity;  /* for creation */
    int capacity_given; /* an existing block must have at least this much */
    unsigned flags;
} open_request;

static void adopt(shx_block *b, shx_os_map *m, uint32_t kind, uint64_t capacity)
{
    b->hdr = (shx_header *)m->base;
    b->data = (unsigned char *)m->base + SHX_HEADER_SIZE;
    b->capacity = capacity;
    b->slot_stride = round_up_64(capacity);
    b->kind = kind;
}

static int init_header(shx_os_map *m, const open_request *rq, shx_error *err)
{
    shx_header *h = (shx_header *)m->base;
    h->layout = SHX_LAYOUT;
    h->header_size = SHX_HEADER_SIZE;
    h->capacity = rq->capacity;
    h->total_size = total_size(rq->kind, rq->capacity);
    h->kind = rq->kind;
    h->creator_pid = shx_os_pid();
    atomic_store_explicit(&h->flags, (rq->flags & SHX_PERSIST) ? SHX_FLAG_PERSIST : 0, memory_order_relaxed);
    int rc = shx_os_lock_init(m, h->lock_area, err);
    if (rc != SHX_OK)
        return rc;
    /* The magic goes last: a creator that dies before this leaves a block
     * that the next process recognizes as unfinished and starts afresh. */
    atomic_thread_fence(memory_order_release);
    memcpy(h->magic, MAGIC, sizeof MAGIC);
    return SHX_OK;
}

enum { HEADER_UNFINISHED = -100 };

/* Validates an existing header against the mapped size. */
static int check_header(const shx_os_map *m, shx_error *err)
{
    static const char zeros[8] = {0};
    const shx_header *h = (const shx_header *)m->base;
    if (m->size < SHX_HEADER_SIZE)
        return shx_fail(err, SHX_E_FOREIGN, m->size, SHX_HEADER_SIZE, "is smaller than a block header");
    if (memcmp(h->magic, zeros, sizeof zeros) == 0)
        return HEADER_UNFINISHED;
    if (memcmp(h->magic, MAGIC, sizeof MAGIC) != 0)
        return shx_fail(err, SHX_E_FOREIGN, 0, 0, "does not start with the shmemext magic");
    uint32_t layout = h->layout;
    if (layout > SHX_LAYOUT)
        return shx_fail(err, SHX_E_NEWER, layout, SHX_LAYOUT, NULL);
    if (layout != SHX_LAYOUT || h->header_size != SHX_HEADER_SIZE)
        return shx_fail(err, SHX_E_CORRUPT, layout, h->header_size, "has an unknown layout or header size");
    uint32_t kind = h->kind;
    uint64_t capacity = h->capacity;
    if (!known_kind(kind))
        return shx_fail(err, SHX_E_CORRUPT, kind, 0, "has an unknown kind");
    if (capacity == 0 || capacity > SHX_MAX_CAPACITY)
        return shx_fail(err, SHX_E_CORRUPT, capacity, SHX_MAX_CAPACITY, "has an impossible capacity");
    /* A queue's records start on multiples of their head's size. */
    if (kind == SHX_KIND_QUEUE && (capacity % SHX_QUEUE_RECORD != 0 || capacity < SHX_QUEUE_MIN_CAPACITY))
        return shx_fail(err, SHX_E_CORRUPT, capacity, SHX_QUEUE_RECORD, "has a queue capacity no ring can have");
    if (total_size(kind, capacity) > m->size)
        return shx_fail(err, SHX_E_CORRUPT, total_size(kind, capacity), m->size, "is smaller than its header says");
    return SHX_OK;
}

static int on_attach(void *vrq, shx_os_map *m, int state, shx_error *err)
{
    open_request *rq = (open_request *)vrq;
    shx_header *h = (shx_header *)m->base;
    int rc;

    if (state == SHX_ATTACH_FRESH) {
        if ((rc = init_header(m, rq, err)) != SHX_OK)
            return rc;
        adopt(rq->b, m, rq->kind, rq->capacity);
        return SHX_OK;
    }
    rc = check_header(m, err);
    if (state == SHX_ATTACH_ALONE) {
        /* Nobody holds it: unless it was made to persist, it was left behind by
         * processes that died (or by a creator that died half way): start afresh. */
        if (rc == HEADER_UNFINISHED)
            return SHX_REINIT;
        if (rc == SHX_OK && !(atomic_load_explicit(&h->flags, memory_order_relaxed) & SHX_FLAG_PERSIST))
            return SHX_REINIT;
    }
    if (rc == HEADER_UNFINISHED)
        return shx_fail(err, SHX_E_CORRUPT, 0, 0, "was never finished by its creator");
    if (rc != SHX_OK)
        return rc;
    uint32_t kind = h->kind;
    uint64_t capacity = h->capacity;
    if (kind != rq->kind)
        return shx_fail(err, SHX_E_KIND, kind, rq->kind, NULL);
    if (rq->capacity_given && rq->capacity > capacity)
        return shx_fail(err, SHX_E_CAPACITY, rq->capacity, capacity, NULL);
    if ((rq->flags & SHX_PERSIST) && !(atomic_load_explicit(&h->flags, memory_order_relaxed) & SHX_FLAG_PERSIST)) {
        if (!SHX_OS_PERSIST_LATER)
            return shx_fail(err, SHX_E_PERSIST, 0, 0, NULL);
        atomic_fetch_or_explicit(&h->flags, SHX_FLAG_PERSIST, memory_order_relaxed);
    }
    adopt(rq->b, m, kind, capacity);
    return SHX_OK;
}

int shx_block_open(shx_block *b, const char *name, uint32_t kind, uint64_t capacity, unsigned flags, unsigned mode,
                   shx_error *err)
{
    return shx_block_open_secured(b, name, kind, capacity, flags, mode, NULL, err);
}

int shx_block_open_secured(shx_block *b, const char *name, uint32_t kind, uint64_t capacity, unsigned flags,
                           unsigned mode, const char *security, shx_error *err)
{
    return shx_block_open_hooked(b, name, kind, capacity, flags, mode, security, NULL, err);
}

/* The OS layer's interruption check: the caller's, asked outside its blocking region. */
static int open_interrupted(void *vhooks)
{
    const shx_hooks *hooks = (const shx_hooks *)vhooks;
    if (hooks->blocking_end != NULL)
        hooks->blocking_end(hooks->ctx);
    int stop = hooks->interrupted(hooks->ctx);
    if (hooks->blocking_begin != NULL)
        hooks->blocking_begin(hooks->ctx);
    return stop;
}

int shx_block_open_hooked(shx_block *b, const char *name, uint32_t kind, uint64_t capacity, unsigned flags,
                          unsigned mode, const char *security, const shx_hooks *hooks, shx_error *err)
{
    size_t len = strlen(name);
    int rc;
    if (b->attached)
        return shx_fail(err, SHX_E_INUSE, 0, 0, NULL);
    memset(b, 0, sizeof *b);
    if ((rc = shx_name_check(name, len, err)) != SHX_OK)
        return rc;
    if (capacity > SHX_MAX_CAPACITY)
        return shx_fail(err, SHX_E_SIZE, capacity, SHX_MAX_CAPACITY, NULL);
    memcpy(b->name, name, len + 1);

    uint64_t make = capacity ? capacity : SHX_DEFAULT_CAPACITY;
    if (kind == SHX_KIND_QUEUE) {
        if (capacity == 0)
            make = SHX_QUEUE_DEFAULT_CAPACITY;
        else if (capacity < SHX_QUEUE_MIN_CAPACITY)
            return shx_fail(err, SHX_E_SIZE, capacity, SHX_MAX_CAPACITY, NULL);
        /* Whole records: up to the next multiple of their head's size. */
        make = (make + SHX_QUEUE_RECORD - 1) / SHX_QUEUE_RECORD * SHX_QUEUE_RECORD;
    }
    open_request rq = {b, kind, make, capacity != 0, flags};
    unsigned os_flags = ((flags & SHX_PRIVATE_OWNER) ? SHX_OPEN_REQUIRE_OWNER : 0) |
                        ((flags & SHX_GLOBAL) ? SHX_OPEN_GLOBAL : 0) | ((flags & SHX_PERSIST) ? SHX_OPEN_PERSIST : 0) |
                        ((flags & SHX_EXISTING) ? SHX_OPEN_EXISTING : 0);
    shx_os_interrupt intr = {open_interrupted, (void *)hooks};
    int waits = hooks != NULL && hooks->interrupted != NULL;
    if (hooks != NULL && hooks->blocking_begin != NULL)
        hooks->blocking_begin(hooks->ctx);
    rc = shx_os_attach(&b->map, name, (size_t)total_size(kind, rq.capacity), mode, os_flags, security, on_attach, &rq,
                       waits ? &intr : NULL, &b->created, err);
    if (hooks != NULL && hooks->blocking_end != NULL)
        hooks->blocking_end(hooks->ctx);
    if (rc != SHX_OK)
        return rc;
    b->attached = 1;
    return SHX_OK;
}

static int keep_name(const shx_os_map *m)
{
    const shx_header *h = (const shx_header *)m->base;
    return m->base != NULL && (atomic_load_explicit(&h->flags, memory_order_relaxed) & SHX_FLAG_PERSIST);
}

int shx_block_close(shx_block *b, int at_exit, shx_error *err)
{
    if (!b->attached)
        return SHX_OK;
    b->attached = 0;
    return shx_os_detach(&b->map, keep_name, at_exit, NULL, err);
}

int shx_block_close_hooked(shx_block *b, const shx_hooks *hooks, shx_error *err)
{
    if (!b->attached)
        return SHX_OK;
    shx_os_interrupt intr = {open_interrupted, (void *)hooks};
    int waits = hooks != NULL && hooks->interrupted != NULL;
    b->attached = 0;
    if (hooks != NULL && hooks->blocking_begin != NULL)
        hooks->blocking_begin(hooks->ctx);
    int rc = shx_os_detach(&b->map, keep_name, 0, waits ? &intr : NULL, err);
    if (hooks != NULL && hooks->blocking_end != NULL)
        hooks->blocking_end(hooks->ctx);
    if (rc == SHX_E_INTERRUPTED)
        b->attached = 1;
    return rc;
}

void shx_detach_all_at_exit(void) { shx_os_detach_all_at_exit(keep_name); }

static _Atomic(shx_own_calls_fn) own_calls_of;

void shx_core_set_own_calls(shx_own_calls_fn fn) { atomic_store(&own_calls_of, fn); }

void shx_core_fork_child(shx_os_map *m)
{
    shx_block *b = (shx_block *)(void *)((char *)m - offsetof(shx_block, map));
    long inflight = 0, serialized = 0;
    shx_own_calls_fn fn = atomic_load(&own_calls_of);
    if (fn != NULL && b->owner != NULL)
        fn(b->owner, &inflight, &serialized);
    /* A close undone here: its closer had marked the handle detached on the
     * way to the detach, which never came, and the block is attached here. */
    if (shx_guard_forget_other_threads(&b->guard, inflight, serialized))
        b->attached = 1;
}

int shx_unlink(const char *name, shx_error *err)
{
    int rc = shx_name_check(name, strlen(name), err);
    if (rc != SHX_OK)
        return rc;
    return shx_os_unlink(name, err);
}

int shx_block_is_persistent(const shx_block *b)
{
    return (atomic_load_explicit(&b->hdr->flags, memory_order_relaxed) & SHX_FLAG_PERSIST) != 0;
}

int shx_block_holders(shx_block *b, int64_t *count, shx_error *err)
{
    if (!b->attached)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    return shx_os_holders(&b->map, count, err);
}

typedef struct info_request {
    shx_block_info_fn fn;
    void *ctx;
} info_request;

/* Adds what the header copy says, if it is a header of ours. */
static void with_header(void *vrq, const shx_os_info *os)
{
    info_request *rq = (info_request *)vrq;
    shx_block_info info;
    memset(&info, 0, sizeof info);
    info.os = *os;
    shx_header h;
    if (os->header != NULL && os->header_len >= sizeof h) {
        memcpy(&h, os->header, sizeof h);
        if (memcmp(h.magic, MAGIC, sizeof MAGIC) == 0 && h.layout == SHX_LAYOUT && known_kind(h.kind) &&
            h.capacity <= SHX_MAX_CAPACITY) {
            info.kind = h.kind;
            info.capacity = h.capacity;
            if (info.os.creator_pid == 0)
                info.os.creator_pid = h.creator_pid;
        }
    }
    info.os.header = NULL;
    info.os.header_len = 0;
    rq->fn(rq->ctx, &info);
}

int shx_list(shx_block_info_fn fn, void *ctx, shx_error *err)
{
    info_request rq = {fn, ctx};
    return shx_os_list(with_header, &rq, err);
}

int shx_sweep(shx_block_info_fn fn, void *ctx, shx_error *err)
{
    info_request rq = {fn, ctx};
    return shx_os_sweep(with_header, &rq, err);
}

/* ---- the writer lock ------------------------------------------------------- */

/* shx_os_lock, keeping a holder's death in the block until an acquirer that
 * can act on it has been told (shx_block_take_owner_died): the one that
 * inherits the lock may give it back untold (a close() under way). */
int shx_block_lock_now(shx_block *b, int64_t timeout_ns, int *owner_died, shx_error *err)
{
    int rc = shx_os_lock(&b->map, b->hdr->lock_area, timeout_ns, owner_died, err);
    if (rc == SHX_OK && *owner_died)
        atomic_store_explicit(&b->hdr->owner_died, 1, memory_order_relaxed);
    return rc;
}

int shx_block_take_owner_died(shx_block *b)
{
    return atomic_exchange_explicit(&b->hdr->owner_died, 0, memory_order_relaxed) != 0;
}

int shx_block_lock(shx_block *b, int64_t timeout_ns, int *owner_died, const shx_hooks *hooks, shx_error *err)
{
    int rc = shx_block_lock_now(b, 0, owner_died, err);
    if (rc != SHX_E_TIMEOUT || timeout_ns == 0)
        return rc;
    int sliced = hooks != NULL && hooks->interrupted != NULL;
    uint64_t start = shx_os_monotonic_ns();
    for (;;) {
        int64_t wait = timeout_ns;
        if (sliced) {
            int64_t left = timeout_ns < 0 ? SHX_WAIT_SLICE_NS : timeout_ns - (int64_t)(shx_os_monotonic_ns() - start);
            if (left <= 0)
                return shx_fail(err, SHX_E_TIMEOUT, (uint64_t)timeout_ns, 0, NULL);
            wait = left < SHX_WAIT_SLICE_NS ? left : SHX_WAIT_SLICE_NS;
        }
        if (hooks != NULL && hooks->blocking_begin != NULL)
            hooks->blocking_begin(hooks->ctx);
        rc = shx_block_lock_now(b, wait, owner_died, err);
        if (hooks != NULL && hooks->blocking_end != NULL)
            hooks->blocking_end(hooks->ctx);
        if (rc != SHX_E_TIMEOUT || !sliced)
            return rc;
        if (hooks->interrupted(hooks->ctx))
            return shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL);
    }
}

int shx_block_unlock(shx_block *b, shx_error *err) { return shx_os_unlock(&b->map, b->hdr->lock_area, err); }

/* ---- raw segments ------------------------------------------------------------ */

static int segment_range(shx_block *b, uint64_t offset, size_t n, shx_error *err)
{
    if (!b->attached)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    if (b->kind != SHX_KIND_SEGMENT)
        return shx_fail(err, SHX_E_KIND, b->kind, SHX_KIND_SEGMENT, NULL);
    if (offset > b->capacity || n > b->capacity - offset)
        return shx_fail(err, SHX_E_RANGE, offset + n, b->capacity, NULL);
    return SHX_OK;
}

int shx_segment_read(shx_block *b, uint64_t offset, void *dst, size_t n, const shx_hooks *hooks, shx_error *err)
{
    int rc = segment_range(b, offset, n, err);
    if (rc == SHX_OK)
        shx_copy_bytes(dst, b->data + offset, n, hooks, SHX_STREAM_COPY_MIN);
    return rc;
}

int shx_segment_write(shx_block *b, uint64_t offset, const void *src, size_t n, const shx_hooks *hooks, shx_error *err)
{
    int rc = segment_range(b, offset, n, err);
    if (rc == SHX_OK)
        shx_copy_bytes(b->data + offset, src, n, hooks, SHX_STREAM_COPY_MIN);
    return rc;
}
