/* The block core's interface: header layout, attach policy, the value
 * protocol, the copy loops and waiting, each a file of its own (core.h lists
 * them).  Pure C (no Python.h); the OS is reached only through platform.h.
 *
 * A block is a header page followed by data.  A value cell keeps two slots of
 * `capacity` bytes: a writer fills the slot that is not committed, then
 * publishes it, so a reader always finds one whole committed value.  A raw
 * segment is `capacity` bytes of plain shared memory.
 */
#ifndef SHMEMEXT_SEGMENT_H
#define SHMEMEXT_SEGMENT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "handle.h"
#include "platform.h"

#define SHX_LAYOUT           2
#define SHX_HEADER_SIZE      4096
#define SHX_NAME_MAX         200
#define SHX_DEFAULT_CAPACITY 4096
/* Largest capacity: far beyond any memory, yet doubled plus the header it fits any size_t. */
#define SHX_MAX_CAPACITY                                                                                               \
    ((uint64_t)(SIZE_MAX / 4) < (UINT64_C(1) << 44) ? (uint64_t)(SIZE_MAX / 4) : (UINT64_C(1) << 44))

enum shx_kind { SHX_KIND_VALUE = 1, SHX_KIND_SEGMENT = 2, SHX_KIND_QUEUE = 3 };

/* What a value slot holds.  Text is stored as PEP 393 code units; the type
 * names their width and whether 1-byte text is pure ASCII. */
enum shx_type {
    SHX_TYPE_EMPTY = 0, /* never written: reads as "" */
    SHX_TYPE_BYTES = 1,
    SHX_TYPE_ASCII = 2,  /* 1-byte units, all < 0x80 */
    SHX_TYPE_LATIN1 = 3, /* 1-byte units, at least one >= 0x80 */
    SHX_TYPE_UCS2 = 4,   /* 2-byte units, at least one > 0xFF */
    SHX_TYPE_UCS4 = 5,   /* 4-byte units, at least one > 0xFFFF, all <= 0x10FFFF */
    /* Queue messages only: a pickle, whole, or framed with its out-of-band
     * buffers (the glue's format; the core carries both as bytes). */
    SHX_TYPE_PICKLE = 6,
    SHX_TYPE_PICKLE_FRAMED = 7
};

#define SHX_FLAG_PERSIST 1u

/* Open flags. */
#define SHX_PERSIST       1u /* keep the block after the last detach */
#define SHX_PRIVATE_OWNER 2u /* refuse a block another user owns */
#define SHX_GLOBAL        4u /* Windows: name the block in Global\ (every session); POSIX names always are */
#define SHX_EXISTING      8u /* open only a live block: SHX_E_NOTFOUND rather than create one */

typedef struct shx_slot {
    _Atomic uint64_t seq; /* odd while a writer fills the slot */
    uint64_t version;     /* the version this slot's value was committed as */
    uint64_t nbytes;
    uint32_t type; /* enum shx_type */
    uint32_t reserved;
    unsigned char pad[32];
} shx_slot;

/* The shared header.  Identity fields are written once, before the magic. */
typedef struct shx_header {
    char magic[8];        /* "SHMEMEXT", written last at creation */
    uint32_t layout;      /* SHX_LAYOUT */
    uint32_t header_size; /* SHX_HEADER_SIZE */
    uint64_t capacity;    /* value: bytes per slot; segment: bytes; queue: bytes of ring */
    uint64_t total_size;  /* header + data, as created */
    uint32_t kind;        /* enum shx_kind */
    uint32_t creator_pid;
    _Atomic uint32_t flags; /* SHX_FLAG_* */
    uint32_t reserved0;
    uint64_t token; /* 48: the backend's (SHX_TOKEN_OFFSET); the core never writes it */
    unsigned char pad0[8];
    unsigned char lock_area[SHX_LOCK_AREA]; /* 64: the writer lock */
    _Atomic uint64_t version;               /* 192: committed sets; slot = version & 1 */
    _Atomic uint32_t wake_seq;              /* 200: bumped by every set; waiters sleep on it */
    /* 204: a holder died holding the writer lock, and no acquirer that acts
     * on that has been told yet (shx_block_take_owner_died). */
    _Atomic uint32_t owner_died;
    /* 208: waits counted now (low 32 bits) and the count's epoch (high 32):
     * a recount starts a new epoch at zero, and a wait counted in an older
     * one no longer uncounts itself. */
    _Atomic uint64_t waiters;
    _Atomic uint32_t idle_wakes; /* 216: wakes in a row that found nobody asleep */
    unsigned char pad1[36];
    shx_slot slot[2]; /* 256, 320 */
} shx_header;

/* A process-local handle.  Sizes are copied out of the header once, after
 * validation: the shared copy may be rewritten by anyone and is not trusted. */
typedef struct shx_block {
    shx_os_map map;
    shx_header *hdr;
    unsigned char *data; /* segment data, or slot 0 of a value */
    uint64_t capacity;
    size_t slot_stride; /* offset of slot 1's data from slot 0's */
    uint32_t kind;
    int created;
    int attached;
    int heap_owned; /* allocated by the C API's open(), freed by its close() */
    /* The Python object this handle lives in (NULL for the C API's own), so
     * that the C API can keep it alive while a consumer holds the handle. */
    void *owner;
    char name[SHX_NAME_MAX + 1];
    /* How often this handle's gets had to copy again because a writer
     * overtook them, and how often they fell back to the lock.  Counted on the
     * slow paths only, so a plain get costs nothing more; approximate when
     * threads share the handle. */
    _Atomic uint64_t read_retries;
    _Atomic uint64_t locked_reads;
    /* Whether this handle's waits skip their spin, the CPUs being
     * oversubscribed, and a count of the waits since, for the occasional
     * probe (shx_value_wait). */
    _Atomic int spin_off;
    _Atomic uint32_t spin_probe;
    /* How much longer than SHX_WAIT_SPIN_NS this handle's waits spin: a
     * queue sets it from the size of its records, because the other side's
     * copy of a large record is what a wait for it waits out. */
    _Atomic uint64_t spin_extra_ns;
    /* Threads of this process inside shx_value_wait_any on this handle, and
     * a count of shx_value_nudge_watchers calls, which a polling wait sees. */
    _Atomic int watching;
    _Atomic uint32_t nudges;
    /* Threads that share the handle enter and leave this around each use of
     * the mapping (handle.h); the core itself does not: its callers do.
     * Last: its per-thread counts take a kilobyte. */
    shx_guard guard;
} shx_block;

/* Called around work that may take long (lock waits, large copies), so a
 * caller can let other threads run; may be NULL. */
typedef struct shx_hooks {
    void (*blocking_begin)(void *ctx);
    void (*blocking_end)(void *ctx);
    void *ctx;
    size_t large_copy; /* copies of at least this many bytes count as long */
    /* When set, lock waits run in slices of SHX_WAIT_SLICE_NS and ask it in
     * between (outside blocking_begin/end); nonzero gives up the wait with
     * SHX_E_INTERRUPTED.  How a caller lets Ctrl-C through, or bounds a wait. */
    int (*interrupted)(void *ctx);
} shx_hooks;

/* How long shx_value_wait watches the version before it sleeps. */
#ifndef SHX_WAIT_SPIN_NS
#define SHX_WAIT_SPIN_NS 50000
#endif

#ifndef SHX_WAIT_SLICE_NS
#define SHX_WAIT_SLICE_NS 50000000
#endif

/* Destination for shx_value_get: returns where `nbytes` of `type` go, or NULL
 * with an error already recorded by the caller (then get fails, unless the
 * size was torn by a writer: then it is called again, and drops that error).
 * May be called again on retry, with the previous destination to reuse or drop. */
typedef void *(*shx_prepare_dst_fn)(void *ctx, uint32_t type, size_t nbytes);

/* Checks a block name: 1..SHX_NAME_MAX characters of [A-Za-z0-9_.-], not
 * starting with '.' or '-'. */
int shx_name_check(const char *name, size_t len, shx_error *err);

/* Attaches `b` (zero-initialized, or closed) to the block `name` of `kind`, creating it with `capacity` bytes
 * (0 means SHX_DEFAULT_CAPACITY) if nobody holds it.  An existing block keeps
 * its own capacity; asking for more than it has is SHX_E_CAPACITY. */
int shx_block_open(shx_block *b, const char *name, uint32_t kind, uint64_t capacity, unsigned flags, unsigned mode,
                   shx_error *err);
/* The same, with a Windows SDDL security descriptor for a new block (NULL:
 * the default, from mode). */
int shx_block_open_secured(shx_block *b, const char *name, uint32_t kind, uint64_t capacity, unsigned flags,
                           unsigned mode, const char *security, shx_error *err);
/* The same, where waits for other processes (the attach gate) may be long:
 * hooks->blocking_begin/end go around the whole open, and the wait asks
 * hooks->interrupted (outside them) now and then (NULL hooks: as above). */
int shx_block_open_hooked(shx_block *b, const char *name, uint32_t kind, uint64_t capacity, unsigned flags,
                          unsigned mode, const char *security, const shx_hooks *hooks, shx_error *err);
/* Detaches; idempotent.  at_exit leaves the mapping in place. */
int shx_block_close(shx_block *b, int at_exit, shx_error *err);
/* The same, with hooks as for shx_block_open_hooked: a wait for another
 * process's gate it gives up (SHX_E_INTERRUPTED) leaves the block attached. */
int shx_block_close_hooked(shx_block *b, const shx_hooks *hooks, shx_error *err);
/* Detaches every block this process still holds; for process exit. */
void shx_detach_all_at_exit(void);
/* How many calls the calling thread has in flight on the handle that `owner`
 * (shx_block.owner) owns, counted atomically and serialized (handle.h).  A
 * caller whose calls run code that may fork() (a signal handler) sets it, so
 * that the child's counts keep the forking thread's calls. */
typedef void (*shx_own_calls_fn)(const void *owner, long *inflight, long *serialized);
void shx_core_set_own_calls(shx_own_calls_fn fn);
int shx_unlink(const char *name, shx_error *err);
int shx_block_is_persistent(const shx_block *b);
/* How many attachments the block has (this one included), or -1 where the OS cannot tell. */
int shx_block_holders(shx_block *b, int64_t *count, shx_error *err);

/* One block of this user's as shx_list / shx_sweep see it: what the OS
 * knows, and the kind and capacity its header gives (0 when unreadable). */
typedef struct shx_block_info {
    shx_os_info os;
    uint32_t kind;
    uint64_t capacity;
} shx_block_info;
typedef void (*shx_block_info_fn)(void *ctx, const shx_block_info *info);
/* Lists this user's blocks, changing nothing. */
int shx_list(shx_block_info_fn fn, void *ctx, shx_error *err);
/* Removes what dead blocks left (see shx_os_sweep); fn is told of each. */
int shx_sweep(shx_block_info_fn fn, void *ctx, shx_error *err);

/* Number of committed sets. */
static inline uint64_t shx_value_version(const shx_block *b)
{
    return atomic_load_explicit(&b->hdr->version, memory_order_acquire);
}

/* Waits the block counts now, in every process (a diagnostic). */
static inline uint32_t shx_value_waiters(const shx_block *b)
{
    return (uint32_t)atomic_load_explicit(&b->hdr->waiters, memory_order_relaxed);
}

/* Starts the count of waits afresh, as set() does when its wakes keep finding
 * nobody asleep (a waiter died counted): every sleeper is woken and counts
 * itself again.  Returns 0 when the writer lock was busy and nothing was done. */
int shx_value_recount_waiters(shx_block *b);

/* Commits `nbytes` of `type` as the new value. */
int shx_value_set(shx_block *b, uint32_t type, const void *data, size_t nbytes, const shx_hooks *hooks, shx_error *err);
/* The same only while the committed version is `expect` (checked under the
 * writer lock, so that no set() slips between): *written is the version
 * this commits; SHX_E_MOVED (a: the version found), nothing written, when
 * another set() came first.  For a bridge that must not overwrite a local
 * value it has not yet passed on. */
#define SHX_ANY_VERSION UINT64_MAX
int shx_value_set_if(shx_block *b, uint32_t type, const void *data, size_t nbytes, uint64_t expect, uint64_t *written,
                     const shx_hooks *hooks, shx_error *err);
/* Copies one committed value into prepare()'s destination.  *type_out and
 * *nbytes_out describe it; *version_out (may be NULL) is its version.  A value
 * that is not well formed (shx_value_check) is SHX_E_BADVALUE: whatever another
 * process wrote, text copied out is always a str CPython could have built. */
int shx_value_get(shx_block *b, shx_prepare_dst_fn prepare, void *ctx, const shx_hooks *hooks, uint32_t *type_out,
                  size_t *nbytes_out, uint64_t *version_out, shx_error *err);
/* Text as UTF-8, for callers without Python (text.c).  set stores strict
 * UTF-8 as the narrowest PEP 393 width; get copies bytes as they are and text
 * as UTF-8 into buf, or fails with SHX_E_BUFFER and *len = the length needed. */
int shx_value_set_utf8(shx_block *b, const char *text, size_t len, const shx_hooks *hooks, shx_error *err);
int shx_value_get_utf8(shx_block *b, void *buf, size_t cap, size_t *len, int *is_text, uint64_t *version,
                       const shx_hooks *hooks, shx_error *err);

/* Whether `nbytes` of `type` are well formed (a str CPython would build). */
int shx_value_check(uint32_t type, const void *data, size_t nbytes, shx_error *err);

/* Waits until the committed version differs from `seen`, at most timeout_ns
 * (< 0: forever), sleeping in the kernel.  *now is the version then.
 * SHX_E_TIMEOUT when the time ran out.  Wakes early on signals: callers that
 * handle signals call it in slices.  It holds the writer lock for a moment to
 * count itself a waiter, so it waits out a holder of that lock (within the
 * timeout), and fails as shx_os_lock does for a thread that holds it or a
 * lock that was overwritten. */
int shx_value_wait(shx_block *b, uint64_t seen, int64_t timeout_ns, uint64_t *now, shx_error *err);
/* The same without the spin first: for callers that spun on something of
 * their own (shx_spin_until). */
int shx_value_sleep(shx_block *b, uint64_t seen, int64_t timeout_ns, uint64_t *now, shx_error *err);
/* Spins (when this handle spins at all: 2+ CPUs, not oversubscribed) until
 * ready(ctx), for at most the handle's spin and timeout_ns (>= 0; 0: no
 * spin).  1 if ready() said so. */
int shx_spin_until(shx_block *b, int (*ready)(void *), void *ctx, int64_t timeout_ns);

/* At most this many blocks per shx_value_wait_any. */
#define SHX_WAIT_ANY_MAX (SHX_OS_WAIT_ANY_MAX > 0 ? SHX_OS_WAIT_ANY_MAX : 127)
/* Waits until the version of some blocks[i] differs from seen[i] or the
 * bell rings after `rung` (shx_os_bell_rings, read before the caller chose
 * what to wait for), at most timeout_ns (>= 0): one thread watching many
 * values.  SHX_OK: something may have changed, the caller looks;
 * SHX_E_TIMEOUT.  Sleeps in the kernel where it can wait on many words at
 * once, and elsewhere looks every millisecond.  No spin. */
int shx_value_wait_any(shx_block *const *blocks, const uint64_t *seen, size_t n, shx_os_bell *bell, uint32_t rung,
                       int64_t timeout_ns, shx_error *err);
/* The same where room[i] (room may be NULL) asks instead for room in the
 * queue blocks[i]: until its head (bytes ever taken) differs from seen[i]. */
int shx_wait_any(shx_block *const *blocks, const unsigned char *room, const uint64_t *seen, size_t n, shx_os_bell *bell,
                 uint32_t rung, int64_t timeout_ns, shx_error *err);

/* Wakes this process's shx_value_wait_any sleepers on b early, so that a
 * close() waiting for them need not wait out their timeout; other waiters
 * of the block wake once for nothing and sleep again.  Nothing when none
 * of this handle's watchers sleeps. */
void shx_value_nudge_watchers(shx_block *b);

/* Takes / releases the block's writer lock; *owner_died as for shx_os_lock.
 * A death is also kept in the block until shx_block_take_owner_died. */
int shx_block_lock(shx_block *b, int64_t timeout_ns, int *owner_died, const shx_hooks *hooks, shx_error *err);
/* Under the writer lock, by the acquirer that reports to its caller: whether
 * a holder died holding the lock since the last one was told.  Tells once. */
int shx_block_take_owner_died(shx_block *b);
int shx_block_unlock(shx_block *b, shx_error *err);

/* A raw segment's bytes: b->data, b->capacity of them.  Copies in and out
 * of it, bounds-checked (SHX_E_RANGE). */
int shx_segment_read(shx_block *b, uint64_t offset, void *dst, size_t n, const shx_hooks *hooks, shx_error *err);
int shx_segment_write(shx_block *b, uint64_t offset, const void *src, size_t n, const shx_hooks *hooks, shx_error *err);

/* A human-readable message for err (without the block name). */
void shx_strerror(const shx_error *err, char *buf, size_t size);

#endif
