/* The message queue's protocol (queue.h). */
#include "queue.h"

#include <string.h>

#include "core.h"

_Static_assert(sizeof(shx_queue_ctl) == 192, "three cache lines");
_Static_assert(SHX_QUEUE_CTL_OFFSET >= sizeof(shx_header), "the queue's lines follow the header's");
_Static_assert(SHX_QUEUE_CTL_OFFSET + sizeof(shx_queue_ctl) <= SHX_HEADER_SIZE, "inside the header page");

/* A record's head.  seq is the message's number (the block's version before
 * it was committed), so that the count of messages is a subtraction. */
typedef struct record_head {
    uint64_t nbytes;
    uint32_t type;
    uint32_t seq;
} record_head;
_Static_assert(sizeof(record_head) == SHX_QUEUE_RECORD, "a record head is one record unit");

uint64_t shx_queue_record_size(uint64_t nbytes)
{
    if (nbytes > SHX_MAX_CAPACITY)
        return 0;
    return SHX_QUEUE_RECORD + (nbytes + SHX_QUEUE_RECORD - 1) / SHX_QUEUE_RECORD * SHX_QUEUE_RECORD;
}

uint64_t shx_queue_max_message(const shx_block *b) { return b->capacity - SHX_QUEUE_RECORD; }

static int queue_usable(const shx_block *b, shx_error *err)
{
    if (!b->attached)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    if (b->kind != SHX_KIND_QUEUE)
        return shx_fail(err, SHX_E_KIND, b->kind, SHX_KIND_QUEUE, NULL);
    return SHX_OK;
}

static int valid_type(uint32_t type) { return type >= SHX_TYPE_BYTES && type <= SHX_TYPE_PICKLE_FRAMED; }

/* Copies between the ring and a flat buffer, the ring's part maybe in two
 * pieces (a record wraps around its end). */
static void copy_in(shx_block *b, uint64_t at, const void *src, size_t n, const shx_hooks *hooks)
{
    size_t off = (size_t)(at % b->capacity), first = n < b->capacity - off ? n : (size_t)(b->capacity - off);
    shx_copy_bytes(b->data + off, src, first, hooks, SHX_STREAM_COPY_MIN);
    if (first < n)
        shx_copy_bytes(b->data, (const unsigned char *)src + first, n - first, hooks, SHX_STREAM_COPY_MIN);
}

static int copy_out(shx_block *b, uint64_t at, void *dst, size_t n, uint32_t type, const shx_hooks *hooks)
{
    size_t off = (size_t)(at % b->capacity), first = n < b->capacity - off ? n : (size_t)(b->capacity - off);
    uint32_t copy_type = type <= SHX_TYPE_UCS4 ? type : SHX_TYPE_BYTES;
    if (first == n)
        return shx_copy_checked((unsigned char *)dst, b->data + off, n, copy_type, hooks);
    /* Text split by the ring's end: copied in two, checked whole. */
    shx_copy_bytes(dst, b->data + off, first, hooks, SHX_STREAM_COPY_MIN);
    shx_copy_bytes((unsigned char *)dst + first, b->data, n - first, hooks, SHX_STREAM_COPY_MIN);
    shx_error ignored;
    return copy_type == SHX_TYPE_BYTES || shx_value_check(copy_type, dst, n, &ignored) == SHX_OK;
}

uint64_t shx_queue_used(const shx_block *b)
{
    shx_queue_ctl *q = shx_queue_ctl_of(b);
    uint64_t head = atomic_load_explicit(&q->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&q->tail, memory_order_acquire);
    uint64_t used = tail - head;
    return used > b->capacity ? 0 : used; /* a head read before a tail that lagged it, or nonsense */
}

uint64_t shx_queue_taken(const shx_block *b)
{
    return atomic_load_explicit(&shx_queue_ctl_of(b)->head, memory_order_acquire);
}

uint64_t shx_queue_count(const shx_block *b)
{
    shx_queue_ctl *q = shx_queue_ctl_of(b);
    for (int tries = 0; tries < 16; tries++) {
        uint64_t head = atomic_load_explicit(&q->head, memory_order_acquire);
        uint64_t version = atomic_load_explicit(&b->hdr->version, memory_order_acquire);
        uint64_t tail = atomic_load_explicit(&q->tail, memory_order_acquire);
        if (tail == head)
            return 0;
        if (tail - head > b->capacity || head % SHX_QUEUE_RECORD != 0)
            continue;
        record_head r;
        memcpy(&r, b->data + head % b->capacity, sizeof r);
        atomic_thread_fence(memory_order_acquire);
        /* The record was still the oldest when read: no producer reuses
         * its bytes before the head has passed it. */
        if (atomic_load_explicit(&q->head, memory_order_relaxed) != head)
            continue;
        uint32_t count = (uint32_t)version - r.seq;
        /* A producer that committed between our reads of the version and
         * the tail makes it one short; never more than the ring can hold. */
        uint64_t most = (tail - head) / SHX_QUEUE_RECORD;
        return count == 0 ? 1 : (count > most ? most : count);
    }
    return 0;
}

/* How long the next sleep of a wait begun at `start` may be: what is left
 * of timeout_ns (< 0: for ever), in slices when the caller's hooks want to
 * be asked between them; <= 0 once the time is up. */
static int64_t next_sleep(int64_t timeout_ns, uint64_t start, const shx_hooks *hooks)
{
    int64_t left = timeout_ns < 0 ? SHX_WAIT_SLICE_NS : timeout_ns - (int64_t)(shx_os_monotonic_ns() - start);
    if (left > SHX_WAIT_SLICE_NS && hooks != NULL && hooks->interrupted != NULL)
        left = SHX_WAIT_SLICE_NS;
    return left;
}

/* ---- producers ---------------------------------------------------------- */

typedef struct room_ask {
    shx_block *b;
    uint64_t need;
} room_ask;

static int has_message(void *vb)
{
    shx_queue_ctl *q = shx_queue_ctl_of((const shx_block *)vb);
    return atomic_load_explicit(&q->tail, memory_order_acquire) != atomic_load_explicit(&q->head, memory_order_relaxed);
}

static int has_room(void *vask)
{
    room_ask *ask = (room_ask *)vask;
    return shx_queue_used(ask->b) + ask->need <= ask->b->capacity;
}

/* After a producer died holding the lock: it may have moved the tail but
 * not the version, which counts messages; the last record says.  Under the
 * lock, where no record in the ring can be rewritten. */
static void repair_count(shx_block *b)
{
    shx_queue_ctl *q = shx_queue_ctl_of(b);
    uint64_t head = atomic_load_explicit(&q->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&q->tail, memory_order_relaxed);
    uint64_t at = head, last = UINT64_MAX;
    if (tail - head > b->capacity || head % SHX_QUEUE_RECORD != 0)
        return; /* the next consumer reports this */
    while (at < tail) {
        record_head r;
        memcpy(&r, b->data + at % b->capacity, sizeof r);
        uint64_t size = shx_queue_record_size(r.nbytes);
        if (size == 0 || size > tail - at)
            return;
        last = r.seq;
        at += size;
    }
    uint64_t version = atomic_load_explicit(&b->hdr->version, memory_order_relaxed);
    if (last != UINT64_MAX && (uint32_t)version != (uint32_t)(last + 1))
        atomic_store_explicit(&b->hdr->version, version + 1, memory_order_release);
}

/* How long the other side's copy of a record of `size` bytes may take, at
 * a pessimistic 4 GB/s and at most 2 ms: a wait for room or for a message
 * spins that much longer before it sleeps, since a wake-up costs more than
 * the spin for large records (1 MiB messages streamed at half the speed
 * when each wait slept). */
static void expect_copy_of(shx_block *b, uint64_t size)
{
    uint64_t ns = size / 4 < UINT64_C(2000000) ? size / 4 : UINT64_C(2000000);
    if (atomic_load_explicit(&b->spin_extra_ns, memory_order_relaxed) != ns)
        atomic_store_explicit(&b->spin_extra_ns, ns, memory_order_relaxed);
}

/* Wakes consumers asleep for a message (the Value wait's count, read under
 * the lock, as set() does). */
static uint32_t data_waiters_to_wake(shx_block *b)
{
    shx_header *h = b->hdr;
    atomic_store_explicit(&h->wake_seq, atomic_load_explicit(&h->wake_seq, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    uint32_t waiters = shx_value_waiters(b);
    if (SHX_OS_ONE_WAKE_PER_BLOCK && waiters != 0)
        waiters += (uint32_t)atomic_load_explicit(&shx_queue_ctl_of(b)->room.waiters, memory_order_relaxed);
    return waiters;
}

/* How much longer than its timeout a put waits for the producers' lock: a
 * holder copies one message, and a dead one is replaced by the kernel at
 * once, so a put that only tries (put_nowait) must not fail for a queue with
 * room because another producer was copying. */
#define LOCK_GRACE_NS INT64_C(200000000)

static int lock_producers(shx_block *b, uint64_t need, uint64_t start, int64_t timeout_ns, const shx_hooks *hooks,
                          shx_error *err)
{
    int owner_died;
    int64_t left = timeout_ns < 0 ? -1 : timeout_ns - (int64_t)(shx_os_monotonic_ns() - start);
    int rc = shx_block_lock(b, timeout_ns < 0 ? -1 : (left > 0 ? left : 0) + LOCK_GRACE_NS, &owner_died, hooks, err);
    if (rc == SHX_E_TIMEOUT)
        return shx_fail(err, SHX_E_FULL, need, b->capacity, "its producers' lock was held meanwhile");
    if (rc == SHX_OK && shx_block_take_owner_died(b)) {
        repair_count(b);
        /* The dead producer may have committed without waking anyone. */
        uint32_t waiters = data_waiters_to_wake(b);
        if (waiters != 0)
            (void)shx_os_wake_word(&b->map, &b->hdr->wake_seq, waiters);
    }
    return rc;
}

int shx_queue_put(shx_block *b, uint32_t type, const shx_iov *parts, size_t n, int64_t timeout_ns,
                  const shx_hooks *hooks, shx_error *err)
{
    int rc = queue_usable(b, err);
    if (rc != SHX_OK)
        return rc;
    if (!valid_type(type))
        return shx_fail(err, SHX_E_BADVALUE, type, 0, "has a message type no queue carries");
    uint64_t nbytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (parts[i].len > SHX_MAX_CAPACITY - nbytes)
            return shx_fail(err, SHX_E_TOOBIG, SHX_MAX_CAPACITY, shx_queue_max_message(b), NULL);
        nbytes += parts[i].len;
    }
    uint64_t need = shx_queue_record_size(nbytes);
    if (need == 0 || need > b->capacity)
        return shx_fail(err, SHX_E_TOOBIG, nbytes, shx_queue_max_message(b), NULL);

    shx_queue_ctl *q = shx_queue_ctl_of(b);
    room_ask ask = {b, need};
    uint64_t start = shx_os_monotonic_ns();
    if ((rc = lock_producers(b, need, start, timeout_ns, hooks, err)) != SHX_OK)
        return rc;
    uint64_t tail;
    for (;;) {
        uint64_t head = atomic_load_explicit(&q->head, memory_order_acquire);
        tail = atomic_load_explicit(&q->tail, memory_order_relaxed);
        if (tail - head > b->capacity || tail % SHX_QUEUE_RECORD != 0 || head % SHX_QUEUE_RECORD != 0) {
            shx_error ignored;
            (void)shx_block_unlock(b, &ignored);
            return shx_fail(err, SHX_E_BADVALUE, tail - head, b->capacity, "has a head and tail no ring can have");
        }
        if (b->capacity - (tail - head) >= need)
            break;
        /* Full: out of the other producers' way while we wait for room. */
        if ((rc = shx_block_unlock(b, err)) != SHX_OK)
            return rc;
        expect_copy_of(b, need);
        for (;;) {
            int64_t left = next_sleep(timeout_ns, start, hooks);
            if (left <= 0 && !has_room(&ask))
                return shx_fail(err, SHX_E_FULL, need, b->capacity, NULL);
            if (hooks != NULL && hooks->blocking_begin != NULL)
                hooks->blocking_begin(hooks->ctx);
            rc = left > 0 ? shx_channel_wait(b, &q->room, has_room, &ask, left) : SHX_OK;
            if (hooks != NULL && hooks->blocking_end != NULL)
                hooks->blocking_end(hooks->ctx);
            if (rc == SHX_OK)
                break;
            if (hooks != NULL && hooks->interrupted != NULL && hooks->interrupted(hooks->ctx))
                return shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL);
        }
        if ((rc = lock_producers(b, need, start, timeout_ns, hooks, err)) != SHX_OK)
            return rc;
    }

    shx_header *h = b->hdr;
    uint64_t version = atomic_load_explicit(&h->version, memory_order_relaxed);
    record_head r = {nbytes, type, (uint32_t)version};
    memcpy(b->data + tail % b->capacity, &r, sizeof r);
    uint64_t at = tail + SHX_QUEUE_RECORD;
    for (size_t i = 0; i < n; i++) {
        copy_in(b, at, parts[i].base, parts[i].len, hooks);
        at += parts[i].len;
    }
    /* The record is whole before the tail says it exists; the version
     * after, so that a consumer woken for it finds it. */
    atomic_store_explicit(&q->tail, tail + need, memory_order_release);
    atomic_store_explicit(&h->version, version + 1, memory_order_release);
    uint32_t waiters = data_waiters_to_wake(b);
    rc = shx_block_unlock(b, err);
    if (waiters != 0)
        shx_wait_after_wake(b, shx_os_wake_word(&b->map, &h->wake_seq, waiters));
    return rc;
}

/* ---- consumers ---------------------------------------------------------- */

/* One try: SHX_OK with a message taken, SHX_E_EMPTY, or an error.  A record
 * that another consumer takes first while we copy is tried again.  With
 * `peek`, the record at peek->at (the oldest when SHX_QUEUE_AT_HEAD) is
 * copied and left where it is; SHX_E_MOVED when the head has passed it. */
static int take(shx_block *b, shx_prepare_dst_fn prepare, void *ctx, const shx_hooks *hooks, uint32_t *type_out,
                size_t *nbytes_out, shx_queue_spot *peek, shx_error *err)
{
    shx_queue_ctl *q = shx_queue_ctl_of(b);
    int fixed = peek != NULL && peek->at != SHX_QUEUE_AT_HEAD;
    for (;;) {
        uint64_t head = atomic_load_explicit(&q->head, memory_order_acquire);
        uint64_t tail = atomic_load_explicit(&q->tail, memory_order_acquire);
        uint64_t at = fixed ? peek->at : head;
        if (at - head > tail - head) /* at < head, or a position past the tail */
            return at < head ? shx_fail(err, SHX_E_MOVED, head, at, NULL) : SHX_E_EMPTY;
        if (tail == at)
            return SHX_E_EMPTY;
        int sane = tail - head <= b->capacity && head % SHX_QUEUE_RECORD == 0 && at % SHX_QUEUE_RECORD == 0;
        record_head r = {0, 0, 0};
        uint64_t size = 0;
        if (sane) {
            memcpy(&r, b->data + at % b->capacity, sizeof r);
            size = shx_queue_record_size(r.nbytes);
            sane = size != 0 && size <= tail - at && valid_type(r.type);
        }
        int good = 0;
        void *dst = NULL;
        if (sane) {
            dst = prepare(ctx, r.type, (size_t)r.nbytes);
            if (dst != NULL)
                good = copy_out(b, at + SHX_QUEUE_RECORD, dst, (size_t)r.nbytes, r.type, hooks);
        }
        /* Taking it is the proof that what we read was the record: no
         * producer rewrites bytes the head has not passed. */
        if (!sane || dst == NULL || peek != NULL) {
            atomic_thread_fence(memory_order_acquire);
            uint64_t now = atomic_load_explicit(&q->head, memory_order_relaxed);
            if (now != head && now > at) {
                if (fixed)
                    return shx_fail(err, SHX_E_MOVED, now, at, NULL);
                continue; /* maybe a size torn by a producer reusing the bytes */
            }
        }
        /* Still there, so it is what the ring holds: nothing a consumer
         * can step over safely. */
        if (!sane)
            return shx_fail(err, SHX_E_BADVALUE, r.nbytes, tail - at, "has a record no ring can hold");
        if (dst == NULL)
            return shx_fail(err, SHX_E_OS, 0, 0, "out of memory");
        if (peek != NULL) {
            peek->at = at;
            peek->next = at + size;
            if (!good)
                return shx_fail(err, SHX_E_BADVALUE, r.nbytes, r.type, "had a message that is not well formed");
            *type_out = r.type;
            *nbytes_out = (size_t)r.nbytes;
            return SHX_OK;
        }
        uint64_t expected = head;
        if (!atomic_compare_exchange_strong_explicit(&q->head, &expected, head + size, memory_order_seq_cst,
                                                     memory_order_relaxed))
            continue;
        shx_channel_wake(b, &q->room);
        expect_copy_of(b, size);
        if (!good)
            return shx_fail(err, SHX_E_BADVALUE, r.nbytes, r.type, "had a message that is not well formed (taken)");
        *type_out = r.type;
        *nbytes_out = (size_t)r.nbytes;
        return SHX_OK;
    }
}

typedef struct message_ask {
    shx_block *b;
    uint64_t at; /* SHX_QUEUE_AT_HEAD: any message */
} message_ask;

static int has_message_at(void *vask)
{
    message_ask *ask = (message_ask *)vask;
    if (ask->at == SHX_QUEUE_AT_HEAD)
        return has_message(ask->b);
    shx_queue_ctl *q = shx_queue_ctl_of(ask->b);
    return atomic_load_explicit(&q->tail, memory_order_acquire) > ask->at;
}

static int wait_take(shx_block *b, shx_prepare_dst_fn prepare, void *ctx, int64_t timeout_ns, const shx_hooks *hooks,
                     uint32_t *type_out, size_t *nbytes_out, shx_queue_spot *peek, shx_error *err)
{
    int rc = queue_usable(b, err);
    if (rc != SHX_OK)
        return rc;
    message_ask ask = {b, peek != NULL ? peek->at : SHX_QUEUE_AT_HEAD};
    uint64_t start = timeout_ns != 0 ? shx_os_monotonic_ns() : 0;
    for (;;) {
        rc = take(b, prepare, ctx, hooks, type_out, nbytes_out, peek, err);
        if (rc != SHX_E_EMPTY)
            return rc;
        int64_t left = timeout_ns == 0 ? 0 : next_sleep(timeout_ns, start, hooks);
        if (left <= 0)
            return shx_fail(err, SHX_E_EMPTY, 0, 0, NULL);
        /* The spin watches the tail, which the next message moves first:
         * the version's line is then read only by a consumer about to
         * sleep, and stays with the producers while messages stream. */
        if (shx_spin_until(b, has_message_at, &ask, left))
            continue;
        /* The version before one more look: a message committed after it
         * moves it, and the sleep below then returns at once. */
        uint64_t seen = shx_value_version(b);
        rc = take(b, prepare, ctx, hooks, type_out, nbytes_out, peek, err);
        if (rc != SHX_E_EMPTY)
            return rc;
        uint64_t now;
        if (hooks != NULL && hooks->blocking_begin != NULL)
            hooks->blocking_begin(hooks->ctx);
        rc = shx_value_sleep(b, seen, left, &now, err);
        if (hooks != NULL && hooks->blocking_end != NULL)
            hooks->blocking_end(hooks->ctx);
        if (rc != SHX_OK && rc != SHX_E_TIMEOUT)
            return rc;
        if (rc == SHX_E_TIMEOUT && hooks != NULL && hooks->interrupted != NULL && hooks->interrupted(hooks->ctx))
            return shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL);
    }
}

int shx_queue_get(shx_block *b, shx_prepare_dst_fn prepare, void *ctx, int64_t timeout_ns, const shx_hooks *hooks,
                  uint32_t *type_out, size_t *nbytes_out, shx_error *err)
{
    return wait_take(b, prepare, ctx, timeout_ns, hooks, type_out, nbytes_out, NULL, err);
}

int shx_queue_peek(shx_block *b, shx_queue_spot *spot, shx_prepare_dst_fn prepare, void *ctx, int64_t timeout_ns,
                   const shx_hooks *hooks, uint32_t *type_out, size_t *nbytes_out, shx_error *err)
{
    return wait_take(b, prepare, ctx, timeout_ns, hooks, type_out, nbytes_out, spot, err);
}

int shx_queue_drop(shx_block *b, uint64_t from, uint64_t to, shx_error *err)
{
    int rc = queue_usable(b, err);
    if (rc != SHX_OK)
        return rc;
    shx_queue_ctl *q = shx_queue_ctl_of(b);
    uint64_t tail = atomic_load_explicit(&q->tail, memory_order_acquire);
    if (to < from || to > tail || (to - from) % SHX_QUEUE_RECORD != 0)
        return shx_fail(err, SHX_E_RANGE, to, tail, NULL);
    uint64_t expected = from;
    if (!atomic_compare_exchange_strong_explicit(&q->head, &expected, to, memory_order_seq_cst, memory_order_relaxed))
        return shx_fail(err, SHX_E_MOVED, expected, from, NULL);
    shx_channel_wake(b, &q->room);
    return SHX_OK;
}
