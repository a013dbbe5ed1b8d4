/* The block core: see segment.h. */
#include "segment.h"

#include <stdio.h>
#include <string.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_STREAMING_STORES 1
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_COPY 1 /* built for any x86-64, chosen at run time where the CPU has AVX2 */
#endif
#if defined(_MSC_VER)
#include <intrin.h> /* _mm_pause, __yield */
#endif

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

/* A reader retries this often before it takes the writer lock instead, so
 * that a large value under heavy writing cannot starve it. */
#define READ_TRIES 32
/* How long such a reader waits for the lock while no version is committed:
 * more than any writer of a value of that size needs (one copy), with a
 * wide margin. */
#ifndef READ_LOCK_WAIT_NS
#define READ_LOCK_WAIT_NS INT64_C(2000000000)
#endif
#define READ_LOCK_NS_PER_BYTE 20
#define READ_LOCK_STEP_NS     INT64_C(100000000)

int shx_fail(shx_error *err, int status, uint64_t a, uint64_t b, const char *detail)
{
    err->status = status;
    err->os_error = 0;
    err->win32 = 0;
    err->op = NULL;
    err->detail = detail;
    err->a = a;
    err->b = b;
    return status;
}

static size_t round_up_64(uint64_t n) { return (size_t)((n + 63) & ~(uint64_t)63); }

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
    if (kind != SHX_KIND_VALUE && kind != SHX_KIND_SEGMENT)
        return shx_fail(err, SHX_E_CORRUPT, kind, 0, "has an unknown kind");
    if (capacity == 0 || capacity > SHX_MAX_CAPACITY)
        return shx_fail(err, SHX_E_CORRUPT, capacity, SHX_MAX_CAPACITY, "has an impossible capacity");
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

    open_request rq = {b, kind, capacity ? capacity : SHX_DEFAULT_CAPACITY, capacity != 0, flags};
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
    int closer_went =
        shx_guard_is_closing(atomic_load(&b->guard.state)) && atomic_load(&b->guard.closer) != shx_guard_this_thread();
    shx_guard_forget_other_threads(&b->guard, inflight, serialized);
    /* Its closer had marked it detached on the way to the detach, which never
     * came: the block is still attached here. */
    if (closer_went)
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
        if (memcmp(h.magic, MAGIC, sizeof MAGIC) == 0 && h.layout == SHX_LAYOUT &&
            (h.kind == SHX_KIND_VALUE || h.kind == SHX_KIND_SEGMENT) && h.capacity <= SHX_MAX_CAPACITY) {
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

/* ---- lock and copies ---------------------------------------------------- */

/* shx_os_lock, keeping a holder's death in the block until an acquirer that
 * can act on it has been told (shx_block_take_owner_died): the one that
 * inherits the lock may give it back untold (a close() under way). */
static int lock_os(shx_block *b, int64_t timeout_ns, int *owner_died, shx_error *err)
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
    int rc = lock_os(b, 0, owner_died, err);
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
        rc = lock_os(b, wait, owner_died, err);
        if (hooks != NULL && hooks->blocking_end != NULL)
            hooks->blocking_end(hooks->ctx);
        if (rc != SHX_E_TIMEOUT || !sliced)
            return rc;
        if (hooks->interrupted(hooks->ctx))
            return shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL);
    }
}

int shx_block_unlock(shx_block *b, shx_error *err) { return shx_os_unlock(&b->map, b->hdr->lock_area, err); }

/* Copies into a block (or out of a segment into a caller's buffer) from this
 * size up bypass the cache.  A copy this large evicts itself anyway, and
 * ordinary stores would first read every destination line (for a set, a
 * value cell alternates between two slots: twice the value's size of
 * destination), which cost 1.4-1.8x more than streaming stores at 8-32 MiB
 * on a 32 MiB-L3 x86-64; at 4 MiB and less ordinary stores won. */
#define STREAM_COPY_MIN ((size_t)8 << 20)

#ifdef HAVE_STREAMING_STORES
/* Copies 64 bytes to a 16-byte aligned dst past the cache. */
static void stream_line(unsigned char *dst, const unsigned char *src)
{
    __m128i a = _mm_loadu_si128((const __m128i *)src);
    __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
    __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
    _mm_stream_si128((__m128i *)dst, a);
    _mm_stream_si128((__m128i *)(dst + 16), b);
    _mm_stream_si128((__m128i *)(dst + 32), c);
    _mm_stream_si128((__m128i *)(dst + 48), d);
}
#endif

/* Where a set() into a value slot starts streaming: above twice the L2 cache
 * of a core.  A cell alternates between two slots, so a set's destination
 * spans twice the value: past that, ordinary stores first read lines that the
 * next set will have evicted anyway.  On a 512 KiB-L2 EPYC, sets of 2 to 6
 * MiB took 1.2-2.1x the copy floor without streaming and 0.7-1.35x with it
 * (benchmarks/bench_floor.py); at 1 MiB streaming lost.  Where the OS does
 * not say, the threshold of every other copy. */
static size_t stream_set_min(void)
{
    static _Atomic size_t cached;
    size_t n = atomic_load_explicit(&cached, memory_order_relaxed);
    if (n == 0) {
        size_t l2 = shx_os_cache_size(2);
        n = l2 > 0 && l2 < STREAM_COPY_MIN / 2 ? 2 * l2 + 1 : STREAM_COPY_MIN;
        atomic_store_explicit(&cached, n, memory_order_relaxed);
    }
    return n;
}

static void copy_cached(unsigned char *dst, const unsigned char *src, size_t n);

static void copy_streaming(unsigned char *dst, const unsigned char *src, size_t n, size_t stream_min)
{
    (void)stream_min; /* where there are no streaming stores */
#ifdef HAVE_STREAMING_STORES
    if (n >= stream_min) {
        /* From a line boundary on: each line is then written whole by its
         * four stores, which the write-combining buffers send out at once. */
        size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
        memcpy(dst, src, head);
        size_t i = head;
        for (; i + 64 <= n; i += 64)
            stream_line(dst + i, src + i);
        memcpy(dst + i, src + i, n - i);
        /* Streaming stores are weakly ordered: all of them before what publishes them. */
        _mm_sfence();
        return;
    }
#endif
    copy_cached(dst, src, n);
}

/* A copy of n bytes is long enough to let other threads run meanwhile:
 * begins that if so, and says whether it did (for end_long_copy). */
static int begin_long_copy(const shx_hooks *hooks, size_t n)
{
    if (hooks == NULL || hooks->blocking_begin == NULL || n < hooks->large_copy)
        return 0;
    hooks->blocking_begin(hooks->ctx);
    return 1;
}

static void end_long_copy(const shx_hooks *hooks, int began)
{
    if (began)
        hooks->blocking_end(hooks->ctx);
}

/* Whether [a, a+n) and [b, b+n) share a byte: a segment written from a view
 * of itself.  (Two mappings of one block at different addresses alias too,
 * and no address test can see that.) */
static int overlaps(const void *a, const void *b, size_t n)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + n && y < x + n;
}

static void copy_bytes(void *dst, const void *src, size_t n, const shx_hooks *hooks, size_t stream_min)
{
    int began = begin_long_copy(hooks, n);
    if (overlaps(dst, src, n))
        memmove(dst, src, n);
    else
        copy_streaming((unsigned char *)dst, (const unsigned char *)src, n, stream_min);
    end_long_copy(hooks, began);
}

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
        copy_bytes(dst, b->data + offset, n, hooks, STREAM_COPY_MIN);
    return rc;
}

int shx_segment_write(shx_block *b, uint64_t offset, const void *src, size_t n, const shx_hooks *hooks, shx_error *err)
{
    int rc = segment_range(b, offset, n, err);
    if (rc == SHX_OK)
        copy_bytes(b->data + offset, src, n, hooks, STREAM_COPY_MIN);
    return rc;
}

/* ---- well-formed values ---------------------------------------------------- */

/* Every PEP 393 invariant we check is a property of the OR of the value's
 * 64-bit words: ASCII has no bit 7 in any byte, Latin-1 has one, UCS-2 has a
 * unit above 0xFF (a high-byte bit), UCS-4 a unit above 0xFFFF (a bit >= 16)
 * and none above 0x10FFFF (exact only when the OR is below 0x110000; else a
 * second, exact pass decides).  Words start at the value's first byte, so
 * each lane of a word is one unit. */
#define HIGH_BIT_OF_BYTES  UINT64_C(0x8080808080808080)
#define HIGH_BYTE_OF_UCS2  UINT64_C(0xFF00FF00FF00FF00)
#define ABOVE_UNICODE_UCS4 UINT64_C(0xFFE00000FFE00000) /* bits that no code point has */

static uint64_t or_words(const unsigned char *p, size_t n)
{
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, p + i, n - i);
        acc |= w;
    }
    return acc;
}

/* Once any of these bits is set the verdict is known: the rest need not be scanned. */
static uint64_t decisive_bits(uint32_t type)
{
    switch (type) {
    case SHX_TYPE_ASCII:
    case SHX_TYPE_LATIN1: return HIGH_BIT_OF_BYTES;
    case SHX_TYPE_UCS2: return HIGH_BYTE_OF_UCS2;
    case SHX_TYPE_UCS4: return ABOVE_UNICODE_UCS4;
    default: return 0;
    }
}

static uint32_t max_ucs4(const unsigned char *p, size_t units)
{
    uint32_t m = 0;
    for (size_t i = 0; i < units; i++) {
        uint32_t u;
        memcpy(&u, p + 4 * i, 4);
        m = u > m ? u : m;
    }
    return m;
}

static int well_formed(uint32_t type, const unsigned char *p, size_t nbytes, uint64_t acc)
{
    switch (type) {
    case SHX_TYPE_EMPTY: return nbytes == 0;
    case SHX_TYPE_BYTES: return 1;
    case SHX_TYPE_ASCII: return (acc & HIGH_BIT_OF_BYTES) == 0;
    case SHX_TYPE_LATIN1: return (acc & HIGH_BIT_OF_BYTES) != 0;
    case SHX_TYPE_UCS2: return nbytes % 2 == 0 && (acc & HIGH_BYTE_OF_UCS2) != 0;
    case SHX_TYPE_UCS4: {
        uint32_t lanes = (uint32_t)(acc | (acc >> 32));
        if (nbytes % 4 != 0 || lanes <= 0xFFFF)
            return 0;
        return lanes < 0x110000 || max_ucs4(p, nbytes / 4) <= 0x10FFFF;
    }
    default: return 0;
    }
}

int shx_value_check(uint32_t type, const void *data, size_t nbytes, shx_error *err)
{
    const unsigned char *p = (const unsigned char *)data;
    if (!well_formed(type, p, nbytes, or_words(p, nbytes)))
        return shx_fail(err, SHX_E_BADVALUE, nbytes, type, "is not a well-formed value of its type");
    return SHX_OK;
}

/* Copies n bytes and returns the OR of the words copied.  Each word is
 * checked in the register it is copied through, so the check sees exactly the
 * copy (never the shared original, which may change under us), and in one pass
 * it costs about nothing beyond the copy: eight independent lanes keep the
 * loop as wide as the vector unit, which the compiler uses. */
static uint64_t copy_or(unsigned char *dst, const unsigned char *src, size_t n)
{
    uint64_t lane[8] = {0};
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int k = 0; k < 8; k++) {
            uint64_t w;
            memcpy(&w, src + i + 8 * k, 8);
            memcpy(dst + i + 8 * k, &w, 8);
            lane[k] |= w;
        }
    }
    uint64_t acc = lane[0] | lane[1] | lane[2] | lane[3] | lane[4] | lane[5] | lane[6] | lane[7];
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, src + i, 8);
        memcpy(dst + i, &w, 8);
        acc |= w;
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, src + i, n - i);
        memcpy(dst + i, &w, n - i);
        acc |= w;
    }
    return acc;
}

#ifdef HAVE_AVX2_COPY
/* copy_or 32 bytes at a time.  A copy is bound by its stores: with 16-byte
 * registers (all that baseline x86-64 has) a checked copy of a value held in
 * L1 or L2 took 1.4-2.6x as long as the C library's AVX2 memcpy of the same
 * bytes.  The stores are aligned: a str's characters start 16 bytes past a
 * 32-byte boundary about half the time (where the allocator put the object),
 * and then every other 32-byte store splits a cache line, which cost
 * 1.2-1.6x the aligned loop at 16-256 KiB.  Each byte is loaded once and
 * stored from the register it was ORed in (the bytes before the first
 * boundary and after the last by copy_or): another process may rewrite the
 * source meanwhile, and a byte stored twice from two loads could differ from
 * the one the check saw. */
__attribute__((target("avx2"))) static uint64_t copy_or_avx2(unsigned char *dst, const unsigned char *src, size_t n)
{
    if (n < 64)
        return copy_or(dst, src, n);
    size_t i = (32 - ((uintptr_t)dst & 31)) & 31;
    uint64_t acc = copy_or(dst, src, i);
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (; i + 64 <= n; i += 64) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i y = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        _mm256_store_si256((__m256i *)(dst + i), x);
        _mm256_store_si256((__m256i *)(dst + i + 32), y);
        a = _mm256_or_si256(a, x);
        b = _mm256_or_si256(b, y);
    }
    if (i + 32 <= n) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm256_store_si256((__m256i *)(dst + i), x);
        a = _mm256_or_si256(a, x);
        i += 32;
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_or_si256(a, b));
    /* The tail's words start at i, a multiple of the unit (dst is aligned
     * to its units): every mask tests each unit the same in any such lane. */
    return acc | lanes[0] | lanes[1] | lanes[2] | lanes[3] | copy_or(dst + i, src + i, n - i);
}

#endif

/* Between these sizes, on an AMD CPU with AVX2, a copy through the cache
 * goes by 32-byte aligned stores, not the C library's copy, whose cost on a
 * Zen 4 EPYC swung with the source's alignment and placement: sets of
 * 16-256 KiB took 1.0-1.4x the copy floor with it and 0.85-1.05x with
 * aligned stores.  On an Intel Xeon (AVX-512, 2 MiB of L2 per core) it went
 * the other way: there the C library copies with rep movsb, which fills
 * whole lines without reading them first, and aligned stores made sets of
 * 3-4 MiB cost 1.4-1.5x the floor against 1.01-1.13x, sets of 4 KiB
 * 1.25-1.43x against 0.97-1.17x and gets of 4-8 KiB 0.95x against 0.80x
 * (benchmarks/bench_floor.py).  Below 4 KiB the C library's copy was as fast
 * or faster on both; past the upper bound it chooses its own stores (past the
 * cache, from sizes it derives from the machine). */
#define AVX2_COPY_MIN 4096
#define AVX2_COPY_MAX STREAM_COPY_MIN

#ifdef HAVE_AVX2_COPY
static int aligned_copy_wins(void)
{
    /* Both read what the runtime found at load time: no cache needed. */
    return __builtin_cpu_supports("avx2") && __builtin_cpu_is("amd");
}
#endif

static void copy_cached(unsigned char *dst, const unsigned char *src, size_t n)
{
#ifdef HAVE_AVX2_COPY
    if (n >= AVX2_COPY_MIN && n < AVX2_COPY_MAX && aligned_copy_wins()) {
        (void)copy_or_avx2(dst, src, n);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* Copies into a result just allocated for get(): memory just mapped, whose
 * lines the kernel zeroed through the cache an instant before, or a result
 * just freed, still cached.  Past AVX2_COPY_MAX copy_cached leaves the stores
 * to the C library, whose copy of these lost to the text check's aligned
 * stores on both x86-64s measured: bytes gets of 16 MiB took 1.04-1.25x the
 * copy floor on a Zen 4 EPYC where str gets took 0.88-0.99x, and of 16-64
 * MiB 0.97-0.99x on an Intel Xeon where str gets took 0.82-0.88x
 * (benchmarks/bench_floor.py).  By these stores, on the EPYC, bytes gets of
 * 16 and 64 MiB took 0.91-0.97x. */
static void copy_to_result(unsigned char *dst, const unsigned char *src, size_t n)
{
#ifdef HAVE_AVX2_COPY
    if (n >= AVX2_COPY_MAX && __builtin_cpu_supports("avx2")) {
        (void)copy_or_avx2(dst, src, n);
        return;
    }
#endif
    copy_cached(dst, src, n);
}

/* Below this a value is copied in the time a choice of copy takes. */
#define SMALL_CHECKED_COPY 1024

/* Once the verdict is known the rest is copied without looking. */
#define CHECK_CHUNK 16384

/* Copies a value out of the block and tells whether the copy is well formed. */
static int copy_checked(unsigned char *dst, const unsigned char *src, size_t n, uint32_t type, const shx_hooks *hooks)
{
    if (n < SMALL_CHECKED_COPY) /* one pass, no choice to make: most values are small */
        return well_formed(type, dst, n, copy_or(dst, src, n));
    int began = begin_long_copy(hooks, n);
    uint64_t acc = 0, decisive = decisive_bits(type);
    uint64_t (*copy_chunk)(unsigned char *, const unsigned char *, size_t) = copy_or;
#ifdef HAVE_AVX2_COPY
    if (__builtin_cpu_supports("avx2"))
        copy_chunk = copy_or_avx2;
#endif
    /* No streaming stores here: dst is an object just made, which for a large
     * value is memory just mapped, whose pages the kernel zeroes through the
     * cache as the copy first touches them; ordinary stores then hit those
     * lines and streaming ones must evict them.  At 64 MiB, streaming cost
     * 1.15-1.2x the copy floor and ordinary stores 1.0x, and at 4-16 MiB
     * both were within 1.1x (benchmarks/bench_floor.py).  Bytes copied
     * unchecked go by copy_to_result, whose stores are ordinary too. */
    size_t done = 0;
    if (decisive == 0) {
        copy_to_result(dst, src, n);
        done = n;
    }
    while (done < n) {
        if (acc & decisive) {
            copy_to_result(dst + done, src + done, n - done);
            break;
        }
        size_t k = n - done < CHECK_CHUNK ? n - done : CHECK_CHUNK;
        acc |= copy_chunk(dst + done, src + done, k);
        done += k;
    }
    int ok = well_formed(type, dst, n, acc);
    end_long_copy(hooks, began);
    return ok;
}

/* ---- waiter counts ---------------------------------------------------------- */

/* A wait counts itself while it sleeps, so that a set() makes a system call
 * only when someone may sleep.  A waiter that dies (SIGKILL) never uncounts
 * itself, and every set() after it would wake nobody: one futex call each,
 * 6x the cost of a 16-byte set().  So a set() whose wakes keep finding nobody
 * asleep recounts: under the writer lock, where no wait can count itself, it
 * moves the word they sleep on, wakes every sleeper, and starts a new epoch
 * at zero.  Each live waiter then finds its sleep ended, or its word moved,
 * and counts itself again in the new epoch; those counted in the old one
 * (the dead among them) no longer move the count. */

/* Under the writer lock: counts a wait, and returns the epoch it is counted in. */
static uint32_t count_waiter(shx_header *h)
{
    return (uint32_t)(atomic_fetch_add_explicit(&h->waiters, 1, memory_order_relaxed) >> 32);
}

static void uncount_waiter(shx_header *h, uint32_t epoch)
{
    uint64_t w = atomic_load_explicit(&h->waiters, memory_order_relaxed);
    while ((uint32_t)(w >> 32) == epoch && (uint32_t)w != 0 &&
           !atomic_compare_exchange_weak_explicit(&h->waiters, &w, w - 1, memory_order_relaxed, memory_order_relaxed))
        ;
}

/* Wakes in a row that may find nobody asleep before a set() recounts: a live
 * waiter is between counting itself and sleeping when a set() comes now and
 * then, rarely several times running. */
#define IDLE_WAKES_BEFORE_RECOUNT 4

int shx_value_recount_waiters(shx_block *b)
{
    shx_header *h = b->hdr;
    shx_error ignored;
    int died;
    if (lock_os(b, 0, &died, &ignored) != SHX_OK)
        return 0; /* a set() or a wait holds it: a later set() recounts */
    /* Word first, wake next, count last: a recounter that dies before its
     * wake leaves the old count, whose next set() wakes the sleepers. */
    atomic_store_explicit(&h->wake_seq, atomic_load_explicit(&h->wake_seq, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    (void)shx_os_wake_word(&b->map, &h->wake_seq, shx_value_waiters(b));
    uint64_t epoch = atomic_load_explicit(&h->waiters, memory_order_relaxed) >> 32;
    atomic_store_explicit(&h->waiters, (epoch + 1) << 32, memory_order_relaxed);
    atomic_store_explicit(&h->idle_wakes, 0, memory_order_relaxed);
    (void)shx_os_unlock(&b->map, h->lock_area, &ignored);
    return 1;
}

/* After a set()'s wake: woken is how many it woke, or -1 where the OS does not say. */
static void after_wake(shx_block *b, int woken)
{
    shx_header *h = b->hdr;
    if (woken < 0)
        return;
    uint32_t idle = woken == 0 ? atomic_load_explicit(&h->idle_wakes, memory_order_relaxed) + 1 : 0;
    atomic_store_explicit(&h->idle_wakes, idle, memory_order_relaxed);
    if (idle >= IDLE_WAKES_BEFORE_RECOUNT)
        (void)shx_value_recount_waiters(b);
}

/* ---- the value protocol --------------------------------------------------- */

int shx_value_set(shx_block *b, uint32_t type, const void *data, size_t nbytes, const shx_hooks *hooks, shx_error *err)
{
    int owner_died, rc;
    if (!b->attached)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    if (b->kind != SHX_KIND_VALUE)
        return shx_fail(err, SHX_E_KIND, b->kind, SHX_KIND_VALUE, NULL);
    if (nbytes > b->capacity)
        return shx_fail(err, SHX_E_TOOBIG, nbytes, b->capacity, NULL);
    if ((rc = shx_block_lock(b, -1, &owner_died, hooks, err)) != SHX_OK)
        return rc;

    shx_header *h = b->hdr;
    uint64_t next = atomic_load_explicit(&h->version, memory_order_relaxed) + 1;
    unsigned index = (unsigned)(next & 1);
    shx_slot *s = &h->slot[index];
    /* Odd while we write.  A writer that died here left it odd already: keep
     * it odd, and our closing store makes it even again. */
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed) | 1;
    atomic_store_explicit(&s->seq, seq, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    s->version = next;
    s->nbytes = nbytes;
    s->type = type;
    copy_bytes(b->data + index * b->slot_stride, data, nbytes, hooks, stream_set_min());
    atomic_store_explicit(&s->seq, seq + 1, memory_order_release);
    atomic_store_explicit(&h->version, next, memory_order_release);
    /* Waiters count themselves while holding this lock (register_waiter),
     * so the count read under it has every waiter that could miss this
     * version, with no barrier here.  No system call when nobody waits. */
    atomic_store_explicit(&h->wake_seq, atomic_load_explicit(&h->wake_seq, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    uint32_t waiters = shx_value_waiters(b);
    rc = shx_block_unlock(b, err);
    /* After unlocking: a woken process that answers with a set() at once
     * must not find the lock still held and sleep a second time. */
    if (waiters != 0)
        after_wake(b, shx_os_wake_word(&b->map, &h->wake_seq, waiters));
    return rc;
}

/* A statistic: no read-modify-write, so no bus lock; racing threads may lose a count. */
static void count(_Atomic uint64_t *counter)
{
    atomic_store_explicit(counter, atomic_load_explicit(counter, memory_order_relaxed) + 1, memory_order_relaxed);
}

static int valid_type(uint32_t type) { return type <= SHX_TYPE_UCS4; }

int shx_value_get(shx_block *b, shx_prepare_dst_fn prepare, void *ctx, const shx_hooks *hooks, uint32_t *type_out,
                  size_t *nbytes_out, uint64_t *version_out, shx_error *err)
{
    if (!b->attached)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    if (b->kind != SHX_KIND_VALUE)
        return shx_fail(err, SHX_E_KIND, b->kind, SHX_KIND_VALUE, NULL);
    shx_header *h = b->hdr;

    for (int tries = 0; tries < READ_TRIES; tries++) {
        if (tries > 0)
            count(&b->read_retries);
        uint64_t version = atomic_load_explicit(&h->version, memory_order_acquire);
        unsigned index = (unsigned)(version & 1);
        shx_slot *s = &h->slot[index];
        uint64_t seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (seq & 1)
            continue; /* being rewritten: a newer version was committed since we looked */
        uint64_t slot_version = s->version;
        uint64_t nbytes = s->nbytes;
        uint32_t type = s->type;
        int sane = nbytes <= b->capacity && valid_type(type);
        int good = 0;
        if (sane) {
            void *dst = prepare(ctx, type, (size_t)nbytes);
            if (dst == NULL) {
                /* The size may be torn: a writer began since we read it.
                 * Only a size some set() committed is refused. */
                atomic_thread_fence(memory_order_acquire);
                if (atomic_load_explicit(&s->seq, memory_order_relaxed) != seq)
                    continue;
                return shx_fail(err, SHX_E_OS, 0, 0, "out of memory");
            }
            good = copy_checked(dst, b->data + index * b->slot_stride, (size_t)nbytes, type, hooks);
        }
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->seq, memory_order_relaxed) != seq)
            continue; /* overwritten while we copied */
        if (!sane)
            return shx_fail(err, SHX_E_BADVALUE, nbytes, b->capacity, "has an impossible length or type");
        /* A slot filled but not yet published (or whose writer died before
         * publishing) holds a value that was never committed. */
        if (slot_version > atomic_load_explicit(&h->version, memory_order_relaxed))
            continue;
        if (!good)
            return shx_fail(err, SHX_E_BADVALUE, nbytes, type, "is not a well-formed value of its type");
        *type_out = type;
        *nbytes_out = (size_t)nbytes;
        if (version_out != NULL)
            *version_out = slot_version;
        return SHX_OK;
    }

    /* Writers keep outrunning our copy: hold them off with the lock.  The
     * wait is bounded: a lock word and sequence counters that another process
     * wrote can look like a writer that never finishes. */
    count(&b->locked_reads);
    int owner_died, rc;
    int64_t bound =
        READ_LOCK_WAIT_NS +
        (int64_t)(b->capacity < (UINT64_C(1) << 40) ? b->capacity : (UINT64_C(1) << 40)) * READ_LOCK_NS_PER_BYTE;
    /* Writers that keep committing are alive, however long they keep the
     * lock from us: only a wait in which no version was committed at all is
     * bounded. */
    uint64_t seen = atomic_load_explicit(&h->version, memory_order_acquire), still_since = shx_os_monotonic_ns();
    for (;;) {
        rc = shx_block_lock(b, READ_LOCK_STEP_NS, &owner_died, hooks, err);
        if (rc != SHX_E_TIMEOUT)
            break;
        uint64_t now = atomic_load_explicit(&h->version, memory_order_acquire);
        if (now != seen) {
            seen = now;
            still_since = shx_os_monotonic_ns();
        } else if ((int64_t)(shx_os_monotonic_ns() - still_since) >= bound) {
            return shx_fail(err, SHX_E_TIMEOUT, (uint64_t)bound, 0,
                            "get() waited that long for a writer that committed nothing meanwhile: one that "
                            "never finishes, or a lock and counters another process scribbled over");
        }
    }
    if (rc != SHX_OK)
        return rc;
    uint64_t version = atomic_load_explicit(&h->version, memory_order_relaxed);
    unsigned index = (unsigned)(version & 1);
    shx_slot *s = &h->slot[index];
    uint64_t nbytes = s->nbytes;
    uint32_t type = s->type;
    rc = SHX_OK;
    if (nbytes > b->capacity || !valid_type(type)) {
        rc = shx_fail(err, SHX_E_BADVALUE, nbytes, b->capacity, "has an impossible length or type");
    } else {
        void *dst = prepare(ctx, type, (size_t)nbytes);
        if (dst == NULL)
            rc = shx_fail(err, SHX_E_OS, 0, 0, "out of memory");
        else if (!copy_checked(dst, b->data + index * b->slot_stride, (size_t)nbytes, type, hooks))
            rc = shx_fail(err, SHX_E_BADVALUE, nbytes, type, "is not a well-formed value of its type");
    }
    shx_error unlock_err;
    (void)shx_block_unlock(b, &unlock_err); /* we hold it: cannot fail */
    if (rc == SHX_OK) {
        *type_out = type;
        *nbytes_out = (size_t)nbytes;
        if (version_out != NULL)
            *version_out = version;
    }
    return rc;
}

/* A hint to the CPU that we are spinning (saves power, frees the sibling hyperthread). */
static void cpu_relax(void)
{
#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
    _mm_pause();
#elif defined(_MSC_VER) && defined(_M_ARM64)
    __yield();
#elif defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Watches the version for a short while before sleeping: a partner that
 * answers within that time (a ping-pong, a request and its reply) is seen
 * without either process going through the kernel's sleep and wake-up, which
 * on an idle machine costs tens of microseconds.  Returns whether it saw a
 * change. */
static int spin_for_change(shx_header *h, uint64_t seen, uint64_t until)
{
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(&h->version, memory_order_acquire) != seen)
                return 1;
            cpu_relax();
        }
        if (shx_os_monotonic_ns() >= until)
            return 0;
    }
}

/* A spin pays only while the partner that would answer it can run.  When one
 * sees no change and more threads are runnable than there are CPUs, waits
 * sleep at once, except every SPIN_PROBE_EVERY-th, which spins again; a spin
 * that sees a change ends that.  (The runnable count is asked only after a
 * spin that failed, so an answered wait still makes no system call.)  Not at
 * all on a single CPU, where the spinner would only keep the setter from
 * running. */
#define SPIN_PROBE_EVERY 16

static uint64_t spin_budget(shx_block *b)
{
    if (shx_os_cpu_count() < 2)
        return 0;
    if (!atomic_load_explicit(&b->spin_off, memory_order_relaxed))
        return SHX_WAIT_SPIN_NS;
    uint32_t probe = atomic_load_explicit(&b->spin_probe, memory_order_relaxed) + 1;
    atomic_store_explicit(&b->spin_probe, probe, memory_order_relaxed);
    return probe % SPIN_PROBE_EVERY == 0 ? SHX_WAIT_SPIN_NS : 0;
}

static void spin_learn(shx_block *b, int seen_change)
{
    int off = !seen_change && shx_os_cpus_oversubscribed();
    atomic_store_explicit(&b->spin_off, off, memory_order_relaxed);
}

/* How many times a waiter that finds the writer lock held looks again at
 * once (under a microsecond apart) before it sleeps on the lock. */
#define REGISTER_TRIES 64

/* Counts us a waiter of b, holding b's writer lock while we do, and reads
 * the word to sleep on.  The lock orders us against every set(), which
 * reads the count under it: a set() that locks after us sees us and wakes
 * us, and one that unlocked before we locked has published its version,
 * which the caller then sees.  (Counting ourselves without the lock would
 * need a full barrier in every set(), after its copy, where it waits until
 * the copy's stores have drained: a 4 KiB set() cost 1.15-1.27x the copy
 * floor with one, 1.03-1.08x without.)  A held lock is nearly always a set()
 * about to publish, so we watch for that first.  With timeout_ns 0 we only
 * try.  *registered says whether we were counted, and *epoch in which epoch;
 * the caller uncounts us. */
static int register_waiter(shx_block *b, uint64_t seen, int64_t timeout_ns, uint32_t *word, int *registered,
                           uint32_t *epoch, shx_error *err)
{
    shx_header *h = b->hdr;
    int died, rc = SHX_E_TIMEOUT;
    *registered = 0;
    for (int i = 0; i < REGISTER_TRIES && rc == SHX_E_TIMEOUT; i++) {
        if (atomic_load_explicit(&h->version, memory_order_acquire) != seen)
            return SHX_OK;
        rc = lock_os(b, 0, &died, err);
        for (int k = 0; rc == SHX_E_TIMEOUT && k < 16; k++)
            cpu_relax();
    }
    if (rc == SHX_E_TIMEOUT && timeout_ns != 0)
        rc = lock_os(b, timeout_ns, &died, err);
    if (rc != SHX_OK)
        return rc;
    *epoch = count_waiter(h);
    *word = atomic_load_explicit(&h->wake_seq, memory_order_relaxed);
    rc = shx_os_unlock(&b->map, h->lock_area, err);
    if (rc != SHX_OK)
        uncount_waiter(h, *epoch);
    else
        *registered = 1;
    return rc;
}

/* What a wait begun at `start` has left of timeout_ns; a wait forever sleeps a second at a time. */
static int64_t wait_left(int64_t timeout_ns, uint64_t start)
{
    return timeout_ns < 0 ? INT64_C(1000000000) : timeout_ns - (int64_t)(shx_os_monotonic_ns() - start);
}

int shx_value_wait(shx_block *b, uint64_t seen, int64_t timeout_ns, uint64_t *now, shx_error *err)
{
    if (!b->attached)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    if (b->kind != SHX_KIND_VALUE)
        return shx_fail(err, SHX_E_KIND, b->kind, SHX_KIND_VALUE, NULL);
    shx_header *h = b->hdr;
    uint64_t start = shx_os_monotonic_ns();
    uint64_t spin = timeout_ns != 0 ? spin_budget(b) : 0;
    if (spin > 0 && atomic_load_explicit(&h->version, memory_order_acquire) == seen) {
        if (timeout_ns > 0 && (uint64_t)timeout_ns < spin)
            spin = (uint64_t)timeout_ns;
        spin_learn(b, spin_for_change(h, seen, start + spin));
    }
    for (;;) {
        uint64_t version = atomic_load_explicit(&h->version, memory_order_acquire);
        *now = version;
        if (version != seen)
            return SHX_OK;
        int64_t left = wait_left(timeout_ns, start);
        if (left <= 0)
            return shx_fail(err, SHX_E_TIMEOUT, (uint64_t)timeout_ns, 0, NULL);
        uint32_t word, epoch;
        int registered;
        int rc = register_waiter(b, seen, left, &word, &registered, &epoch, err);
        if (rc != SHX_OK)
            return rc;
        if (!registered)
            continue;
        left = wait_left(timeout_ns, start);
        if (left > 0 && atomic_load_explicit(&h->version, memory_order_acquire) == seen)
            (void)shx_os_wait_word(&b->map, &h->wake_seq, word, left);
        uncount_waiter(h, epoch);
    }
}

/* Whether the kernel has no wait on many words (an old Linux): from then on
 * this process polls. */
static _Atomic int wait_any_unsupported;

/* How soon a block whose lock a wait on many could not take is looked at again. */
#define BUSY_LOCK_POLL_NS 1000000

static int any_changed(shx_block *const *blocks, const uint64_t *seen, const uint32_t *nudges, size_t n,
                       shx_os_bell *bell, uint32_t rung)
{
    if (shx_os_bell_rings(bell) != rung)
        return 1;
    for (size_t i = 0; i < n; i++) {
        if (atomic_load_explicit(&blocks[i]->hdr->version, memory_order_acquire) != seen[i] ||
            atomic_load(&blocks[i]->nudges) != nudges[i])
            return 1;
    }
    return 0;
}

static int poll_any(shx_block *const *blocks, const uint64_t *seen, const uint32_t *nudges, size_t n, shx_os_bell *bell,
                    uint32_t rung, int64_t timeout_ns)
{
    uint64_t start = shx_os_monotonic_ns();
    for (;;) {
        if (any_changed(blocks, seen, nudges, n, bell, rung))
            return SHX_OK;
        if ((int64_t)(shx_os_monotonic_ns() - start) >= timeout_ns)
            return SHX_E_TIMEOUT;
        /* About a millisecond a look: where no wait on many words exists
         * (macOS, the BSDs, Linux before 5.16). */
        for (int i = 0; i < 10; i++)
            shx_os_pause_briefly();
    }
}

static int sleep_any(shx_block *const *blocks, const uint64_t *seen, const uint32_t *nudges, size_t n,
                     shx_os_bell *bell, uint32_t rung, int64_t timeout_ns)
{
    if (SHX_OS_WAIT_ANY_MAX == 0 || atomic_load(&wait_any_unsupported))
        return poll_any(blocks, seen, nudges, n, bell, rung, timeout_ns);
    shx_os_map *maps[SHX_WAIT_ANY_MAX];
    void *words[SHX_WAIT_ANY_MAX];
    uint32_t expected[SHX_WAIT_ANY_MAX];
    int registered[SHX_WAIT_ANY_MAX];
    uint32_t epochs[SHX_WAIT_ANY_MAX];
    /* As in shx_value_wait: count ourselves a waiter of each under its lock,
     * then look at the versions, so that every set() from now on sees us and
     * wakes us.  A block whose lock stays held (or is not a lock any more) is
     * not waited on but looked at again soon: one block cannot hold up the
     * others. */
    int64_t wait_ns = timeout_ns;
    shx_error ignored;
    int changed = 0;
    size_t counted = 0;
    for (; counted < n && !changed; counted++) {
        size_t i = counted;
        shx_header *h = blocks[i]->hdr;
        maps[i] = &blocks[i]->map;
        words[i] = (void *)&h->wake_seq;
        if (register_waiter(blocks[i], seen[i], 0, &expected[i], &registered[i], &epochs[i], &ignored) != SHX_OK) {
            expected[i] = atomic_load_explicit(&h->wake_seq, memory_order_relaxed);
            if (wait_ns > BUSY_LOCK_POLL_NS)
                wait_ns = BUSY_LOCK_POLL_NS;
        } else if (!registered[i]) {
            changed = 1; /* its version moved: nothing to sleep for */
        }
    }
    int rc = changed || any_changed(blocks, seen, nudges, n, bell, rung)
                 ? SHX_OK
                 : shx_os_wait_any(maps, words, expected, n, bell, rung, wait_ns);
    for (size_t i = 0; i < counted; i++) {
        if (registered[i])
            uncount_waiter(blocks[i]->hdr, epochs[i]);
    }
    if (rc == SHX_E_TIMEOUT && wait_ns < timeout_ns)
        return SHX_OK; /* a poll of a held lock's block, not the caller's timeout: it looks again */
    if (rc == SHX_E_OS) {
        /* Polled from now on only where the kernel lacks the call: any other
         * failure costs this one wait its sleep, not every wait after it. */
        if (!shx_os_wait_any_supported())
            atomic_store(&wait_any_unsupported, 1);
        return poll_any(blocks, seen, nudges, n, bell, rung, timeout_ns);
    }
    return rc;
}

/* As shx_value_wait watches before it sleeps, and for the same reason: a
 * watcher that hands a version to an event loop is often asked for the next
 * one (a new request rings the bell) or sees the answer within microseconds.
 * The first block's spin state decides and learns for the whole wait. */
static int spin_any(shx_block *const *blocks, const uint64_t *seen, const uint32_t *nudges, size_t n, shx_os_bell *bell,
                    uint32_t rung, int64_t timeout_ns)
{
    uint64_t spin = n > 0 ? spin_budget(blocks[0]) : shx_os_cpu_count() >= 2 ? SHX_WAIT_SPIN_NS : 0;
    if (spin == 0)
        return 0;
    if ((uint64_t)timeout_ns < spin)
        spin = (uint64_t)timeout_ns;
    uint64_t until = shx_os_monotonic_ns() + spin;
    int changed = 0;
    for (;;) {
        for (int i = 0; i < 16 && !changed; i++) {
            changed = any_changed(blocks, seen, nudges, n, bell, rung);
            cpu_relax();
        }
        if (changed || shx_os_monotonic_ns() >= until)
            break;
    }
    if (n > 0)
        spin_learn(blocks[0], changed);
    return changed;
}

int shx_value_wait_any(shx_block *const *blocks, const uint64_t *seen, size_t n, shx_os_bell *bell, uint32_t rung,
                       int64_t timeout_ns, shx_error *err)
{
    if (n > SHX_WAIT_ANY_MAX)
        return shx_fail(err, SHX_E_SIZE, n, SHX_WAIT_ANY_MAX, NULL);
    for (size_t i = 0; i < n; i++) {
        if (!blocks[i]->attached)
            return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
        if (blocks[i]->kind != SHX_KIND_VALUE)
            return shx_fail(err, SHX_E_KIND, blocks[i]->kind, SHX_KIND_VALUE, NULL);
    }
    uint32_t nudges[SHX_WAIT_ANY_MAX] = {0};
    for (size_t i = 0; i < n; i++) {
        atomic_fetch_add(&blocks[i]->watching, 1);
        nudges[i] = atomic_load(&blocks[i]->nudges);
    }
    int rc = timeout_ns > 0 && spin_any(blocks, seen, nudges, n, bell, rung, timeout_ns)
                 ? SHX_OK
                 : sleep_any(blocks, seen, nudges, n, bell, rung, timeout_ns < 0 ? 0 : timeout_ns);
    for (size_t i = 0; i < n; i++)
        atomic_fetch_sub(&blocks[i]->watching, 1);
    return rc;
}

void shx_value_nudge_watchers(shx_block *b)
{
    if (b->attached && b->kind == SHX_KIND_VALUE && atomic_load(&b->watching) > 0) {
        atomic_fetch_add(&b->nudges, 1);
        atomic_thread_fence(memory_order_seq_cst);
        uint32_t waiters = shx_value_waiters(b);
        (void)shx_os_wake_word(&b->map, &b->hdr->wake_seq, waiters > 0 ? waiters : 1);
    }
}

/* ---- messages -------------------------------------------------------------- */

static const char *kind_name(uint64_t kind)
{
    return kind == SHX_KIND_VALUE ? "a value cell" : kind == SHX_KIND_SEGMENT ? "a raw segment" : "unknown";
}

void shx_strerror(const shx_error *err, char *buf, size_t size)
{
    unsigned long long a = err->a, b = err->b;
    switch (err->status) {
    case SHX_OK: snprintf(buf, size, "no error"); break;
    case SHX_E_OS:
        if (err->op != NULL && err->win32)
            snprintf(buf, size, "%s failed: Windows error %d", err->op, err->os_error);
        else if (err->op != NULL && err->detail != NULL && err->a != 0)
            snprintf(buf, size, "%s of %llu bytes failed: %s: %s", err->op, a, strerror(err->os_error), err->detail);
        else if (err->op != NULL && err->detail != NULL)
            snprintf(buf, size, "%s", err->detail);
        else if (err->op != NULL && err->a != 0)
            snprintf(buf, size, "%s of %llu bytes failed: %s", err->op, a, strerror(err->os_error));
        else if (err->op != NULL)
            snprintf(buf, size, "%s failed: %s", err->op, strerror(err->os_error));
        else
            snprintf(buf, size, "%s", err->detail ? err->detail : "system error");
        break;
    case SHX_E_NAME:
        snprintf(buf, size, "it %s; names are 1 to %llu characters from [A-Za-z0-9_.-], not starting with '.' or '-'",
                 err->detail, b);
        break;
    case SHX_E_SIZE: snprintf(buf, size, "size %llu is out of range: it must be between 1 and %llu bytes", a, b); break;
    case SHX_E_FOREIGN: snprintf(buf, size, "exists but is not a shmemext block (it %s)", err->detail); break;
    case SHX_E_NEWER:
        snprintf(buf, size, "was made by a newer shmemext (block layout %llu; this one reads layout %llu)", a, b);
        break;
    case SHX_E_CORRUPT: snprintf(buf, size, "has a corrupt header: it %s", err->detail); break;
    case SHX_E_KIND: snprintf(buf, size, "is %s, not %s", kind_name(a), kind_name(b)); break;
    case SHX_E_CAPACITY:
        snprintf(buf, size, "exists with a capacity of %llu bytes, less than the %llu bytes asked for", b, a);
        break;
    case SHX_E_TOOBIG: snprintf(buf, size, "value of %llu bytes does not fit the capacity of %llu bytes", a, b); break;
    case SHX_E_TIMEOUT:
        if (err->detail != NULL)
            snprintf(buf, size, "timed out after %.3g s: %s", (double)a / 1e9, err->detail);
        else
            snprintf(buf, size, "timed out");
        break;
    case SHX_E_NOTOWNER:
        snprintf(buf, size,
                 "is a private block owned by another user (uid %llu, you are %llu); "
                 "blocks meant to be shared across users need an explicit mode",
                 a, b);
        break;
    case SHX_E_BADVALUE: snprintf(buf, size, "holds a corrupt value: it %s", err->detail); break;
    case SHX_E_CLOSED: snprintf(buf, size, "is closed"); break;
    case SHX_E_PERSIST:
        snprintf(buf, size,
                 "is already open without persist=True, and the kernel frees it with its last holder: "
                 "that cannot be undone while it is held; open it with persist=True before anyone else, "
                 "or keep it alive with `python -m shmemext hold`");
        break;
    case SHX_E_INUSE: snprintf(buf, size, "handle is still attached to a block"); break;
    case SHX_E_BUSY: snprintf(buf, size, "cannot be closed: %llu acquire() of the C API not yet released", a); break;
    case SHX_E_NOTFOUND:
        snprintf(buf, size, "does not exist: no process holds a block of that name, and none persists");
        break;
    case SHX_E_BUFFER: snprintf(buf, size, "value of %llu bytes does not fit the buffer of %llu bytes", a, b); break;
    case SHX_E_ENCODING: snprintf(buf, size, "text %s (at %llu)", err->detail, a); break;
    case SHX_E_INTERRUPTED: snprintf(buf, size, "wait for the writer lock interrupted"); break;
    case SHX_E_RANGE: snprintf(buf, size, "range ends at byte %llu, beyond the size of %llu bytes", a, b); break;
    default: snprintf(buf, size, "unknown error %d", err->status);
    }
}
