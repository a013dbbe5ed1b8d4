/* POSIX backend: shm_open + mmap, liveness by open-file-description locks,
 * the writer lock as a robust process-shared pthread mutex.
 *
 * Liveness: every attachment holds a shared lock on byte LIVE_BYTE of its
 * descriptor; the kernel drops it when the process dies.  Attach and detach
 * run under an exclusive lock on GATE_BYTE, so "am I the only holder?" (an
 * exclusive LIVE_BYTE lock that succeeds without waiting) has a stable answer
 * while we act on it.  OFD locks (not classic fcntl locks) because they belong
 * to the open file description, so two attachments in one process count as
 * two, and conversion between shared and exclusive is atomic (unlike flock).
 */
#define _GNU_SOURCE
#include "platform.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#ifndef F_OFD_SETLK
#error "this backend needs open file description locks (F_OFD_SETLK, Linux 3.15+)"
#endif

enum { LIVE_BYTE = 0, GATE_BYTE = 1 };

_Static_assert(sizeof(pthread_mutex_t) <= SHX_LOCK_AREA, "pthread mutex does not fit the lock area");

int shx_fail_os(shx_error *err, const char *op)
{
    int saved = errno;
    shx_fail(err, SHX_E_OS, 0, 0, NULL);
    err->os_error = saved;
    err->op = op;
    return SHX_E_OS;
}

uint32_t shx_os_pid(void) { return (uint32_t)getpid(); }

/* ---- byte-range locks -------------------------------------------------- */

/* Sets lock `type` (F_RDLCK, F_WRLCK, F_UNLCK) on one byte; waits if asked.
 * Returns 0, or -1 with errno (EAGAIN when it would have had to wait). */
static int lock_byte(int fd, short type, off_t byte, int wait)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    for (;;) {
        if (fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

static int busy_errno(int e) { return e == EAGAIN || e == EACCES; }

/* ---- the process registry: fork() and exit ----------------------------- */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static shx_os_map *attached_head;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* Writes "/proc/self/fd/N" without stdio, as it runs inside fork(). */
static void proc_fd_path(char *out, int fd)
{
    static const char prefix[] = "/proc/self/fd/";
    char digits[16];
    int n = 0;
    memcpy(out, prefix, sizeof prefix - 1);
    do {
        digits[n++] = (char)('0' + fd % 10);
        fd /= 10;
    } while (fd > 0);
    for (int i = 0; i < n; i++)
        out[sizeof prefix - 1 + i] = digits[n - 1 - i];
    out[sizeof prefix - 1 + n] = '\0';
}

/* A fork() child shares its parent's open file descriptions, and with them the
 * liveness locks: the parent's detach would then count the child out.  So,
 * before fork(), the parent opens each attached object anew and locks it; the
 * child keeps that descriptor as its own and the parent closes its copy.
 * Doing it before the fork leaves no window in which the parent could detach
 * as the last holder while the child is still on its way. */
static int open_same_object(const shx_os_map *m)
{
    /* A new open file description for the object behind m->fd. */
    char path[40];
    proc_fd_path(path, m->fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        struct stat st;
        fd = shm_open(m->os_name, O_RDWR, 0);
        if (fd < 0)
            return -1;
        if (fstat(fd, &st) != 0 || (uint64_t)st.st_dev != m->dev || (uint64_t)st.st_ino != m->ino) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

static int reopen_same_object(const shx_os_map *m)
{
    int fd = open_same_object(m);
    if (fd >= 0 && lock_byte(fd, F_RDLCK, LIVE_BYTE, 0) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void registry_prepare(void)
{
    pthread_mutex_lock(&registry_lock);
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached)
        m->fork_fd = reopen_same_object(m);
}

static void registry_parent(void)
{
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached) {
        if (m->fork_fd >= 0)
            close(m->fork_fd);
        m->fork_fd = -1;
    }
    pthread_mutex_unlock(&registry_lock);
}

static void registry_child(void)
{
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached) {
        if (m->fork_fd >= 0) {
            close(m->fd);
            m->fd = m->fork_fd;
        } else {
            /* We still count through the shared lock, but cannot tell our
             * parent's detach from ours: never remove the name from here. */
            m->keep_name = 1;
        }
        m->fork_fd = -1;
    }
    pthread_mutex_unlock(&registry_lock);
}

static void registry_install(void)
{
    (void)pthread_atfork(registry_prepare, registry_parent, registry_child);
}

/* Attach and detach hold registry_lock throughout, so that fork() (whose
 * prepare handler takes it) never copies a descriptor that holds the gate. */
static void registry_enter(void)
{
    pthread_once(&atfork_once, registry_install);
    pthread_mutex_lock(&registry_lock);
}

static void registry_leave(void) { pthread_mutex_unlock(&registry_lock); }

static void registry_add(shx_os_map *m)
{
    m->next_attached = attached_head;
    attached_head = m;
}

static void registry_remove(shx_os_map *m)
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
    for (;;) {
        registry_enter();
        shx_os_map *m = attached_head;
        registry_leave();
        if (m == NULL)
            return;
        shx_error ignored;
        shx_os_detach(m, keep_name, 1, &ignored);
    }
}

/* ---- attach / detach --------------------------------------------------- */

/* Maps the object through a description of its own: a mapping keeps the
 * description it was made from alive, and with it any lock on it, so mapping
 * m->fd itself would let a forked child's inherited mapping hold our
 * liveness lock after we died. */
static int map_object(shx_os_map *m, size_t size, shx_error *err)
{
    m->base = NULL;
    m->size = 0;
    if (size == 0)
        return SHX_OK;
    int fd = open_same_object(m);
    if (fd < 0)
        return shx_fail_os(err, "open");
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int saved = errno;
    close(fd);
    errno = saved;
    if (p == MAP_FAILED)
        return shx_fail_os(err, "mmap");
    m->base = p;
    m->size = size;
    return SHX_OK;
}

static void unmap_object(shx_os_map *m)
{
    if (m->base != NULL)
        (void)munmap(m->base, m->size);
    m->base = NULL;
    m->size = 0;
}

/* Gives a new object its size and real backing memory now, so that a full
 * /dev/shm is an error here rather than SIGBUS at some later write. */
static int size_fresh_object(int fd, size_t size, unsigned mode, shx_error *err)
{
    if (ftruncate(fd, (off_t)size) != 0)
        return shx_fail_os(err, "ftruncate");
    /* shm_open applied the umask; the caller's mode is what was asked for.
     * Failing here only means another user made the name: keep theirs. */
    (void)fchmod(fd, (mode_t)mode);
    int rc;
    do {
        rc = posix_fallocate(fd, 0, (off_t)size);
    } while (rc == EINTR);
    if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
        errno = rc;
        shx_fail_os(err, "posix_fallocate");
        err->a = (uint64_t)size;   /* named in the message: how much did not fit */
        return SHX_E_OS;
    }
    return SHX_OK;
}

static int stat_size(const struct stat *st, size_t *out, shx_error *err)
{
    if (st->st_size < 0 || (uint64_t)st->st_size > (uint64_t)SIZE_MAX)
        return shx_fail(err, SHX_E_CORRUPT, (uint64_t)st->st_size, 0, "object size does not fit in memory");
    *out = (size_t)st->st_size;
    return SHX_OK;
}

/* One attempt under the gate.  Returns SHX_OK, an error, or SHX_REINIT when
 * the object was unlinked under us and the caller should start again. */
static int attach_locked(shx_os_map *m, size_t size, unsigned mode, unsigned flags,
                         shx_prepare_fn prepare, void *ctx, int *created, shx_error *err)
{
    struct stat st;
    size_t existing = 0;
    int rc;

    if (fstat(m->fd, &st) != 0)
        return shx_fail_os(err, "fstat");
    if (st.st_nlink == 0)
        return SHX_REINIT;
    if ((flags & SHX_OPEN_REQUIRE_OWNER) && st.st_uid != geteuid())
        return shx_fail(err, SHX_E_NOTOWNER, (uint64_t)st.st_uid, (uint64_t)geteuid(), NULL);
    m->dev = (uint64_t)st.st_dev;
    m->ino = (uint64_t)st.st_ino;
    if ((rc = stat_size(&st, &existing, err)) != SHX_OK)
        return rc;

    if (lock_byte(m->fd, F_WRLCK, LIVE_BYTE, 0) != 0) {
        if (!busy_errno(errno))
            return shx_fail_os(err, "fcntl");
        /* Others hold it.  No exclusive holder can exist while we hold the gate. */
        if (lock_byte(m->fd, F_RDLCK, LIVE_BYTE, 1) != 0)
            return shx_fail_os(err, "fcntl");
        if ((rc = map_object(m, existing, err)) != SHX_OK)
            return rc;
        return prepare(ctx, m, SHX_ATTACH_SHARED, err);
    }

    /* Nobody else holds it: it is new, persistent, or left behind by processes that died. */
    int state = existing == 0 ? SHX_ATTACH_FRESH : SHX_ATTACH_ALONE;
    if (state == SHX_ATTACH_ALONE) {
        if ((rc = map_object(m, existing, err)) != SHX_OK)
            return rc;
        rc = prepare(ctx, m, SHX_ATTACH_ALONE, err);
        if (rc == SHX_REINIT) {
            unmap_object(m);
            if (ftruncate(m->fd, 0) != 0)
                return shx_fail_os(err, "ftruncate");
            state = SHX_ATTACH_FRESH;
        } else if (rc != SHX_OK) {
            return rc;
        }
    }
    if (state == SHX_ATTACH_FRESH) {
        rc = size_fresh_object(m->fd, size, mode, err);
        if (rc == SHX_OK)
            rc = map_object(m, size, err);
        if (rc == SHX_OK)
            rc = prepare(ctx, m, SHX_ATTACH_FRESH, err);
        if (rc != SHX_OK) {
            /* Leave no half-made block behind; we hold it alone, so the name is ours. */
            (void)shm_unlink(m->os_name);
            return rc;
        }
        *created = 1;
    }
    if (lock_byte(m->fd, F_RDLCK, LIVE_BYTE, 0) != 0)
        return shx_fail_os(err, "fcntl");
    return SHX_OK;
}

int shx_os_attach(shx_os_map *m, const char *name, size_t size, unsigned mode, unsigned flags,
                  const char *security, shx_prepare_fn prepare, void *ctx, int *created, shx_error *err)
{
    if (security != NULL) {
        errno = EINVAL;
        return shx_fail_os(err, "security descriptors are a Windows option");
    }
    size_t n = strlen(name);
    memset(m, 0, sizeof *m);
    m->fd = -1;
    m->fork_fd = -1;
    *created = 0;
    if (n + 2 > sizeof m->os_name)
        return shx_fail(err, SHX_E_NAME, n, sizeof m->os_name - 2, "name too long");
    m->os_name[0] = '/';
    memcpy(m->os_name + 1, name, n + 1);

    for (;;) {
        int fd;
        do {
            fd = shm_open(m->os_name, O_RDWR | O_CREAT, (mode_t)mode);
        } while (fd < 0 && errno == EINTR);
        if (fd < 0)
            return shx_fail_os(err, "shm_open");
        m->fd = fd;
        int rc;
        registry_enter();
        if (lock_byte(fd, F_WRLCK, GATE_BYTE, 1) != 0)
            rc = shx_fail_os(err, "fcntl");
        else
            rc = attach_locked(m, size, mode, flags, prepare, ctx, created, err);
        if (rc == SHX_OK) {
            (void)lock_byte(fd, F_UNLCK, GATE_BYTE, 0);
            registry_add(m);
            registry_leave();
            return SHX_OK;
        }
        unmap_object(m);
        close(fd);   /* drops every lock we took */
        registry_leave();
        m->fd = -1;
        *created = 0;
        if (rc != SHX_REINIT)
            return rc;
    }
}

int shx_os_detach(shx_os_map *m, shx_keep_name_fn keep_name, int at_exit, shx_error *err)
{
    int rc = SHX_OK;
    if (m->fd < 0)
        return SHX_OK;
    registry_enter();
    registry_remove(m);
    if (lock_byte(m->fd, F_WRLCK, GATE_BYTE, 1) != 0) {
        rc = shx_fail_os(err, "fcntl");
    } else if (!m->keep_name && lock_byte(m->fd, F_WRLCK, LIVE_BYTE, 0) == 0) {
        /* We are the last holder.  A linked object's name is still ours to remove;
         * an unlinked one's name may already belong to a newer block. */
        struct stat st;
        if (fstat(m->fd, &st) != 0)
            rc = shx_fail_os(err, "fstat");
        else if (st.st_nlink > 0 && !(keep_name != NULL && keep_name(m)) &&
                 shm_unlink(m->os_name) != 0 && errno != ENOENT)
            rc = shx_fail_os(err, "shm_unlink");
    }
    if (!at_exit)
        unmap_object(m);
    if (close(m->fd) != 0 && rc == SHX_OK && errno != EINTR)
        rc = shx_fail_os(err, "close");
    m->fd = -1;
    registry_leave();
    return rc;
}

int shx_os_unlink(const char *name, shx_error *err)
{
    char os_name[256];
    size_t n = strlen(name);
    if (n + 2 > sizeof os_name)
        return shx_fail(err, SHX_E_NAME, n, sizeof os_name - 2, "name too long");
    os_name[0] = '/';
    memcpy(os_name + 1, name, n + 1);
    if (shm_unlink(os_name) != 0)
        return shx_fail_os(err, "shm_unlink");
    return SHX_OK;
}

int shx_os_sole_holder(shx_os_map *m, int *alone, shx_error *err)
{
    int rc = SHX_OK;
    *alone = 0;
    if (m->fd < 0)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    registry_enter();
    if (lock_byte(m->fd, F_WRLCK, GATE_BYTE, 1) != 0) {
        registry_leave();
        return shx_fail_os(err, "fcntl");
    }
    if (lock_byte(m->fd, F_WRLCK, LIVE_BYTE, 0) == 0) {
        *alone = 1;
        if (lock_byte(m->fd, F_RDLCK, LIVE_BYTE, 0) != 0)
            rc = shx_fail_os(err, "fcntl");
    } else if (!busy_errno(errno)) {
        rc = shx_fail_os(err, "fcntl");
    }
    (void)lock_byte(m->fd, F_UNLCK, GATE_BYTE, 0);
    registry_leave();
    return rc;
}

/* ---- the writer lock --------------------------------------------------- */

static int init_mutex(pthread_mutex_t *mutex)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    /* Error-checking, so a relock by its holder or an unlock by another thread
     * is an error the caller can report instead of a deadlock. */
    if (rc == 0)
        rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    if (rc == 0)
        rc = pthread_mutex_init(mutex, &attr);
    (void)pthread_mutexattr_destroy(&attr);
    return rc;
}

#ifdef __GLIBC__
/* The mutex lives in memory any process with access can overwrite, and glibc
 * trusts it: a scribbled type (say, priority-protect) ends in an assertion
 * inside pthread_mutex_lock.  The type never changes after init, so a lock
 * whose type differs from the one our attributes give is refused instead. */
static int expected_kind;
static pthread_once_t expected_kind_once = PTHREAD_ONCE_INIT;

static void find_expected_kind(void)
{
    pthread_mutex_t probe;
    if (init_mutex(&probe) == 0) {
        expected_kind = probe.__data.__kind;
        (void)pthread_mutex_destroy(&probe);
    } else {
        expected_kind = -1;
    }
}

static int mutex_intact(const pthread_mutex_t *mutex)
{
    (void)pthread_once(&expected_kind_once, find_expected_kind);
    return mutex->__data.__kind == expected_kind;
}
#else
static int mutex_intact(const pthread_mutex_t *mutex)
{
    (void)mutex;
    return 1;
}
#endif

int shx_os_lock_init(shx_os_map *m, void *area, shx_error *err)
{
    (void)m;
    int rc = init_mutex((pthread_mutex_t *)area);
    if (rc != 0) {
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_init");
    }
    return SHX_OK;
}

int shx_os_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err)
{
    (void)m;
    pthread_mutex_t *mutex = (pthread_mutex_t *)area;
    int rc;
    *owner_died = 0;
    if (!mutex_intact(mutex))
        return shx_fail(err, SHX_E_CORRUPT, 0, 0, "has an overwritten writer lock");
    if (timeout_ns == 0) {
        rc = pthread_mutex_trylock(mutex);
        if (rc == EBUSY)
            return shx_fail(err, SHX_E_TIMEOUT, 0, 0, NULL);
    } else if (timeout_ns < 0) {
        rc = pthread_mutex_lock(mutex);
    } else {
        struct timespec deadline;
        if (clock_gettime(CLOCK_REALTIME, &deadline) != 0)
            return shx_fail_os(err, "clock_gettime");
        deadline.tv_sec += (time_t)(timeout_ns / 1000000000);
        deadline.tv_nsec += (long)(timeout_ns % 1000000000);
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec += 1;
            deadline.tv_nsec -= 1000000000L;
        }
        do {
            rc = pthread_mutex_timedlock(mutex, &deadline);
        } while (rc == EINTR);
        if (rc == ETIMEDOUT)
            return shx_fail(err, SHX_E_TIMEOUT, (uint64_t)timeout_ns, 0, NULL);
    }
    if (rc == EOWNERDEAD) {
        *owner_died = 1;
        rc = pthread_mutex_consistent(mutex);
    }
    if (rc != 0) {
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_lock");
    }
    return SHX_OK;
}

int shx_os_unlock(shx_os_map *m, void *area, shx_error *err)
{
    (void)m;
    if (!mutex_intact((pthread_mutex_t *)area))
        return shx_fail(err, SHX_E_CORRUPT, 0, 0, "has an overwritten writer lock");
    int rc = pthread_mutex_unlock((pthread_mutex_t *)area);
    if (rc != 0) {
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_unlock");
    }
    return SHX_OK;
}

int shx_os_cpu_count(void)
{
    static int count;
    if (count == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        count = n > 0 ? (int)n : 1;
    }
    return count;
}

void shx_os_pause_briefly(void)
{
    struct timespec ts = {0, 100000};
    (void)nanosleep(&ts, NULL);
}

uint64_t shx_os_monotonic_ns(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- change notification ------------------------------------------------- */

#ifdef __linux__
/* A futex on the word inside the shared mapping: FUTEX_WAIT/FUTEX_WAKE without
 * FUTEX_PRIVATE_FLAG, so the kernel keys it by the page, not the process. */
int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns)
{
    (void)m;
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000);
    ts.tv_nsec = (long)(timeout_ns % 1000000000);
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc != 0 && errno == ETIMEDOUT)
        return SHX_E_TIMEOUT;
    return SHX_OK;   /* woken, EAGAIN (already changed) or EINTR: the caller looks again */
}

void shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)m;
    (void)waiters;
    (void)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
#else
/* No cross-process futex here: poll the word every millisecond. */
int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns)
{
    (void)m;
    const int64_t step = 1000000;
    for (int64_t slept = 0; slept < timeout_ns; slept += step) {
        if (__atomic_load_n((uint32_t *)addr, __ATOMIC_ACQUIRE) != expected)
            return SHX_OK;
        struct timespec ts = {0, (long)(timeout_ns - slept < step ? timeout_ns - slept : step)};
        nanosleep(&ts, NULL);
    }
    return __atomic_load_n((uint32_t *)addr, __ATOMIC_ACQUIRE) != expected ? SHX_OK : SHX_E_TIMEOUT;
}

void shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)m;
    (void)addr;
    (void)waiters;
}
#endif
