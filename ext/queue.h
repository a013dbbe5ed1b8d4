/* The message queue: a block whose data is a ring of whole messages.
 *
 * Producers take the block's writer lock, one at a time; consumers take no
 * lock.  A producer writes a record (a 16-byte head, then the message) past
 * the tail and only then moves the tail: a producer killed at any point
 * leaves nothing visible, and the lock it held is handed on by the kernel.
 * A consumer copies the record at the head out and then moves the head past
 * it with one compare-and-swap: a consumer that loses the swap (another took
 * the record, and a producer may have reused the bytes it copied) drops its
 * copy and tries again.  So a message leaves the ring only when some
 * consumer holds all of it, and a consumer killed before its swap leaves it
 * for the others; one killed after it takes that one message with it.
 *
 * Head and tail are byte counts that only grow; the ring offset is the count
 * modulo the capacity.  Every length read from the ring is checked against
 * the ring before it is used: bytes another process wrote make a consumer
 * fail (SHX_E_BADVALUE), never read outside the block.
 *
 * Consumers that find the queue empty sleep as Value waits do (the block's
 * version counts committed messages); producers that find it full sleep on a
 * channel of their own that consumers ring after each swap.
 */
#ifndef SHMEMEXT_QUEUE_H
#define SHMEMEXT_QUEUE_H

#include "segment.h"

/* Every record starts with this, and records start on multiples of it. */
#define SHX_QUEUE_RECORD           16
#define SHX_QUEUE_MIN_CAPACITY     64
#define SHX_QUEUE_DEFAULT_CAPACITY ((uint64_t)1 << 20)

/* A wake-up channel whose wakers take no lock (wait.c): a waiter counts
 * itself, then looks; a waker changes the state, then reads the count. */
typedef struct shx_channel {
    _Atomic uint32_t seq;        /* the futex word: moved by every wake that finds waiters */
    _Atomic uint32_t idle_wakes; /* wakes in a row that found nobody asleep */
    _Atomic uint64_t waiters;    /* count (low 32 bits) and epoch (high 32), as the header's */
} shx_channel;

/* In the header page, past what values use. */
typedef struct shx_queue_ctl {
    _Atomic uint64_t tail; /* bytes ever committed: moved by producers under the lock */
    unsigned char pad0[56];
    _Atomic uint64_t head; /* bytes ever taken: moved by consumers' compare-and-swap */
    unsigned char pad1[56];
    shx_channel room; /* producers waiting for room */
    unsigned char pad2[48];
} shx_queue_ctl;
#define SHX_QUEUE_CTL_OFFSET 512

static inline shx_queue_ctl *shx_queue_ctl_of(const shx_block *b)
{
    return (shx_queue_ctl *)(void *)((unsigned char *)b->hdr + SHX_QUEUE_CTL_OFFSET);
}

/* One part of a message a producer gathers into its record. */
typedef struct shx_iov {
    const void *base;
    size_t len;
} shx_iov;

/* The record size a message of nbytes takes, or 0 past any capacity. */
uint64_t shx_queue_record_size(uint64_t nbytes);
/* The largest message the queue takes. */
uint64_t shx_queue_max_message(const shx_block *b);

/* Puts one message of `type` made of parts[0..n).  timeout_ns 0 only tries,
 * < 0 waits for room for ever (in slices that ask hooks->interrupted, when
 * set).  SHX_E_TOOBIG for a message that can never fit (nothing written);
 * SHX_E_FULL when there was no room in time. */
int shx_queue_put(shx_block *b, uint32_t type, const shx_iov *parts, size_t n, int64_t timeout_ns,
                  const shx_hooks *hooks, shx_error *err);
/* Takes the oldest message into prepare()'s destination (asked with the
 * message's type and size; called again, maybe with another size, when
 * another consumer took that message first).  SHX_E_EMPTY when none came in
 * time.  A message that is not well formed is taken and reported
 * (SHX_E_BADVALUE), so that it cannot wedge the queue. */
int shx_queue_get(shx_block *b, shx_prepare_dst_fn prepare, void *ctx, int64_t timeout_ns, const shx_hooks *hooks,
                  uint32_t *type_out, size_t *nbytes_out, shx_error *err);

/* Where a peek looks (at: a byte position, or SHX_QUEUE_AT_HEAD for the
 * oldest message) and, after it, where that record was and where the next
 * one starts. */
#define SHX_QUEUE_AT_HEAD UINT64_MAX
typedef struct shx_queue_spot {
    uint64_t at, next;
} shx_queue_spot;

/* Copies the message at spot->at as shx_queue_get would, and leaves it in
 * the queue: for a consumer that must not lose a message it has not yet
 * handed on (a bridge), and takes it with shx_queue_drop once it has.
 * Waits like shx_queue_get for a message to be there; SHX_E_MOVED when
 * another consumer took it first.  A message that is not well formed is
 * SHX_E_BADVALUE with spot->next set, so that the caller can drop it. */
int shx_queue_peek(shx_block *b, shx_queue_spot *spot, shx_prepare_dst_fn prepare, void *ctx, int64_t timeout_ns,
                   const shx_hooks *hooks, uint32_t *type_out, size_t *nbytes_out, shx_error *err);
/* Takes every record from byte position `from` (the head) to `to` (a
 * spot's next) at once; SHX_E_MOVED, nothing taken, when the head is not
 * at `from`. */
int shx_queue_drop(shx_block *b, uint64_t from, uint64_t to, shx_error *err);

/* The same for callers without Python (text.c): bytes and pickles copied
 * as they are, text as UTF-8 into buf; SHX_E_BUFFER with *len the room text
 * may need (its longest UTF-8), the message left in the queue. */
int shx_queue_get_utf8(shx_block *b, void *buf, size_t cap, size_t *len, int *is_text, int *is_pickle,
                       int64_t timeout_ns, const shx_hooks *hooks, shx_error *err);

/* Messages in the queue now, and bytes of records (no system call). */
uint64_t shx_queue_count(const shx_block *b);
uint64_t shx_queue_used(const shx_block *b);
/* Bytes of records ever taken: what a wait for room (shx_wait_any) watches. */
uint64_t shx_queue_taken(const shx_block *b);

/* The channel functions (wait.c).  wait: sleeps while ready(ctx) is false,
 * at most timeout_ns (>= 0); SHX_OK when ready() said so, else SHX_E_TIMEOUT
 * (it may end early: callers look again).  wake: after a change that makes a
 * waiter ready, itself ordered (a read-modify-write, or a fence). */
int shx_channel_wait(shx_block *b, shx_channel *c, int (*ready)(void *), void *ctx, int64_t timeout_ns);
void shx_channel_wake(shx_block *b, shx_channel *c);

#endif
