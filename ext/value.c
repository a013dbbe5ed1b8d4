/* The value protocol: set() into the slot nobody reads, committed by one
 * release store; get() of the committed slot, re-checked, falling back to
 * the writer lock when writers keep overtaking it (segment.h). */
#include "core.h"

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

/* ---- the value protocol --------------------------------------------------- */

static inline int set_value(shx_block *b, uint32_t type, const void *data, size_t nbytes, uint64_t expect,
                            uint64_t *written, const shx_hooks *hooks, shx_error *err)
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
    if (expect != SHX_ANY_VERSION && next - 1 != expect) {
        rc = shx_block_unlock(b, err);
        return rc != SHX_OK ? rc : shx_fail(err, SHX_E_MOVED, next - 1, expect, NULL);
    }
    if (written != NULL)
        *written = next;
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
    shx_copy_bytes(b->data + index * b->slot_stride, data, nbytes, hooks, shx_copy_stream_set_min());
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
        shx_wait_after_wake(b, shx_os_wake_word(&b->map, &h->wake_seq, waiters));
    return rc;
}

int shx_value_set(shx_block *b, uint32_t type, const void *data, size_t nbytes, const shx_hooks *hooks, shx_error *err)
{
    return set_value(b, type, data, nbytes, SHX_ANY_VERSION, NULL, hooks, err);
}

int shx_value_set_if(shx_block *b, uint32_t type, const void *data, size_t nbytes, uint64_t expect, uint64_t *written,
                     const shx_hooks *hooks, shx_error *err)
{
    return set_value(b, type, data, nbytes, expect, written, hooks, err);
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
            good = shx_copy_checked(dst, b->data + index * b->slot_stride, (size_t)nbytes, type, hooks);
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
        else if (!shx_copy_checked(dst, b->data + index * b->slot_stride, (size_t)nbytes, type, hooks))
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
