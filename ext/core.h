/* What the core's files share and nobody else uses: block.c (the life of a
 * block, its lock), copy.c (the copy loops), value.c (the value protocol)
 * and wait.c (waiting).  Pure C, like them; segment.h is the core's face. */
#ifndef SHMEMEXT_CORE_H
#define SHMEMEXT_CORE_H

#include "segment.h"

/* Copies into a block (or out of a segment into a caller's buffer) from this
 * size up bypass the cache.  A copy this large evicts itself anyway, and
 * ordinary stores would first read every destination line (for a set, a
 * value cell alternates between two slots: twice the value's size of
 * destination), which cost 1.4-1.8x more than streaming stores at 8-32 MiB
 * on a 32 MiB-L3 x86-64; at 4 MiB and less ordinary stores won. */
#define SHX_STREAM_COPY_MIN ((size_t)8 << 20)

/* Copies n bytes into a block, or out of a segment: past the cache from
 * stream_min bytes up, through it below; with the caller's blocking hooks
 * around a long copy; a source overlapping the destination moved as such. */
void shx_copy_bytes(void *dst, const void *src, size_t n, const shx_hooks *hooks, size_t stream_min);
/* Where a set() into a value slot starts streaming (derived from the cache). */
size_t shx_copy_stream_set_min(void);
/* Copies a value out of the block and tells whether the copy is well formed. */
int shx_copy_checked(unsigned char *dst, const unsigned char *src, size_t n, uint32_t type, const shx_hooks *hooks);

/* One shx_os_lock of the block's writer lock; a holder's death it reports
 * is also kept in the block until shx_block_take_owner_died. */
int shx_block_lock_now(shx_block *b, int64_t timeout_ns, int *owner_died, shx_error *err);

/* After a set()'s wake: woken is how many it woke, or -1 where the OS does
 * not say.  Recounts the waiters when wakes keep finding nobody asleep. */
void shx_wait_after_wake(shx_block *b, int woken);

#endif
