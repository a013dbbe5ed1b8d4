/* The handle guard: how the calls that use a block's mapping and the one
 * close() that unmaps it keep out of each other's way, from any number of
 * threads, with or without a GIL.  Pure C, like the core.
 *
 * A call enters (the in-flight count goes up, then the state is read again),
 * uses the mapping, and leaves.  Both steps are sequentially consistent, so a
 * closer that moved the state away from OPEN and then saw the count drained
 * cannot miss a call: that call either counted itself before the closer
 * looked, or reads CLOSING after and backs out without touching anything.
 *
 * close() moves OPEN -> CLOSING by compare-and-swap, so exactly one thread
 * closes; a second closer waits for it to end, never detaches twice.  The
 * winner waits until only its own thread's calls are in flight (a close()
 * from a signal handler or a finalizer that runs inside one of them), then
 * detaches and sets CLOSED, or gives up and sets OPEN again (something
 * still uses the block).  When calls of its own thread are in flight it
 * cannot wait for them (they resume only after it returns), so it marks the
 * close deferred and the outermost of those calls detaches as it leaves.
 *
 * Calls made under a lock that every closer of the guard also holds while it
 * looks (a Python object's calls and close(), under its interpreter's GIL)
 * count themselves in `serialized` instead: that lock already orders them
 * against the closer, so they need no bus-locked instruction, which cost a
 * small set() a fifth of its time.  A call that lets the lock go mid-way
 * (a long copy, a wait) stays counted; the closer sees it when it next holds
 * the lock.
 *
 * Calls counted atomically (free-threaded CPython, the C API) count in one
 * of SHX_GUARD_STRIPES counters, each on a cache line of its own, chosen by
 * the calling thread: threads calling one handle at once then share no
 * written line (one shared count cut 2 threads' calls on one Value to a
 * third).  Only the sum means anything, and it is exact as above: a call in
 * flight stays counted in its stripe while the closer adds them up, and one
 * that leaves on another stripe than it entered (a fork child's) still nets
 * to zero.
 *
 * Buffer exports (views) and C API pins (acquire) are counted here too: they
 * are taken only inside a call, so once the count has drained the closer
 * reads final numbers.
 *
 * A fork() child has only the forking thread: a close() that another thread
 * had begun never ends there.  So CLOSING carries the closer's process id in
 * the same word (one compare-and-swap sets both), and the closer names its
 * thread: the child settles what it inherited (shx_guard_settle_inherited,
 * and shx_guard_forget_other_threads for blocks still attached there).
 */
#ifndef SHMEMEXT_HANDLE_H
#define SHMEMEXT_HANDLE_H

#include <stdatomic.h>
#include <stdint.h>

/* The state word: OPEN, CLOSED, or CLOSING | pid << 2 (shx_guard_is_closing). */
enum { SHX_GUARD_OPEN = 0, SHX_GUARD_CLOSING = 1, SHX_GUARD_CLOSED = 2 };

static inline int shx_guard_is_closing(int state) { return (state & 3) == SHX_GUARD_CLOSING; }

#define SHX_GUARD_STRIPES 8
#define SHX_GUARD_LINE    128 /* two 64-byte lines: x86 prefetchers fetch lines in pairs */
typedef struct shx_guard_stripe {
    _Atomic long count;
    unsigned char pad[SHX_GUARD_LINE - sizeof(_Atomic long)];
} shx_guard_stripe;

/* This thread's stripe (given out in turn as threads first ask). */
unsigned shx_guard_stripe_of_this_thread(void);

typedef struct shx_guard {
    _Atomic int state;                            /* SHX_GUARD_*, CLOSING with the closer's pid */
    _Atomic uintptr_t closer;                     /* the closing thread (shx_guard_this_thread), 0 when none */
    _Atomic int deferred;                         /* the closer left the detach to its thread's outermost call */
    _Atomic long serialized;                      /* calls between enter_serialized and leave_serialized */
    _Atomic long views;                           /* buffers exported and not yet released */
    _Atomic long pins;                            /* C API acquire()s not yet released */
    shx_guard_stripe inflight[SHX_GUARD_STRIPES]; /* calls between enter and leave, by thread */
} shx_guard;

/* A guard of a handle that is attached (or about to be). */
static inline void shx_guard_init(shx_guard *g)
{
    atomic_store(&g->state, SHX_GUARD_OPEN);
    atomic_store(&g->closer, 0);
    atomic_store(&g->deferred, 0);
    for (int i = 0; i < SHX_GUARD_STRIPES; i++)
        atomic_store(&g->inflight[i].count, 0);
    atomic_store(&g->serialized, 0);
    atomic_store(&g->views, 0);
    atomic_store(&g->pins, 0);
}

/* 1: entered, the mapping may be used until shx_guard_leave.  0: closing or
 * closed; nothing was entered and nothing must be left. */
static inline int shx_guard_enter(shx_guard *g)
{
    _Atomic long *count = &g->inflight[shx_guard_stripe_of_this_thread()].count;
    atomic_fetch_add(count, 1);
    if (atomic_load(&g->state) == SHX_GUARD_OPEN)
        return 1;
    atomic_fetch_sub(count, 1);
    return 0;
}

static inline void shx_guard_leave(shx_guard *g)
{
    atomic_fetch_sub(&g->inflight[shx_guard_stripe_of_this_thread()].count, 1);
}

/* shx_guard_enter and _leave for a caller that holds the closers' lock
 * throughout both.  Relaxed loads and stores: the lock orders them, and
 * only holders of it write the count. */
static inline void shx_guard_count_serialized(shx_guard *g, long delta)
{
    atomic_store_explicit(&g->serialized, atomic_load_explicit(&g->serialized, memory_order_relaxed) + delta,
                          memory_order_relaxed);
}

static inline int shx_guard_enter_serialized(shx_guard *g)
{
    shx_guard_count_serialized(g, 1);
    if (atomic_load_explicit(&g->state, memory_order_relaxed) == SHX_GUARD_OPEN)
        return 1;
    shx_guard_count_serialized(g, -1);
    return 0;
}

static inline void shx_guard_leave_serialized(shx_guard *g) { shx_guard_count_serialized(g, -1); }

/* Every call in flight.  Exact for a caller that holds the closers' lock. */
static inline long shx_guard_inflight(shx_guard *g)
{
    long n = atomic_load_explicit(&g->serialized, memory_order_relaxed);
    for (int i = 0; i < SHX_GUARD_STRIPES; i++)
        n += atomic_load(&g->inflight[i].count);
    return n;
}

/* Whether a close() has begun: waits inside a call end at their next slice. */
static inline int shx_guard_closing(shx_guard *g) { return atomic_load(&g->state) != SHX_GUARD_OPEN; }

static inline int shx_guard_closed(shx_guard *g) { return atomic_load(&g->state) == SHX_GUARD_CLOSED; }

/* How shx_guard_close waits: pause() once, briefly (the caller lets other
 * threads run meanwhile: it may hold an interpreter lock they need). */
typedef struct shx_guard_waiter {
    void (*pause)(void *ctx);
    void *ctx;
} shx_guard_waiter;

enum {
    SHX_GUARD_WON,   /* drained: detach, then shx_guard_close_end */
    SHX_GUARD_DEFER, /* drained but for `own` calls: finish in the outermost's leave */
    SHX_GUARD_DONE   /* closed already, or by another closer meanwhile, or left to one of own's */
};

/* Begins a close.  `own` is how many of the in-flight calls belong to the
 * calling thread, which holds the lock of the serialized callers, if there
 * are any, whenever it looks (waiter->pause may let it go).  A loser with no
 * calls of its own waits for the winner; if the winner gave up, it tries to
 * close again itself. */
int shx_guard_close(shx_guard *g, long own, const shx_guard_waiter *waiter);

/* Ends a close begun with SHX_GUARD_WON or _DEFER: CLOSED when detached,
 * else OPEN again. */
static inline void shx_guard_close_end(shx_guard *g, int detached)
{
    atomic_store(&g->deferred, 0);
    atomic_store(&g->closer, 0);
    atomic_store(&g->state, detached ? SHX_GUARD_CLOSED : SHX_GUARD_OPEN);
}

/* Something that tells the calling thread from every other thread of the
 * process, and stays the forking thread's in a fork() child. */
uintptr_t shx_guard_this_thread(void);

/* In a fork() child, for a handle whose block is still attached here: the
 * calls other threads had in flight never leave, and a close() one of them
 * had begun never ends.  Forgets them: the counts become the forking
 * thread's own calls (`own_inflight` counted atomically, `own_serialized`
 * serialized: it may be inside calls, running a signal handler), and such a
 * close is undone (the block stays attached here): returns 1 then.  A close
 * the forking thread itself had begun goes on. */
int shx_guard_forget_other_threads(shx_guard *g, long own_inflight, long own_serialized);

/* A close() that the process this one was forked from had begun, found
 * CLOSING here: its closer never comes, and shx_guard_forget_other_threads
 * has undone it for every block still attached, so it had detached: CLOSED.
 * Returns 1 when it settled something (the caller looks at the state again).
 * A system call: for slow paths only. */
int shx_guard_settle_inherited(shx_guard *g);

#endif
