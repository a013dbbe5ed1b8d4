/* What every POSIX backend shares: errors, the process registry (fork() and
 * exit), the clock, the CPU count, cache sizes and the cross-process wait on
 * a word.  The memory and its locks are the backend's: platform_sysv.c
 * (Linux) or platform_lockfiles.c (macOS, the BSDs).
 */
#define _GNU_SOURCE
#include "platform_posix.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#ifdef __APPLE__
#include <dlfcn.h>
#include <sys/sysctl.h>
#endif

int shx_fail_os(shx_error *err, const char *op)
{
    int saved = errno;
    shx_fail(err, SHX_E_OS, 0, 0, NULL);
    err->os_error = saved;
    err->op = op;
    return SHX_E_OS;
}

uint32_t shx_os_pid(void) { return (uint32_t)getpid(); }

int shx_posix_busy(int e) { return e == EAGAIN || e == EACCES || e == EWOULDBLOCK; }

int shx_posix_attach_start(shx_os_map *m, const char *name, unsigned flags, const char *security, int *created,
                           shx_error *err)
{
    *created = 0;
    if (security != NULL) {
        errno = EINVAL;
        return shx_fail_os(err, "security descriptors are a Windows option");
    }
    return shx_os_name(name, flags, m->os_name, sizeof m->os_name, err);
}

/* ---- the process registry: fork() and exit ----------------------------- */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static shx_os_map *attached_head;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_error;

static void registry_prepare(void)
{
    pthread_mutex_lock(&registry_lock);
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached)
        shx_posix_fork_prepare(m);
}

static void registry_parent(void)
{
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached)
        shx_posix_fork_parent(m);
    pthread_mutex_unlock(&registry_lock);
}

/* The descriptors threads poll a gate on while they let the registry go
 * (shx_posix_poll_lock).  A fork() child must not keep one: it would share
 * the open file description, and so the lock that the polling thread takes
 * on it later, which then stays held through the child's copy (the child's
 * own next attach or detach of the name would wait for itself for ever). */
#define POLLERS_MAX 64
static struct {
    int fd;
    pthread_t thread;
} pollers[POLLERS_MAX];
static int poller_count;

static void registry_child(void)
{
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached) {
        shx_posix_fork_child(m);
        shx_core_fork_child(m);
    }
    shx_posix_forget_all_held();
    int kept = 0;
    for (int i = 0; i < poller_count; i++) {
        if (pthread_equal(pollers[i].thread, pthread_self()))
            pollers[kept++] = pollers[i]; /* the forking thread's own (a signal handler forked): it goes on */
        else
            (void)close(pollers[i].fd); /* its thread is not in this process */
    }
    poller_count = kept;
    pthread_mutex_unlock(&registry_lock);
}

static void registry_install(void) { atfork_error = pthread_atfork(registry_prepare, registry_parent, registry_child); }

int shx_posix_registry_enter(shx_error *err)
{
    (void)pthread_once(&atfork_once, registry_install);
    if (atfork_error != 0) {
        /* Without the handlers a fork could copy a held gate into a child. */
        errno = atfork_error;
        return shx_fail_os(err, "pthread_atfork");
    }
    pthread_mutex_lock(&registry_lock);
    return SHX_OK;
}

void shx_posix_registry_leave(void) { pthread_mutex_unlock(&registry_lock); }

void shx_posix_registry_add(shx_os_map *m)
{
    m->next_attached = attached_head;
    attached_head = m;
}

void shx_posix_registry_remove(shx_os_map *m)
{
    for (shx_os_map **p = &attached_head; *p != NULL; p = &(*p)->next_attached) {
        if (*p == m) {
            *p = m->next_attached;
            break;
        }
    }
    m->next_attached = NULL;
}

void shx_os_detach_all_at_exit(shx_keep_name_fn keep_name)
{
    shx_error ignored;
    for (;;) {
        if (shx_posix_registry_enter(&ignored) != SHX_OK)
            return;
        shx_os_map *m = attached_head;
        shx_posix_registry_leave();
        if (m == NULL)
            return;
        if (shx_os_detach(m, keep_name, 1, NULL, &ignored) != SHX_OK) {
            /* Detach failed half way: make sure the loop moves on. */
            if (shx_posix_registry_enter(&ignored) != SHX_OK)
                return;
            shx_posix_registry_remove(m);
            shx_posix_registry_leave();
        }
    }
}

/* ---- a writer lock the kernel keeps on a descriptor ------------------------ */

/* What the header's lock area holds with lock files: a marker, so that a
 * scribbled or foreign area is refused, and the pid of the holder, cleared
 * before every release: found set by the next holder, it means that a writer
 * died holding the lock and the protected data may need repair. */
typedef struct file_writer_area {
    char marker[8];
    uint32_t owner;
} file_writer_area;

static const char WRITER_MARKER[8] = {'s', 'h', 'x', 'f', 'l', 'o', 'c', 'k'};

_Static_assert(sizeof(file_writer_area) <= SHX_LOCK_AREA, "writer area fits the lock area");

/* Between tries for a lock that has no way to wait with a timeout: yields
 * first, then sleeps, doubling from 20 us to 1 ms.  0 once the time is up. */
static int wait_to_retry(int attempt, uint64_t start, int64_t timeout_ns)
{
    if (timeout_ns >= 0 && (int64_t)(shx_os_monotonic_ns() - start) >= timeout_ns)
        return 0;
    if (attempt < 8) {
        sched_yield();
    } else {
        long ns = attempt < 14 ? 20000L << (attempt - 8) : 1000000L;
        struct timespec ts = {0, ns};
        (void)nanosleep(&ts, NULL);
    }
    return 1;
}

/* A robust mutex is handed on as an owner death when its holder thread ends,
 * not only when its process does.  The same here: each thread keeps the
 * writer locks it holds in a thread-specific list, whose destructor (run at
 * thread exit) releases them with the owner word left set. */
static pthread_key_t held_key;
static pthread_once_t held_key_once = PTHREAD_ONCE_INIT;

static void release_abandoned(void *head)
{
    for (shx_os_map *m = (shx_os_map *)head, *next; m != NULL; m = next) {
        next = m->next_held;
        m->next_held = NULL;
        shx_posix_writer_release(m->writer_fd);
        (void)pthread_mutex_unlock(&m->local_writer);
    }
}

static int held_key_error;

static void make_held_key(void) { held_key_error = pthread_key_create(&held_key, release_abandoned); }

/* In a fork() child: the locks were the parent's, and are not held here. */
/* After fork(): the parent closes the descriptor it opened for the child;
 * the child takes it as its own (without one it must not write at all:
 * shx_os_lock refuses, rather than share the parent's lock). */
void shx_posix_writer_fork_parent(shx_os_map *m)
{
    if (m->writer_fork_fd >= 0)
        close(m->writer_fork_fd);
    m->writer_fork_fd = -1;
}

void shx_posix_writer_fork_child(shx_os_map *m)
{
    if (!m->kernel_lock)
        return;
    if (m->writer_fd >= 0)
        close(m->writer_fd);
    m->writer_fd = m->writer_fork_fd;
    m->writer_fork_fd = -1;
    /* Only the forking thread lives on: whatever other threads held is free. */
    (void)pthread_mutex_init(&m->local_writer, NULL);
    m->next_held = NULL;
}

void shx_posix_forget_all_held(void)
{
    (void)pthread_once(&held_key_once, make_held_key);
    if (held_key_error == 0)
        (void)pthread_setspecific(held_key, NULL);
}

static void remember_held(shx_os_map *m)
{
    m->next_held = (shx_os_map *)pthread_getspecific(held_key);
    (void)pthread_setspecific(held_key, m);
}

/* Whether the calling thread holds m's writer lock: its own list says, which
 * no other thread writes, so there is nothing to race with. */
static int held_by_this_thread(const shx_os_map *m)
{
    (void)pthread_once(&held_key_once, make_held_key);
    if (held_key_error != 0)
        return 0;
    for (const shx_os_map *p = (const shx_os_map *)pthread_getspecific(held_key); p != NULL; p = p->next_held) {
        if (p == m)
            return 1;
    }
    return 0;
}

static void forget_held(shx_os_map *m)
{
    shx_os_map *head = (shx_os_map *)pthread_getspecific(held_key);
    for (shx_os_map **p = &head; *p != NULL; p = &(*p)->next_held) {
        if (*p == m) {
            *p = m->next_held;
            break;
        }
    }
    m->next_held = NULL;
    (void)pthread_setspecific(held_key, head);
}

int shx_posix_file_lock_init(void *area, shx_error *err)
{
    (void)err;
    file_writer_area *a = (file_writer_area *)area;
    memcpy(a->marker, WRITER_MARKER, sizeof WRITER_MARKER);
    __atomic_store_n(&a->owner, 0, __ATOMIC_RELEASE);
    return SHX_OK;
}

int shx_posix_file_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err)
{
    file_writer_area *a = (file_writer_area *)area;
    uint64_t start = shx_os_monotonic_ns();
    int rc;
    *owner_died = 0;
    if (memcmp(a->marker, WRITER_MARKER, sizeof WRITER_MARKER) != 0)
        return shx_fail(err, SHX_E_CORRUPT, 0, 0, "has an overwritten writer lock");
    if (m->writer_fd < 0) {
        errno = EBADF;
        return shx_fail_os(err, "the writer lock file (not reopened after fork)");
    }
    (void)pthread_once(&held_key_once, make_held_key);
    if (held_key_error != 0) {
        /* Without the per-thread list a thread's death could not hand the lock on. */
        errno = held_key_error;
        return shx_fail_os(err, "pthread_key_create");
    }
    for (int attempt = 0;; attempt++) {
        rc = pthread_mutex_trylock(&m->local_writer);
        if (rc == 0)
            break;
        if (rc != EBUSY) {
            errno = rc;
            return shx_fail_os(err, "pthread_mutex_trylock");
        }
        if (held_by_this_thread(m)) {
            errno = EDEADLK;
            return shx_fail_os(err, "writer lock");
        }
        if (!wait_to_retry(attempt, start, timeout_ns))
            return shx_fail(err, SHX_E_TIMEOUT, (uint64_t)timeout_ns, 0, NULL);
    }
    for (int attempt = 0;; attempt++) {
        if (shx_posix_writer_try(m->writer_fd) == 0)
            break;
        if (errno != EINTR && !shx_posix_busy(errno)) {
            rc = shx_fail_os(err, "writer lock");
            (void)pthread_mutex_unlock(&m->local_writer);
            return rc;
        }
        if (!wait_to_retry(attempt, start, timeout_ns)) {
            (void)pthread_mutex_unlock(&m->local_writer);
            return shx_fail(err, SHX_E_TIMEOUT, (uint64_t)timeout_ns, 0, NULL);
        }
    }
    *owner_died = __atomic_exchange_n(&a->owner, shx_os_pid(), __ATOMIC_ACQ_REL) != 0;
    remember_held(m);
    return SHX_OK;
}

int shx_posix_file_unlock(shx_os_map *m, void *area, shx_error *err)
{
    file_writer_area *a = (file_writer_area *)area;
    if (!held_by_this_thread(m)) {
        errno = EPERM;
        return shx_fail_os(err, "writer unlock");
    }
    __atomic_store_n(&a->owner, 0, __ATOMIC_RELEASE);
    forget_held(m);
    shx_posix_writer_release(m->writer_fd);
    int rc = SHX_OK;
    (void)pthread_mutex_unlock(&m->local_writer);
    return rc;
}

/* Under the registry lock. */
static void unlist_poller(int fd)
{
    for (int i = 0; i < poller_count; i++) {
        if (pollers[i].fd == fd && pthread_equal(pollers[i].thread, pthread_self())) {
            pollers[i] = pollers[--poller_count];
            return;
        }
    }
}

int shx_posix_poll_lock(int (*try_lock)(int fd), int fd, const shx_os_interrupt *intr)
{
    uint64_t asked = shx_os_monotonic_ns();
    for (int attempt = 0;; attempt++) {
        if (try_lock(fd) == 0)
            return 0;
        if (errno != EINTR && !shx_posix_busy(errno))
            return -1;
        /* Between tries the registry is let go: a fork() meanwhile copies
         * no held gate, and the interrupt check may take an interpreter
         * lock that a forking thread holds while fork() waits for ours.
         * The descriptor is listed meanwhile, for the child to close; with
         * no room to list it, the registry is kept (forks wait). */
        int listed = poller_count < POLLERS_MAX;
        if (listed) {
            pollers[poller_count].fd = fd;
            pollers[poller_count].thread = pthread_self();
            poller_count++;
            pthread_mutex_unlock(&registry_lock);
        }
        if (attempt < 4) {
            sched_yield();
        } else {
            long ns = attempt < 12 ? 20000L << (attempt - 4) : 5000000L; /* 20 us doubling to 5 ms */
            struct timespec ts = {0, ns};
            (void)nanosleep(&ts, NULL);
        }
        int stop = 0;
        if (shx_os_monotonic_ns() - asked >= SHX_OS_POLL_NS) {
            asked = shx_os_monotonic_ns();
            stop = intr->interrupted(intr->ctx);
        }
        if (listed) {
            pthread_mutex_lock(&registry_lock);
            unlist_poller(fd);
        }
        if (stop)
            return -2;
    }
}

/* ---- clock and CPUs ------------------------------------------------------ */

static int cpu_count;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

/* The CPUs this process may run on (its affinity mask, where the OS has one),
 * not the CPUs the machine has: a spin pays only when a peer can run. */
static void count_cpus(void)
{
    long n = -1;
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        n = CPU_COUNT(&set);
#endif
    if (n <= 0)
        n = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_count = n > 0 ? (int)n : 1;
}

int shx_os_cpu_count(void)
{
    (void)pthread_once(&cpu_once, count_cpus);
    return cpu_count;
}

#ifdef __linux__
/* sysfs says what each cache is; sysconf's figures come from cpuid, which a
 * virtual machine may report as it likes. */
static size_t sysfs_cache_size(int level)
{
    for (int index = 0; index < 8; index++) {
        char path[96], text[32];
        int found_level = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
        FILE *f = fopen(path, "r");
        if (f == NULL)
            break;
        int ok = fscanf(f, "%d", &found_level) == 1;
        fclose(f);
        if (!ok || found_level != level)
            continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", index);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        ok = fgets(text, sizeof text, f) != NULL && strncmp(text, "Instruction", 11) != 0;
        fclose(f);
        if (!ok)
            continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        unsigned long long n = 0;
        char unit = 0;
        int fields = fscanf(f, "%llu%c", &n, &unit);
        fclose(f);
        if (fields >= 1)
            return (size_t)(fields == 2 && unit == 'K' ? n << 10 : fields == 2 && unit == 'M' ? n << 20 : n);
    }
    return 0;
}
#endif

size_t shx_os_cache_size(int level)
{
#ifdef __linux__
    size_t n = sysfs_cache_size(level);
    if (n > 0)
        return n;
#endif
#if defined(__APPLE__)
    char key[32];
    snprintf(key, sizeof key, "hw.l%dcachesize", level);
    uint64_t value = 0;
    size_t len = sizeof value;
    if (sysctlbyname(key, &value, &len, NULL, 0) == 0 && len <= sizeof value)
        return (size_t)value;
    return 0;
#elif defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
    long v = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : level == 3 ? _SC_LEVEL3_CACHE_SIZE : _SC_LEVEL1_DCACHE_SIZE);
    return v > 0 ? (size_t)v : 0;
#else
    (void)level;
    return 0;
#endif
}

int shx_os_cpus_oversubscribed(void)
{
#ifdef __linux__
    /* The fourth field of /proc/loadavg: runnable scheduling entities (this thread included) / all. */
    FILE *f = fopen("/proc/loadavg", "r");
    if (f == NULL)
        return 0;
    double one, five, fifteen;
    long runnable = 0;
    int fields = fscanf(f, "%lf %lf %lf %ld/", &one, &five, &fifteen, &runnable);
    fclose(f);
    /* The count is the whole machine's, so it is weighed against every CPU
     * online: against this process's few (its affinity), a big host busy
     * elsewhere would turn the spin off while our CPUs sit idle. */
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return fields == 4 && runnable > (online > 0 ? online : shx_os_cpu_count());
#else
    return 0;
#endif
}

void shx_os_pause_briefly(void)
{
    struct timespec ts = {0, 100000};
    (void)nanosleep(&ts, NULL);
}

void shx_os_yield(void) { (void)sched_yield(); }

uint64_t shx_os_monotonic_ns(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- change notification ------------------------------------------------- */

#ifndef __linux__
/* Where the kernel offers no cross-process wait on a word: poll it, every
 * millisecond at most. */
static int poll_word(void *addr, uint32_t expected, int64_t timeout_ns)
{
    const int64_t step = 1000000;
    for (int64_t slept = 0; slept < timeout_ns; slept += step) {
        if (__atomic_load_n((uint32_t *)addr, __ATOMIC_ACQUIRE) != expected)
            return SHX_OK;
        struct timespec ts = {0, (long)(timeout_ns - slept < step ? timeout_ns - slept : step)};
        (void)nanosleep(&ts, NULL);
    }
    return __atomic_load_n((uint32_t *)addr, __ATOMIC_ACQUIRE) != expected ? SHX_OK : SHX_E_TIMEOUT;
}
#endif

#if defined(__linux__)
/* A futex on the word inside the shared mapping: FUTEX_WAIT/FUTEX_WAKE without
 * FUTEX_PRIVATE_FLAG, so the kernel keys it by the page, not the process. */
int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns)
{
    (void)m;
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000);
    ts.tv_nsec = (long)(timeout_ns % 1000000000);
#if defined(SYS_futex_time64) && !defined(__LP64__) && !defined(_LP64)
    /* A 32-bit ABI whose struct timespec has a 64-bit time_t: the plain
     * futex call would read it as the old 32-bit layout. */
    long rc = sizeof ts.tv_sec == 8 ? syscall(SYS_futex_time64, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0)
                                    : syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
#else
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
#endif
    if (rc != 0 && errno == ETIMEDOUT)
        return SHX_E_TIMEOUT;
    return SHX_OK; /* woken, EAGAIN (already changed) or EINTR: the caller looks again */
}

int shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)m;
    (void)waiters;
    long woken = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    return woken < 0 ? -1 : woken > INT_MAX ? INT_MAX : (int)woken;
}
#elif defined(__APPLE__)
/* os_sync_wait_on_address (macOS 14.4 and later) with its SHARED flag, which
 * keys waiters by the page rather than the address, so that processes meet.
 * Looked up at run time, so that one build also runs on older macOS, where
 * waits poll instead. */
typedef int (*os_sync_wait_fn)(void *addr, uint64_t value, size_t size, uint32_t flags, uint32_t clockid,
                               uint64_t timeout_ns);
typedef int (*os_sync_wake_fn)(void *addr, size_t size, uint32_t flags);
enum { OS_SYNC_SHARED = 1, OS_CLOCK_MACH_ABSOLUTE = 32 };

static os_sync_wait_fn sync_wait;
static os_sync_wake_fn sync_wake;
static pthread_once_t sync_once = PTHREAD_ONCE_INIT;

static void find_os_sync(void)
{
    os_sync_wait_fn wait_fn;
    os_sync_wake_fn wake_fn;
    void *w = dlsym(RTLD_DEFAULT, "os_sync_wait_on_address_with_timeout");
    void *k = dlsym(RTLD_DEFAULT, "os_sync_wake_by_address_all");
    memcpy(&wait_fn, &w, sizeof wait_fn);
    memcpy(&wake_fn, &k, sizeof wake_fn);
    if (wait_fn != NULL && wake_fn != NULL) {
        sync_wait = wait_fn;
        sync_wake = wake_fn;
    }
}

int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns)
{
    (void)m;
    (void)pthread_once(&sync_once, find_os_sync);
    if (sync_wait == NULL || timeout_ns <= 0)
        return poll_word(addr, expected, timeout_ns);
    int rc = sync_wait(addr, expected, sizeof(uint32_t), OS_SYNC_SHARED, OS_CLOCK_MACH_ABSOLUTE, (uint64_t)timeout_ns);
    if (rc < 0 && errno == ETIMEDOUT)
        return SHX_E_TIMEOUT;
    return SHX_OK; /* woken, changed already, interrupted: the caller looks again */
}

int shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)m;
    (void)waiters;
    (void)pthread_once(&sync_once, find_os_sync);
    if (sync_wake != NULL)
        (void)sync_wake(addr, sizeof(uint32_t), OS_SYNC_SHARED);
    return -1; /* no count of the woken, and no macOS here to learn what its errors tell */
}
#else
int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns)
{
    (void)m;
    return poll_word(addr, expected, timeout_ns);
}

int shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)m;
    (void)addr;
    (void)waiters;
    return -1; /* waiters poll */
}
#endif

/* ---- many words at once ---------------------------------------------------- */

int shx_os_bell_init(shx_os_bell *bell, shx_error *err)
{
    (void)err;
    __atomic_store_n(&bell->rings, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&bell->sleepers, 0, __ATOMIC_SEQ_CST);
    return SHX_OK;
}

void shx_os_bell_free(shx_os_bell *bell) { (void)bell; }

uint32_t shx_os_bell_rings(shx_os_bell *bell) { return __atomic_load_n(&bell->rings, __ATOMIC_SEQ_CST); }

void shx_os_bell_ring(shx_os_bell *bell)
{
    __atomic_fetch_add(&bell->rings, 1, __ATOMIC_SEQ_CST);
#ifdef __linux__
    /* The sleeper counts itself before it sleeps, and its futex_waitv fails
     * at once if rings moved after it read them: no ring is lost. */
    if (__atomic_load_n(&bell->sleepers, __ATOMIC_SEQ_CST) != 0)
        (void)syscall(SYS_futex, &bell->rings, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
}

#if SHX_OS_WAIT_ANY_MAX > 0
/* futex_waitv (Linux 5.16).  Declared here, not taken from the system's
 * headers, so that a build on older headers still uses it where the running
 * kernel has it; the number is the same on every architecture. */
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
struct shx_futex_waitv {
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};
struct shx_kernel_timespec {
    int64_t tv_sec;
    int64_t tv_nsec;
};
enum { SHX_FUTEX_32 = 2, SHX_FUTEX_PRIVATE = 128 };

int shx_os_wait_any(shx_os_map *const *maps, void *const *words, const uint32_t *expected, size_t n, shx_os_bell *bell,
                    uint32_t rung, int64_t timeout_ns)
{
    (void)maps;
    if (n > SHX_OS_WAIT_ANY_MAX) {
        errno = EINVAL;
        return SHX_E_OS;
    }
    struct shx_futex_waitv w[SHX_OS_WAIT_ANY_MAX + 1];
    memset(w, 0, sizeof w);
    for (size_t i = 0; i < n; i++) {
        w[i].val = expected[i];
        w[i].uaddr = (uint64_t)(uintptr_t)words[i];
        w[i].flags = SHX_FUTEX_32; /* shared: keyed by the page, met by every process */
    }
    w[n].val = rung;
    w[n].uaddr = (uint64_t)(uintptr_t)&bell->rings;
    w[n].flags = SHX_FUTEX_32 | SHX_FUTEX_PRIVATE;
    uint64_t deadline = shx_os_monotonic_ns() + (uint64_t)timeout_ns;
    struct shx_kernel_timespec ts = {(int64_t)(deadline / 1000000000u), (int64_t)(deadline % 1000000000u)};
    __atomic_fetch_add(&bell->sleepers, 1, __ATOMIC_SEQ_CST);
    long rc = syscall(SYS_futex_waitv, w, (unsigned)(n + 1), 0u, &ts, CLOCK_MONOTONIC);
    int saved = errno;
    __atomic_fetch_sub(&bell->sleepers, 1, __ATOMIC_SEQ_CST);
    if (rc >= 0)
        return SHX_OK;
    errno = saved;
    if (saved == ETIMEDOUT)
        return SHX_E_TIMEOUT;
    if (saved == EAGAIN || saved == EINTR)
        return SHX_OK; /* a word or the bell had moved already, or a signal: the caller looks again */
    return SHX_E_OS;
}

int shx_os_wait_any_supported(void)
{
    /* No futexes at all: EINVAL from a kernel that has the call, ENOSYS from one without. */
    long rc = syscall(SYS_futex_waitv, NULL, 0u, 0u, NULL, CLOCK_MONOTONIC);
    return !(rc < 0 && errno == ENOSYS);
}
#else
int shx_os_wait_any(shx_os_map *const *maps, void *const *words, const uint32_t *expected, size_t n, shx_os_bell *bell,
                    uint32_t rung, int64_t timeout_ns)
{
    (void)maps, (void)words, (void)expected, (void)n, (void)bell, (void)rung, (void)timeout_ns;
    errno = ENOSYS;
    return SHX_E_OS;
}

int shx_os_wait_any_supported(void) { return 0; }
#endif
