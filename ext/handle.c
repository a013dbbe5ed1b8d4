/* The handle guard's close (handle.h says how the guard works). */
#include "handle.h"

int shx_guard_close(shx_guard *g, long own, const shx_guard_waiter *waiter)
{
    for (;;) {
        int expected = SHX_GUARD_OPEN;
        if (atomic_compare_exchange_strong(&g->state, &expected, SHX_GUARD_CLOSING))
            break;
        /* A close() inside one of this thread's calls cannot wait for the
         * closer, which waits for that very call. */
        if (expected == SHX_GUARD_CLOSED || own > 0)
            return SHX_GUARD_DONE;
        while (atomic_load(&g->state) == SHX_GUARD_CLOSING)
            waiter->pause(waiter->ctx);
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
