/* The operating-system services the block core needs, and nothing more.
 *
 * Plain C, no Python.h: every call here may run without the GIL and is
 * driven directly by tests/c/test_core.c.  One file per mechanism, chosen by
 * setup.py: platform_posix.c (what every POSIX system shares) with either
 * platform_sysv.c (Linux: System V memory the kernel frees with its last
 * attachment) or platform_lockfiles.c (macOS, the BSDs); platform_win32.c.
 */
#ifndef SHMEMEXT_PLATFORM_H
#define SHMEMEXT_PLATFORM_H

#include <stddef.h>
#include <stdint.h>

/* Where the kernel offers no open-file-description locks on shared-memory
 * objects and no robust mutexes (macOS, the BSDs), liveness, the attach gate
 * and the writer lock are flock()s on small lock files beside the object, and
 * names are cut to fit PSHMNAMLEN.  Linux builds can be forced onto that path
 * (-DSHX_FORCE_LOCK_FILES) so that it is tested where it is developed. */
#if !defined(_WIN32) && (defined(SHX_FORCE_LOCK_FILES) || !defined(__linux__))
#define SHX_LOCK_FILES 1
#else
#define SHX_LOCK_FILES 0
#endif
#ifndef _WIN32
#include <pthread.h>
#endif
/* Linux: the memory is a System V segment marked for removal at creation, so
 * the kernel frees it when its last attachment goes, however that process
 * ends; a small entry in /dev/shm names it. */
#if !defined(_WIN32) && !SHX_LOCK_FILES
#define SHX_SYSV 1
#else
#define SHX_SYSV 0
#endif

/* Which backend this build uses, for diagnostics and tests. */
#if defined(_WIN32)
#define SHX_BACKEND "win32"
#elif SHX_LOCK_FILES
#define SHX_BACKEND "posix-lockfiles"
#else
#define SHX_BACKEND "linux-sysv"
#endif

/* Where the System V backend keeps, inside the block's header, the random
 * token that its name entry repeats: an entry whose segment id was recycled
 * is told from a live one by it.  The core leaves these 8 bytes alone. */
#define SHX_TOKEN_OFFSET 48
/* What a backend may read of a header it does not attach (to list blocks, or
 * to tell a dead holder's leftover from a block meant to persist): the magic
 * at offset 0 and the persist bit of the flags word. */
#define SHX_MAGIC        "SHMEMEXT"
#define SHX_FLAGS_OFFSET 40
#define SHX_PERSIST_BIT  1u
#define SHX_PEEK_BYTES   512

/* Outcome of a core or platform call.  SHX_OK is zero; everything else is
 * an error whose details are in a shx_error. */
typedef enum shx_status {
    SHX_OK = 0,
    SHX_E_OS,          /* a system call failed: os_error, op */
    SHX_E_NAME,        /* invalid block name: detail */
    SHX_E_SIZE,        /* invalid size: a = asked, b = limit */
    SHX_E_FOREIGN,     /* the name holds something that is not a shmemext block */
    SHX_E_NEWER,       /* block layout a is newer than ours (b) */
    SHX_E_CORRUPT,     /* header fields are inconsistent: detail */
    SHX_E_KIND,        /* block is of kind a, kind b was asked for */
    SHX_E_CAPACITY,    /* asked for capacity a, the existing block has b */
    SHX_E_TOOBIG,      /* value of a bytes, capacity b */
    SHX_E_TIMEOUT,     /* a lock wait timed out */
    SHX_E_NOTOWNER,    /* a private block owned by another user (a = owner) */
    SHX_E_BADVALUE,    /* the committed value is not well formed: detail */
    SHX_E_CLOSED,      /* the block was already detached */
    SHX_E_INUSE,       /* the handle is still attached to a block */
    SHX_E_RANGE,       /* offset + length a is beyond the size b */
    SHX_E_BUFFER,      /* the caller's buffer (b bytes) is smaller than the value (a bytes) */
    SHX_E_ENCODING,    /* text that UTF-8 cannot carry: detail */
    SHX_E_INTERRUPTED, /* a wait was given up because the caller's interrupted() hook said so */
    SHX_E_PERSIST,     /* persist asked of a block that exists without it, where the OS cannot change that */
    SHX_E_BUSY,        /* close refused: a consumer still holds the handle (a = C API pins) */
    SHX_E_NOTFOUND,    /* SHX_OPEN_EXISTING, and no live block has the name */
    SHX_E_EMPTY,       /* a queue had no message in time */
    SHX_E_FULL,        /* a queue had no room for a record of a bytes in time (b: its capacity) */
    SHX_E_MOVED        /* a conditional call found a = the version or queue position it did not expect (b = expected) */
} shx_status;

typedef struct shx_error {
    int status;         /* a shx_status */
    int os_error;       /* errno, or GetLastError() on Windows */
    const char *op;     /* the failing system call, for SHX_E_OS */
    const char *detail; /* a static phrase for NAME/CORRUPT/BADVALUE */
    int win32;          /* os_error is a GetLastError() code, not an errno */
    uint64_t a, b;      /* numbers the message needs */
} shx_error;

/* Records an error and returns its status, so callers can `return shx_fail(...)`. */
int shx_fail(shx_error *err, int status, uint64_t a, uint64_t b, const char *detail);
/* Records the current errno / GetLastError() for the system call `op`. */
int shx_fail_os(shx_error *err, const char *op);

/* A process-local attachment to a named shared object. */
typedef struct shx_os_map {
    void *base;  /* the whole object, header included */
    size_t size; /* bytes mapped */
#ifdef _WIN32
    void *mapping; /* file-mapping HANDLE */
    void *mutex;   /* writer-lock mutex HANDLE */
    void *wake;    /* wake-up semaphore HANDLE: set() releases one token per waiter */
#else
    struct shx_os_map *next_attached; /* process registry, for fork() and exit */
    /* A writer lock the kernel keeps on a descriptor (flock() or an OFD byte
     * lock), where the block's lock is not a robust mutex in shared memory. */
    int kernel_lock;              /* the writer lock is the kernel's (below), not a robust mutex in the header */
    int writer_fd;                /* the descriptor it is taken on (-1 in a fork child that could not get its own) */
    int writer_fork_fd;           /* during fork(): the writer-lock descriptor the child will own */
    pthread_mutex_t local_writer; /* excludes this process's threads; the file lock, other processes */
    struct shx_os_map *next_held; /* the holding thread's other writer locks, released if it ends */
#if SHX_SYSV
    int shmid;                    /* the System V segment; -1 once detached */
    uint64_t token;               /* the random token of its name entry and header */
#else
    int fd;              /* holds the liveness lock; -1 once detached */
    int object_fd;       /* the shared-memory object while attaching */
    int fork_fd;         /* during fork(): the descriptor the child will own */
    int keep_name;       /* never unlink: set when a fork child could not get its own lock */
    uint64_t dev, ino;   /* identity of the liveness file, to reopen it after fork() */
    int gate_fd;         /* the attach/detach gate file while it is held */
    unsigned mode;       /* permissions for lock files made anew */
    uint32_t lock_owner; /* whose lock directory holds the block's lock files */
#endif
#endif
    char os_name[256]; /* the name as the OS sees it */
} shx_os_map;

/* What attach found, passed to the prepare callback while no other process
 * can attach or detach the same name. */
enum shx_attach_state {
    SHX_ATTACH_FRESH, /* new zero-filled object of the requested size: initialize it */
    SHX_ATTACH_ALONE, /* an existing object nobody else holds: reuse, or return SHX_REINIT */
    SHX_ATTACH_SHARED /* other processes hold it: validate only */
};
#define SHX_REINIT (-1)

typedef int (*shx_prepare_fn)(void *ctx, shx_os_map *m, int state, shx_error *err);

/* Lets a wait inside the OS layer that another process can make long (for
 * the attach gate) give way: asked about every SHX_OS_POLL_NS while it waits;
 * nonzero gives the wait up with SHX_E_INTERRUPTED.  NULL: wait in the kernel. */
typedef struct shx_os_interrupt {
    int (*interrupted)(void *ctx);
    void *ctx;
} shx_os_interrupt;
#define SHX_OS_POLL_NS 50000000
typedef int (*shx_keep_name_fn)(const shx_os_map *m);

#define SHX_OPEN_REQUIRE_OWNER 1u /* refuse an object another user owns */
#define SHX_OPEN_GLOBAL        2u /* Windows: the Global\ namespace, seen by every session */
#define SHX_OPEN_PERSIST       4u /* a new object outlives its last holder (until unlink) */
#define SHX_OPEN_EXISTING      8u /* never create: SHX_E_NOTFOUND where a new object would be made */

/* Whether an object made without SHX_OPEN_PERSIST can be made persistent by a
 * later attach.  Not where the kernel frees it by itself (System V memory
 * marked for removal cannot be unmarked). */
#define SHX_OS_PERSIST_LATER (!SHX_SYSV)

/* Attaches to (creating if absent) the object `name`.  `size` is used when
 * creating.  `security`, when not NULL, is a Windows SDDL security descriptor
 * for new objects (in place of the per-user default); POSIX backends refuse
 * it (SHX_E_OS, EINVAL).  On success the whole object is mapped and *created
 * says whether this call (re)initialized it. */
int shx_os_attach(shx_os_map *m, const char *name, size_t size, unsigned mode, unsigned flags, const char *security,
                  shx_prepare_fn prepare, void *ctx, const shx_os_interrupt *intr, int *created, shx_error *err);
/* Detaches; the last process to detach removes the name unless keep_name() says not to.
 * With at_exit set the mapping is left in place (threads may still run).
 * intr as for attach; a detach it gives up (SHX_E_INTERRUPTED) changed nothing. */
int shx_os_detach(shx_os_map *m, shx_keep_name_fn keep_name, int at_exit, const shx_os_interrupt *intr, shx_error *err);
/* Writes the name the OS sees for block `name` (NUL-terminated) into out:
 * "/name" for POSIX shm_open, cut to a stable short form where names are
 * short (a prefix, '~' and a hash: '~' is never in a block name, so a short
 * form never equals a name given in full), "Local\\name" or "Global\\name"
 * on Windows. */
int shx_os_name(const char *name, unsigned flags, char *out, size_t size, shx_error *err);
/* Removes the name; processes already attached keep their block. */
int shx_os_unlink(const char *name, shx_error *err);
/* *count = how many attachments the object has (this one included; a fork()
 * child's inherited one counts), or -1 where the OS cannot tell. */
int shx_os_holders(shx_os_map *m, int64_t *count, shx_error *err);
/* Whether a user other than this process's may write the object's memory:
 * 1, 0, or -1 where the OS cannot tell (the caller then assumes one may). */
int shx_os_others_may_write(shx_os_map *m);

/* What the OS knows of one name of this user's, for listing and sweeping.
 * `header` points at a read-only copy of the block's first bytes while the
 * callback runs (NULL when its memory is gone or cannot be read). */
typedef struct shx_os_info {
    const char *name; /* the block's name as the user gave it */
    uint64_t size;    /* bytes of memory, header included; 0 when gone */
    int64_t holders;  /* attachments, -1 where the OS cannot tell */
    int persist;      /* 1, 0, or -1 where the OS cannot tell */
    int alive;        /* the memory exists (a dead entry's does not) */
    uint32_t creator_pid;
    int64_t created; /* Unix time of creation, 0 if unknown */
    const void *header;
    size_t header_len;
} shx_os_info;
typedef void (*shx_os_info_fn)(void *ctx, const shx_os_info *info);

/* Calls fn for each block name this user has (SHX_E_OS, ENOSYS, where the OS
 * keeps no list).  Changes nothing. */
int shx_os_list(shx_os_info_fn fn, void *ctx, shx_error *err);
/* Removes what is left of dead blocks of this user's: name entries whose
 * memory is gone, and memory nothing names or holds.  fn is called for each
 * thing removed (alive = 0 for a name entry, 1 for memory). */
int shx_os_sweep(shx_os_info_fn fn, void *ctx, shx_error *err);

/* The writer lock.  `area` is SHX_LOCK_AREA bytes inside the header; a backend
 * may keep its lock there or beside the mapping. */
#define SHX_LOCK_AREA 128
int shx_os_lock_init(shx_os_map *m, void *area, shx_error *err);
/* timeout_ns < 0 waits forever, 0 only tries.  *owner_died is set when the lock
 * was taken from a holder that died; the protected data may need repair.
 * The lock is not recursive: a thread that holds it gets SHX_E_OS (EDEADLK). */
int shx_os_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err);
/* Fails (SHX_E_OS, EPERM) when the calling thread does not hold the lock. */
int shx_os_unlock(shx_os_map *m, void *area, shx_error *err);

/* Sleeps while the shared 32-bit word at addr (inside m) still holds
 * `expected`, at most timeout_ns (>= 0), until shx_os_wake_word on the same
 * word from any process.  Returns SHX_OK (woken, changed, interrupted by a
 * signal, or woken spuriously: callers re-check) or SHX_E_TIMEOUT.  Waking
 * must need no system call when nobody waits: callers count their waiters and
 * pass that count to wake, which is called only when it is not zero.  Wake
 * returns how many sleepers it woke, or -1 where the OS does not tell: a count
 * that keeps finding nobody asleep has kept waiters that died. */
int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns);
int shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters);
/* Whether every word of a block shares one wake-up (a Windows semaphore per
 * block): a wake then wakes as many sleepers as all its words count. */
#if defined(_WIN32)
#define SHX_OS_ONE_WAKE_PER_BLOCK 1
#else
#define SHX_OS_ONE_WAKE_PER_BLOCK 0
#endif

/* A doorbell inside this process: how a thread ends another's
 * shx_os_wait_any early (new work for it, or a close()).  Ringing makes no
 * system call unless someone sleeps on it. */
typedef struct shx_os_bell {
#ifdef _WIN32
    void *event; /* auto-reset event HANDLE: a ring made before the wait is kept */
#else
    uint32_t rings;               /* futex word: bumped by every ring */
    uint32_t sleepers;            /* threads inside shx_os_wait_any on it */
#endif
} shx_os_bell;
int shx_os_bell_init(shx_os_bell *bell, shx_error *err);
void shx_os_bell_free(shx_os_bell *bell);
void shx_os_bell_ring(shx_os_bell *bell);
/* Read before looking at what a wait is for, then given to shx_os_wait_any:
 * a ring after this read ends that wait. */
uint32_t shx_os_bell_rings(shx_os_bell *bell);

/* How many shared words one shx_os_wait_any can sleep on: futex_waitv takes
 * 128 (one is the bell), WaitForMultipleObjects 64.  Elsewhere 0: the caller
 * polls (and on the lock-file path built on Linux, which stands in for macOS). */
#if defined(_WIN32)
#define SHX_OS_WAIT_ANY_MAX 63
#elif defined(__linux__) && !SHX_LOCK_FILES
#define SHX_OS_WAIT_ANY_MAX 127
#else
#define SHX_OS_WAIT_ANY_MAX 0
#endif
/* Sleeps while each words[i] (inside maps[i]) holds expected[i] and the bell
 * has rung no more than `rung` times, at most timeout_ns (>= 0), until a
 * shx_os_wake_word on any of the words (callers count themselves as a waiter
 * of each, as for shx_os_wait_word) or a ring.  SHX_OK: something may have
 * changed (callers re-check); SHX_E_TIMEOUT; SHX_E_OS: this wait failed, and
 * the caller polls instead (for good only where shx_os_wait_any_supported
 * says the kernel has no such wait: Linux older than 5.16). */
int shx_os_wait_any(shx_os_map *const *maps, void *const *words, const uint32_t *expected, size_t n, shx_os_bell *bell,
                    uint32_t rung, int64_t timeout_ns);
/* Whether the kernel has the wait on many words (a system call: ask once). */
int shx_os_wait_any_supported(void);

/* A monotonic clock, for lock-wait deadlines. */
uint64_t shx_os_monotonic_ns(void);
/* Sleeps a fraction of a millisecond: for short polls. */
void shx_os_pause_briefly(void);
/* Lets another thread ready on this CPU run, without sleeping. */
void shx_os_yield(void);
/* CPUs this process can run on (at least 1). */
int shx_os_cpu_count(void);
/* Bytes of the level-`level` data (or unified) cache of one core, or 0 when
 * the OS does not say. */
size_t shx_os_cache_size(int level);
/* Whether more threads are runnable right now than this process has CPUs
 * (0 where the OS does not say).  A system call or more: not for hot paths. */
int shx_os_cpus_oversubscribed(void);

uint32_t shx_os_pid(void);
/* Detaches every block this process still holds; for process exit. */
void shx_os_detach_all_at_exit(shx_keep_name_fn keep_name);

/* Supplied by the core, called by a POSIX backend in a fork() child for
 * every block the process has attached, before anything else runs there. */
void shx_core_fork_child(shx_os_map *m);

#endif
