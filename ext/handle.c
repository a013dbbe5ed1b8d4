/* The handle guard's close (handle.h says how the guard works). */
#include "handle.h"

#include "platform.h"

/* CLOSING, stamped with this process (pids fit in 29 bits everywhere that
 * forks: Linux caps them at 2^22). */
static int closing_state(void) { return (int)(SHX_GUARD_CLOSING | ((shx_os_pid() & 0x1FFFFFFFu) << 2)); }

#if defined(_MSC_VER)
#define SHX_THREAD_LOCAL __declspec(thread)
#else
#define SHX_THREAD_LOCAL _Thread_local
#endif

unsigned shx_guard_stripe_of_this_thread(void)
{
    static _Atomic unsigned handed_out;
    static SHX_THREAD_LOCAL unsigned mine; /* the stripe + 1; 0 until first asked */
    if (mine == 0)
        mine = 1 + atomic_fetch_add_explicit(&handed_out, 1, memory_order_relaxed) % SHX_GUARD_STRIPES;
    return mine - 1;
}

#ifdef _WIN32
uintptr_t shx_guard_this_thread(void) { return 1; } /* no fork(): never asked to tell threads apart */
#else
uintptr_t shx_guard_this_thread(void)
{
    static _Thread_local char tag;
    return (uintptr_t)&tag;
}
#endif

int shx_guard_settle_inherited(shx_guard *g)
{
    int state = atomic_load(&g->state);
    if (!shx_guard_is_closing(state) || state == closing_state())
        return 0;
    atomic_store(&g->closer, 0);
    atomic_store(&g->deferred, 0);
    (void)atomic_compare_exchange_strong(&g->state, &state, SHX_GUARD_CLOSED);
    return 1;
}

int shx_guard_forget_other_threads(shx_guard *g, long own_inflight, long own_serialized)
{
    /* Only the sum counts: the forking thread's calls leave from its own stripe. */
    for (int i = 0; i < SHX_GUARD_STRIPES; i++)
        atomic_store(&g->inflight[i].count, i == 0 ? own_inflight : 0);
    atomic_store(&g->serialized, own_serialized);
    if (!shx_guard_is_closing(atomic_load(&g->state)))
        return 0;
    if (atomic_load(&g->closer) == shx_guard_this_thread()) {
        /* The forking thread's own close goes on: under this process's pid. */
        atomic_store(&g->state, closing_state());
        return 0;
    }
    atomic_store(&g->deferred, 0);
    atomic_store(&g->closer, 0);
    atomic_store(&g->state, SHX_GUARD_OPEN);
    return 1;
}

int shx_guard_close(shx_guard *g, long own, const shx_guard_waiter *waiter)
{
    for (;;) {
        int expected = SHX_GUARD_OPEN;
        if (atomic_compare_exchange_strong(&g->state, &expected, closing_state())) {
            atomic_store(&g->closer, shx_guard_this_thread());
            break;
        }
        /* A close() inside one of this thread's calls cannot wait for the
         * closer, which waits for that very call. */
        if (expected == SHX_GUARD_CLOSED || own > 0)
            return SHX_GUARD_DONE;
        while (shx_guard_is_closing(atomic_load(&g->state))) {
            if (!shx_guard_settle_inherited(g))
                waiter->pause(waiter->ctx);
        }
        /* CLOSED: done.  OPEN: the closer gave up; try again, to say why. */
    }
    /* Calls under way end soon: copies finish, waits end at their next slice. */
    while (shx_guard_inflight(g) > own)
        waiter->pause(waiter->ctx);
    if (own > 0) {
        atomic_store(&g->deferred, 1);
        return SHX_GUARD_DEFER;
    }
    return SHX_GUARD_WON;
}
