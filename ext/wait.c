/* Waiting for a value to change: the count of waiters a set() wakes, the
 * spin before sleeping, one wait and a wait on many (segment.h). */
#include "core.h"
#include "queue.h"

#if defined(_MSC_VER)
#include <intrin.h> /* _mm_pause, __yield */
#endif

/* Blocks whose version a wait watches: a value's sets, a queue's messages. */
static int versioned(const shx_block *b) { return b->kind == SHX_KIND_VALUE || b->kind == SHX_KIND_QUEUE; }

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
    if (shx_block_lock_now(b, 0, &died, &ignored) != SHX_OK)
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

void shx_wait_after_wake(shx_block *b, int woken)
{
    shx_header *h = b->hdr;
    if (woken < 0)
        return;
    uint32_t idle = woken == 0 ? atomic_load_explicit(&h->idle_wakes, memory_order_relaxed) + 1 : 0;
    atomic_store_explicit(&h->idle_wakes, idle, memory_order_relaxed);
    if (idle >= IDLE_WAKES_BEFORE_RECOUNT)
        (void)shx_value_recount_waiters(b);
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
    uint64_t spin = SHX_WAIT_SPIN_NS + atomic_load_explicit(&b->spin_extra_ns, memory_order_relaxed);
    if (!atomic_load_explicit(&b->spin_off, memory_order_relaxed))
        return spin;
    uint32_t probe = atomic_load_explicit(&b->spin_probe, memory_order_relaxed) + 1;
    atomic_store_explicit(&b->spin_probe, probe, memory_order_relaxed);
    return probe % SPIN_PROBE_EVERY == 0 ? spin : 0;
}

static void spin_learn(shx_block *b, int seen_change)
{
    int off = !seen_change && shx_os_cpus_oversubscribed();
    atomic_store_explicit(&b->spin_off, off, memory_order_relaxed);
}

/* Watches for a short while before sleeping: a partner that answers within
 * that time (a ping-pong, a request and its reply) is seen without either
 * process going through the kernel's sleep and wake-up, which on an idle
 * machine costs tens of microseconds. */
int shx_spin_until(shx_block *b, int (*ready)(void *), void *ctx, int64_t timeout_ns)
{
    uint64_t spin = timeout_ns != 0 ? spin_budget(b) : 0;
    if (spin == 0)
        return 0;
    if (timeout_ns > 0 && (uint64_t)timeout_ns < spin)
        spin = (uint64_t)timeout_ns;
    uint64_t start = shx_os_monotonic_ns(), until = start + spin;
    /* Past the usual spin (a queue's long one, for large records) each look
     * yields the CPU: were the other side on this CPU, it runs.  A sleep
     * instead lets the kernel wake us onto the waker's CPU, and the two then
     * take turns on one CPU (1 MiB messages streamed at half the speed in
     * runs whose sides slept some 30 times in 300 messages). */
    uint64_t yield_from = start + SHX_WAIT_SPIN_NS;
    int seen = 0;
    for (uint64_t now = start; !seen && now < until; now = shx_os_monotonic_ns()) {
        if (now >= yield_from) {
            if (!(seen = ready(ctx)))
                shx_os_yield();
            continue;
        }
        for (int i = 0; i < 64 && !(seen = ready(ctx)); i++)
            cpu_relax();
    }
    spin_learn(b, seen);
    return seen;
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
        rc = shx_block_lock_now(b, 0, &died, err);
        for (int k = 0; rc == SHX_E_TIMEOUT && k < 16; k++)
            cpu_relax();
    }
    if (rc == SHX_E_TIMEOUT && timeout_ns != 0)
        rc = shx_block_lock_now(b, timeout_ns, &died, err);
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

typedef struct version_moved_ask {
    shx_header *h;
    uint64_t seen;
} version_moved_ask;

static int version_moved(void *vask)
{
    version_moved_ask *ask = (version_moved_ask *)vask;
    return atomic_load_explicit(&ask->h->version, memory_order_acquire) != ask->seen;
}

static int value_wait(shx_block *b, uint64_t seen, int64_t timeout_ns, int spin_first, uint64_t *now, shx_error *err)
{
    if (!b->attached)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    if (!versioned(b))
        return shx_fail(err, SHX_E_KIND, b->kind, SHX_KIND_VALUE, NULL);
    shx_header *h = b->hdr;
    uint64_t start = shx_os_monotonic_ns();
    version_moved_ask ask = {h, seen};
    if (spin_first && !version_moved(&ask))
        (void)shx_spin_until(b, version_moved, &ask, timeout_ns);
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

int shx_value_wait(shx_block *b, uint64_t seen, int64_t timeout_ns, uint64_t *now, shx_error *err)
{
    return value_wait(b, seen, timeout_ns, 1, now, err);
}

int shx_value_sleep(shx_block *b, uint64_t seen, int64_t timeout_ns, uint64_t *now, shx_error *err)
{
    return value_wait(b, seen, timeout_ns, 0, now, err);
}

/* Whether the kernel has no wait on many words (an old Linux): from then on
 * this process polls. */
static _Atomic int wait_any_unsupported;

/* How soon a block whose lock a wait on many could not take is looked at again. */
#define BUSY_LOCK_POLL_NS 1000000

/* What entry i of a wait on many watches: a block's version, or for a
 * queue's room its head (moved by every message taken). */
static uint64_t watched(shx_block *b, const unsigned char *room, size_t i)
{
    if (room != NULL && room[i])
        return shx_queue_taken(b);
    return atomic_load_explicit(&b->hdr->version, memory_order_acquire);
}

static int any_changed(shx_block *const *blocks, const unsigned char *room, const uint64_t *seen,
                       const uint32_t *nudges, size_t n, shx_os_bell *bell, uint32_t rung)
{
    if (shx_os_bell_rings(bell) != rung)
        return 1;
    for (size_t i = 0; i < n; i++) {
        if (watched(blocks[i], room, i) != seen[i] || atomic_load(&blocks[i]->nudges) != nudges[i])
            return 1;
    }
    return 0;
}

static int poll_any(shx_block *const *blocks, const unsigned char *room, const uint64_t *seen, const uint32_t *nudges,
                    size_t n, shx_os_bell *bell, uint32_t rung, int64_t timeout_ns)
{
    uint64_t start = shx_os_monotonic_ns();
    for (;;) {
        if (any_changed(blocks, room, seen, nudges, n, bell, rung))
            return SHX_OK;
        if ((int64_t)(shx_os_monotonic_ns() - start) >= timeout_ns)
            return SHX_E_TIMEOUT;
        /* About a millisecond a look: where no wait on many words exists
         * (macOS, the BSDs, Linux before 5.16). */
        for (int i = 0; i < 10; i++)
            shx_os_pause_briefly();
    }
}

static void channel_uncount(shx_channel *c, uint32_t epoch);

static int sleep_any(shx_block *const *blocks, const unsigned char *room, const uint64_t *seen, const uint32_t *nudges,
                     size_t n, shx_os_bell *bell, uint32_t rung, int64_t timeout_ns)
{
    if (SHX_OS_WAIT_ANY_MAX == 0 || atomic_load(&wait_any_unsupported))
        return poll_any(blocks, room, seen, nudges, n, bell, rung, timeout_ns);
    shx_os_map *maps[SHX_WAIT_ANY_MAX];
    void *words[SHX_WAIT_ANY_MAX];
    uint32_t expected[SHX_WAIT_ANY_MAX];
    int registered[SHX_WAIT_ANY_MAX];
    uint32_t epochs[SHX_WAIT_ANY_MAX];
    /* As in shx_value_wait: count ourselves a waiter of each under its lock,
     * then look at the versions, so that every set() from now on sees us and
     * wakes us.  A block whose lock stays held (or is not a lock any more) is
     * not waited on but looked at again soon: one block cannot hold up the
     * others.  A queue's room is a channel without a lock: counted there,
     * then looked at (any_changed, after the fence). */
    int64_t wait_ns = timeout_ns;
    shx_error ignored;
    int changed = 0;
    size_t counted = 0;
    for (; counted < n && !changed; counted++) {
        size_t i = counted;
        shx_header *h = blocks[i]->hdr;
        maps[i] = &blocks[i]->map;
        if (room != NULL && room[i]) {
            shx_channel *c = &shx_queue_ctl_of(blocks[i])->room;
            words[i] = (void *)&c->seq;
            expected[i] = atomic_load_explicit(&c->seq, memory_order_acquire);
            epochs[i] = (uint32_t)(atomic_fetch_add_explicit(&c->waiters, 1, memory_order_seq_cst) >> 32);
            registered[i] = 1;
            continue;
        }
        words[i] = (void *)&h->wake_seq;
        if (register_waiter(blocks[i], seen[i], 0, &expected[i], &registered[i], &epochs[i], &ignored) != SHX_OK) {
            expected[i] = atomic_load_explicit(&h->wake_seq, memory_order_relaxed);
            if (wait_ns > BUSY_LOCK_POLL_NS)
                wait_ns = BUSY_LOCK_POLL_NS;
        } else if (!registered[i]) {
            changed = 1; /* its version moved: nothing to sleep for */
        }
    }
    atomic_thread_fence(memory_order_seq_cst);
    int rc = changed || any_changed(blocks, room, seen, nudges, n, bell, rung)
                 ? SHX_OK
                 : shx_os_wait_any(maps, words, expected, n, bell, rung, wait_ns);
    for (size_t i = 0; i < counted; i++) {
        if (room != NULL && room[i])
            channel_uncount(&shx_queue_ctl_of(blocks[i])->room, epochs[i]);
        else if (registered[i])
            uncount_waiter(blocks[i]->hdr, epochs[i]);
    }
    if (rc == SHX_E_TIMEOUT && wait_ns < timeout_ns)
        return SHX_OK; /* a poll of a held lock's block, not the caller's timeout: it looks again */
    if (rc == SHX_E_OS) {
        /* Polled from now on only where the kernel lacks the call: any other
         * failure costs this one wait its sleep, not every wait after it. */
        if (!shx_os_wait_any_supported())
            atomic_store(&wait_any_unsupported, 1);
        return poll_any(blocks, room, seen, nudges, n, bell, rung, timeout_ns);
    }
    return rc;
}

/* As shx_value_wait watches before it sleeps, and for the same reason: a
 * watcher that hands a version to an event loop is often asked for the next
 * one (a new request rings the bell) or sees the answer within microseconds.
 * The first block's spin state decides and learns for the whole wait. */
static int spin_any(shx_block *const *blocks, const unsigned char *room, const uint64_t *seen, const uint32_t *nudges,
                    size_t n, shx_os_bell *bell, uint32_t rung, int64_t timeout_ns)
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
            changed = any_changed(blocks, room, seen, nudges, n, bell, rung);
            cpu_relax();
        }
        if (changed || shx_os_monotonic_ns() >= until)
            break;
    }
    if (n > 0)
        spin_learn(blocks[0], changed);
    return changed;
}

int shx_wait_any(shx_block *const *blocks, const unsigned char *room, const uint64_t *seen, size_t n, shx_os_bell *bell,
                 uint32_t rung, int64_t timeout_ns, shx_error *err)
{
    if (n > SHX_WAIT_ANY_MAX)
        return shx_fail(err, SHX_E_SIZE, n, SHX_WAIT_ANY_MAX, NULL);
    for (size_t i = 0; i < n; i++) {
        if (!blocks[i]->attached)
            return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
        if (room != NULL && room[i] && blocks[i]->kind != SHX_KIND_QUEUE)
            return shx_fail(err, SHX_E_KIND, blocks[i]->kind, SHX_KIND_QUEUE, NULL);
        if (!versioned(blocks[i]))
            return shx_fail(err, SHX_E_KIND, blocks[i]->kind, SHX_KIND_VALUE, NULL);
    }
    uint32_t nudges[SHX_WAIT_ANY_MAX] = {0};
    for (size_t i = 0; i < n; i++) {
        atomic_fetch_add(&blocks[i]->watching, 1);
        nudges[i] = atomic_load(&blocks[i]->nudges);
    }
    int rc = timeout_ns > 0 && spin_any(blocks, room, seen, nudges, n, bell, rung, timeout_ns)
                 ? SHX_OK
                 : sleep_any(blocks, room, seen, nudges, n, bell, rung, timeout_ns < 0 ? 0 : timeout_ns);
    for (size_t i = 0; i < n; i++)
        atomic_fetch_sub(&blocks[i]->watching, 1);
    return rc;
}

int shx_value_wait_any(shx_block *const *blocks, const uint64_t *seen, size_t n, shx_os_bell *bell, uint32_t rung,
                       int64_t timeout_ns, shx_error *err)
{
    return shx_wait_any(blocks, NULL, seen, n, bell, rung, timeout_ns, err);
}

void shx_value_nudge_watchers(shx_block *b)
{
    if (b->attached && versioned(b) && atomic_load(&b->watching) > 0) {
        atomic_fetch_add(&b->nudges, 1);
        atomic_thread_fence(memory_order_seq_cst);
        uint32_t waiters = shx_value_waiters(b);
        (void)shx_os_wake_word(&b->map, &b->hdr->wake_seq, waiters > 0 ? waiters : 1);
        if (b->kind == SHX_KIND_QUEUE) { /* watchers of its room sleep on the room's word */
            shx_channel *c = &shx_queue_ctl_of(b)->room;
            uint32_t room_waiters = (uint32_t)atomic_load_explicit(&c->waiters, memory_order_relaxed);
            (void)shx_os_wake_word(&b->map, &c->seq, room_waiters > 0 ? room_waiters : 1);
        }
    }
}

/* ---- channels whose wakers take no lock (queue.h) ----------------------------- */

/* The waiter reads the word, then counts itself, then looks; the waker
 * changes the state, then reads the count, and moves the word before it
 * wakes.  Both sides are ordered by a full barrier, so either the waiter
 * sees the change or the waker sees the waiter, whose sleep on the word it
 * read first then ends.  A waiter that died counted is recounted as for
 * values, but without a lock: the epoch is moved by a compare-and-swap
 * before the word is, so a wait counted in the old epoch has read the old
 * word, and its sleep ends at the move. */

static void channel_uncount(shx_channel *c, uint32_t epoch)
{
    uint64_t w = atomic_load_explicit(&c->waiters, memory_order_relaxed);
    while ((uint32_t)(w >> 32) == epoch && (uint32_t)w != 0 &&
           !atomic_compare_exchange_weak_explicit(&c->waiters, &w, w - 1, memory_order_relaxed, memory_order_relaxed))
        ;
}

int shx_channel_wait(shx_block *b, shx_channel *c, int (*ready)(void *), void *ctx, int64_t timeout_ns)
{
    uint64_t start = shx_os_monotonic_ns();
    if (!ready(ctx) && shx_spin_until(b, ready, ctx, timeout_ns))
        return SHX_OK;
    uint32_t word = atomic_load_explicit(&c->seq, memory_order_acquire);
    uint32_t epoch = (uint32_t)(atomic_fetch_add_explicit(&c->waiters, 1, memory_order_seq_cst) >> 32);
    atomic_thread_fence(memory_order_seq_cst);
    int rc = SHX_OK;
    if (!ready(ctx)) {
        int64_t left = timeout_ns - (int64_t)(shx_os_monotonic_ns() - start);
        rc = SHX_E_TIMEOUT;
        if (left > 0) {
            (void)shx_os_wait_word(&b->map, &c->seq, word, left);
            rc = ready(ctx) ? SHX_OK : SHX_E_TIMEOUT;
        }
    }
    channel_uncount(c, epoch);
    return rc;
}

static void channel_recount(shx_block *b, shx_channel *c)
{
    uint64_t w = atomic_load_explicit(&c->waiters, memory_order_relaxed);
    uint64_t fresh = ((w >> 32) + 1) << 32;
    if (!atomic_compare_exchange_strong_explicit(&c->waiters, &w, fresh, memory_order_seq_cst, memory_order_relaxed))
        return; /* someone counted or uncounted meanwhile: a later wake recounts */
    atomic_fetch_add_explicit(&c->seq, 1, memory_order_seq_cst);
    (void)shx_os_wake_word(&b->map, &c->seq, (uint32_t)w > 0 ? (uint32_t)w : 1);
    atomic_store_explicit(&c->idle_wakes, 0, memory_order_relaxed);
}

void shx_channel_wake(shx_block *b, shx_channel *c)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t waiters = (uint32_t)atomic_load_explicit(&c->waiters, memory_order_relaxed);
    if (waiters == 0)
        return;
    atomic_fetch_add_explicit(&c->seq, 1, memory_order_seq_cst);
    /* Where a block has one wake-up for all its words, enough for every
     * sleeper of the block: those of other words look, and sleep again. */
    uint32_t wake = SHX_OS_ONE_WAKE_PER_BLOCK ? waiters + shx_value_waiters(b) : waiters;
    int woken = shx_os_wake_word(&b->map, &c->seq, wake);
    if (woken < 0)
        return;
    uint32_t idle = woken == 0 ? atomic_load_explicit(&c->idle_wakes, memory_order_relaxed) + 1 : 0;
    atomic_store_explicit(&c->idle_wakes, idle, memory_order_relaxed);
    if (idle >= IDLE_WAKES_BEFORE_RECOUNT)
        channel_recount(b, c);
}
