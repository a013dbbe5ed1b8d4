/* POSIX backend: shm_open + mmap, liveness by kernel-released locks.
 *
 * Liveness: every attachment holds a shared lock, which the kernel drops when
 * the process dies.  Attach and detach run under an exclusive gate lock, so
 * "am I the only holder?" (an exclusive liveness lock that succeeds without
 * waiting) has a stable answer while we act on it.  Two ways to get them:
 *
 * - Linux: open-file-description (OFD) byte locks on the object itself, byte
 *   LIVE_BYTE for liveness and GATE_BYTE for the gate.  OFD locks, not classic
 *   fcntl locks, because they belong to the open file description (two
 *   attachments in one process count as two) and convert atomically.  The
 *   writer lock is a robust process-shared pthread mutex in the header.
 * - SHX_LOCK_FILES (macOS, the BSDs): shm descriptors take no locks there, so
 *   three small files in a lock directory stand beside each object: NAME.gate,
 *   NAME.live and NAME.lock, each locked with flock().  There are no robust
 *   mutexes either: the writer lock is the flock() on NAME.lock (released by
 *   the kernel at death) plus a pthread mutex for this process's threads, and
 *   an owner word in the header tells the next holder that a writer died.
 *   The live file is the block's identity: it is removed together with the
 *   name, so a holder of an older block never removes a newer one's name.
 *
 * flock() conversions are not atomic (the old lock goes first); that is
 * harmless here because every conversion happens under the gate, and a
 * failed upgrade is followed by taking the shared lock back.
 */
#define _GNU_SOURCE
#include "platform.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
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
#if SHX_LOCK_FILES
#include <sys/file.h>
#endif
#ifdef __APPLE__
#include <dlfcn.h>
#endif

#if !SHX_LOCK_FILES && !defined(F_OFD_SETLK)
#error "this backend needs open file description locks (F_OFD_SETLK, Linux 3.15+)"
#endif

#if SHX_LOCK_FILES
#define OS_NAME_MAX 31      /* PSHMNAMLEN on macOS, the slash included */
#define SHORT_PREFIX 13     /* "/" + 13 + "~" + 16 hex digits = 31 */
#define DEFAULT_LOCK_DIR "/tmp/.shmemext"
#else
#define OS_NAME_MAX 255     /* NAME_MAX of /dev/shm */
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

/* ---- names ---------------------------------------------------------------- */

#if SHX_LOCK_FILES
/* FNV-1a: stable across processes, builds and versions, which is all a short
 * form needs; a collision is caught at attach (see check_full_name). */
static uint64_t name_hash(const char *name)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= UINT64_C(1099511628211);
    }
    return h;
}
#endif

int shx_os_name(const char *name, unsigned flags, char *out, size_t size, shx_error *err)
{
    (void)flags;
    size_t n = strlen(name);
    int written;
    if (1 + n <= OS_NAME_MAX) {
        written = snprintf(out, size, "/%s", name);
    } else {
#if SHX_LOCK_FILES
        written = snprintf(out, size, "/%.*s~%016llx", SHORT_PREFIX, name, (unsigned long long)name_hash(name));
#else
        written = -1;
#endif
    }
    if (written < 0 || (size_t)written >= size)
        return shx_fail(err, SHX_E_NAME, n, OS_NAME_MAX - 1, "is too long for this system");
    return SHX_OK;
}

/* ---- lock primitives ------------------------------------------------------ */

static int busy_errno(int e) { return e == EAGAIN || e == EACCES || e == EWOULDBLOCK; }

#if !SHX_LOCK_FILES
enum { LIVE_BYTE = 0, GATE_BYTE = 1 };

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

/* The liveness lock on descriptor fd: F_RDLCK (attached), F_WRLCK (alone), F_UNLCK. */
static int live_lock(int fd, short type, int wait) { return lock_byte(fd, type, LIVE_BYTE, wait); }
#else
static int flock_retry(int fd, int op)
{
    for (;;) {
        if (flock(fd, op) == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

static int live_lock(int fd, short type, int wait)
{
    int op = type == F_RDLCK ? LOCK_SH : type == F_WRLCK ? LOCK_EX : LOCK_UN;
    return flock_retry(fd, op | (wait ? 0 : LOCK_NB));
}
#endif

/* ---- lock files (SHX_LOCK_FILES) ------------------------------------------ */

#if SHX_LOCK_FILES
enum lock_file { GATE_FILE, LIVE_FILE, WRITER_FILE };
static const char *const lock_suffix[] = {".gate", ".live", ".lock"};

static const char *lock_dir(void)
{
    const char *dir = getenv("SHMEMEXT_LOCK_DIR");
    return dir != NULL && dir[0] != '\0' ? dir : DEFAULT_LOCK_DIR;
}

/* The lock directory is shared by every user, like /tmp itself: made
 * world-writable and sticky, so nobody can remove another user's files. */
static int ensure_lock_dir(shx_error *err)
{
    const char *dir = lock_dir();
    if (mkdir(dir, 01777) == 0) {
        (void)chmod(dir, 01777);   /* mkdir applied the umask */
        return SHX_OK;
    }
    if (errno != EEXIST)
        return shx_fail_os(err, "mkdir of the lock directory");
    struct stat st;
    if (lstat(dir, &st) != 0)
        return shx_fail_os(err, "lstat of the lock directory");
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return shx_fail_os(err, "the lock directory");
    }
    return SHX_OK;
}

static int lock_path(char *out, size_t size, const char *os_name, enum lock_file which, shx_error *err)
{
    int n = snprintf(out, size, "%s/%s%s", lock_dir(), os_name + 1, lock_suffix[which]);
    if (n < 0 || (size_t)n >= size) {
        errno = ENAMETOOLONG;
        return shx_fail_os(err, "the lock directory");
    }
    return SHX_OK;
}

/* Opens (creating) a lock file.  flock() needs no write access, so a user
 * who may only read the block can still count as attached. */
static int open_lock_file(const char *path, unsigned mode, int writable)
{
    int fd;
    do {
        fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CREAT | O_CLOEXEC | O_NOFOLLOW, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0 && writable && errno == EACCES)
        return open_lock_file(path, mode, 0);
    if (fd >= 0) {
        struct stat st;
        /* open() applied the umask; the block's mode is what was asked for. */
        if (fstat(fd, &st) == 0 && st.st_uid == geteuid() && (st.st_mode & 07777) != (mode & 07777))
            (void)fchmod(fd, (mode_t)mode);
    }
    return fd;
}

/* Takes the gate: an exclusive flock() on NAME.gate.  The last detacher
 * removes the gate file while holding it, so a lock won on a file that is no
 * longer linked is worthless: open the new one and try again. */
static int gate_take(shx_os_map *m, unsigned mode, shx_error *err)
{
    char path[1024];
    int rc;
    if ((rc = ensure_lock_dir(err)) != SHX_OK || (rc = lock_path(path, sizeof path, m->os_name, GATE_FILE, err)) != SHX_OK)
        return rc;
    for (;;) {
        int fd = open_lock_file(path, mode, 0);
        if (fd < 0)
            return shx_fail_os(err, "open of the gate lock file");
        struct stat st;
        if (flock_retry(fd, LOCK_EX) != 0 || fstat(fd, &st) != 0) {
            rc = shx_fail_os(err, "flock of the gate lock file");
            close(fd);
            return rc;
        }
        if (st.st_nlink > 0) {
            m->gate_fd = fd;
            return SHX_OK;
        }
        close(fd);
    }
}

static void gate_release(shx_os_map *m)
{
    if (m->gate_fd >= 0)
        close(m->gate_fd);
    m->gate_fd = -1;
}

/* Under the gate: removes a block's lock files, the gate's last, so that
 * nobody takes a fresh gate while the others are still there. */
static void unlink_lock_files(const char *os_name)
{
    static const enum lock_file order[] = {LIVE_FILE, WRITER_FILE, GATE_FILE};
    char path[1024];
    shx_error ignored;
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        if (lock_path(path, sizeof path, os_name, order[i], &ignored) == SHX_OK)
            (void)unlink(path);
    }
}

/* Under the gate: removes the name and, with it, the lock files. */
static int remove_names(const char *os_name, shx_error *err)
{
    int rc = shm_unlink(os_name) != 0 && errno != ENOENT ? shx_fail_os(err, "shm_unlink") : SHX_OK;
    unlink_lock_files(os_name);
    return rc;
}

/* Under the gate: removes lock files that no block holder uses any more,
 * those of a failed first attach or of a name unlinked while we held it.  A
 * live file nobody holds guards nothing (a persistent block's are made anew
 * at its next attach); one somebody holds stays, with the others. */
static void drop_unused_lock_files(shx_os_map *m)
{
    char path[1024];
    shx_error ignored;
    struct stat mine, linked;
    if (lock_path(path, sizeof path, m->os_name, LIVE_FILE, &ignored) != SHX_OK)
        return;
    if (stat(path, &linked) == 0) {
        int fd = -1, unused;
        if (m->fd >= 0 && fstat(m->fd, &mine) == 0 && mine.st_dev == linked.st_dev && mine.st_ino == linked.st_ino) {
            unused = flock_retry(m->fd, LOCK_EX | LOCK_NB) == 0;
        } else {
            fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
            unused = fd >= 0 && flock_retry(fd, LOCK_EX | LOCK_NB) == 0;
        }
        if (fd >= 0)
            close(fd);
        if (!unused)
            return;
    } else if (errno != ENOENT) {
        return;
    }
    unlink_lock_files(m->os_name);
}

/* Long names share a short form with every other name of the same prefix and
 * hash.  The live file remembers the full name of its block, so a collision
 * is an error instead of two names silently sharing one block. */
static int check_full_name(int fd, const char *name, shx_error *err)
{
    char stored[256];
    size_t n = strlen(name);
    ssize_t got = pread(fd, stored, sizeof stored - 1, 0);
    if (got < 0)
        return shx_fail_os(err, "read of the live lock file");
    if (got == 0) {
        if (pwrite(fd, name, n, 0) != (ssize_t)n && errno != EBADF)
            return shx_fail_os(err, "write of the live lock file");
        return SHX_OK;
    }
    if ((size_t)got != n || memcmp(stored, name, n) != 0) {
        errno = EEXIST;
        shx_fail_os(err, "shm_open");
        err->detail = "another block name has the same short OS name (a hash collision): choose another name";
        return SHX_E_OS;
    }
    return SHX_OK;
}
#endif

/* ---- the process registry: fork() and exit ----------------------------- */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static shx_os_map *attached_head;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

#if !SHX_LOCK_FILES
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

/* A new open file description for the object behind m->fd. */
static int open_same_object(const shx_os_map *m)
{
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

static int open_liveness_again(const shx_os_map *m) { return open_same_object(m); }
#else
/* Opens a lock file of m's anew, if it is still the one m has. */
static int open_lock_file_again(const shx_os_map *m, enum lock_file which, int fd_now)
{
    char path[1024];
    shx_error ignored;
    struct stat now, again;
    if (fd_now < 0 || lock_path(path, sizeof path, m->os_name, which, &ignored) != SHX_OK || fstat(fd_now, &now) != 0)
        return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd >= 0 && (fstat(fd, &again) != 0 || again.st_dev != now.st_dev || again.st_ino != now.st_ino)) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static int open_liveness_again(const shx_os_map *m) { return open_lock_file_again(m, LIVE_FILE, m->fd); }
#endif

/* A fork() child shares its parent's open file descriptions, and with them the
 * liveness locks: the parent's detach would then count the child out.  So,
 * before fork(), the parent opens each attached object anew and locks it; the
 * child keeps that descriptor as its own and the parent closes its copy.
 * Doing it before the fork leaves no window in which the parent could detach
 * as the last holder while the child is still on its way.  With lock files the
 * writer lock is a flock() too, so the child gets its own writer descriptor
 * as well: sharing the parent's would let both hold the lock at once. */
static int reopen_same_object(const shx_os_map *m)
{
    int fd = open_liveness_again(m);
    if (fd >= 0 && live_lock(fd, F_RDLCK, 0) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

#if SHX_LOCK_FILES
static void forget_all_held(void);
#endif

static void registry_prepare(void)
{
    pthread_mutex_lock(&registry_lock);
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached) {
        m->fork_fd = reopen_same_object(m);
#if SHX_LOCK_FILES
        m->writer_fork_fd = open_lock_file_again(m, WRITER_FILE, m->writer_fd);
#endif
    }
}

static void registry_parent(void)
{
    for (shx_os_map *m = attached_head; m != NULL; m = m->next_attached) {
        if (m->fork_fd >= 0)
            close(m->fork_fd);
        m->fork_fd = -1;
#if SHX_LOCK_FILES
        if (m->writer_fork_fd >= 0)
            close(m->writer_fork_fd);
        m->writer_fork_fd = -1;
#endif
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
#if SHX_LOCK_FILES
        /* Without a description of its own the child must not write at all
         * (shx_os_lock refuses), rather than share the parent's lock. */
        if (m->writer_fd >= 0)
            close(m->writer_fd);
        m->writer_fd = m->writer_fork_fd;
        m->writer_fork_fd = -1;
        /* Only the forking thread lives on: whatever other threads held is free. */
        (void)pthread_mutex_init(&m->local_writer, NULL);
        m->next_held = NULL;
#endif
    }
#if SHX_LOCK_FILES
    forget_all_held();
#endif
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

/* ---- the gate and the names, per liveness mechanism ----------------------- */

#if !SHX_LOCK_FILES
static int gate_enter(shx_os_map *m, shx_error *err)
{
    return lock_byte(m->fd, F_WRLCK, GATE_BYTE, 1) == 0 ? SHX_OK : shx_fail_os(err, "fcntl");
}

static void gate_leave(shx_os_map *m) { (void)lock_byte(m->fd, F_UNLCK, GATE_BYTE, 0); }

/* Opens (creating) the object and takes the gate on it. */
static int open_and_gate(shx_os_map *m, unsigned mode, shx_error *err)
{
    int fd;
    do {
        fd = shm_open(m->os_name, O_RDWR | O_CREAT, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return shx_fail_os(err, "shm_open");
    m->fd = m->object_fd = fd;
    return gate_enter(m, err);
}

/* A descriptor for mmap of its own: a mapping keeps the description it was
 * made from alive, and with it any lock on it, so mapping m->fd itself would
 * let a forked child's inherited mapping hold our liveness lock after we died. */
static int mapping_fd(const shx_os_map *m) { return open_same_object(m); }

static int forget_names(const shx_os_map *m, shx_error *err)
{
    return shm_unlink(m->os_name) != 0 && errno != ENOENT ? shx_fail_os(err, "shm_unlink") : SHX_OK;
}

/* Empties an object nobody else holds, to be sized and initialized anew. */
static int empty_object(shx_os_map *m, unsigned mode, shx_error *err)
{
    (void)mode;
    return ftruncate(m->object_fd, 0) == 0 ? SHX_OK : shx_fail_os(err, "ftruncate");
}

static void close_descriptors(shx_os_map *m)
{
    if (m->fd >= 0)
        close(m->fd);   /* drops every lock we took */
    m->fd = m->object_fd = -1;
}
#else
static int gate_enter(shx_os_map *m, shx_error *err) { return gate_take(m, m->mode, err); }
static void gate_leave(shx_os_map *m) { gate_release(m); }

static int open_shm_object(const char *os_name, int oflag, unsigned mode)
{
    int fd;
    do {
        /* No O_CLOEXEC here: newer macOS refuses shm_open flags beyond POSIX's. */
        fd = shm_open(os_name, oflag, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    if (fd >= 0)
        (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

/* Takes the gate, then opens the lock files and the object under it. */
static int open_and_gate(shx_os_map *m, unsigned mode, shx_error *err)
{
    char path[1024];
    int rc;
    if ((rc = gate_take(m, mode, err)) != SHX_OK)
        return rc;
    if ((rc = lock_path(path, sizeof path, m->os_name, LIVE_FILE, err)) != SHX_OK)
        return rc;
    if ((m->fd = open_lock_file(path, mode, 1)) < 0)
        return shx_fail_os(err, "open of the live lock file");
    if ((rc = lock_path(path, sizeof path, m->os_name, WRITER_FILE, err)) != SHX_OK)
        return rc;
    if ((m->writer_fd = open_lock_file(path, mode, 0)) < 0)
        return shx_fail_os(err, "open of the writer lock file");
    if ((m->object_fd = open_shm_object(m->os_name, O_RDWR | O_CREAT, mode)) < 0)
        return shx_fail_os(err, "shm_open");
    return SHX_OK;
}

/* The object's descriptor carries no locks: mapping a copy of it is safe. */
static int mapping_fd(const shx_os_map *m) { return dup(m->object_fd); }

static int forget_names(const shx_os_map *m, shx_error *err) { return remove_names(m->os_name, err); }

/* macOS lets an object be sized only once: an object to start afresh is
 * replaced by a new one under the same name (we hold the gate and are alone). */
static int empty_object(shx_os_map *m, unsigned mode, shx_error *err)
{
    if (shm_unlink(m->os_name) != 0 && errno != ENOENT)
        return shx_fail_os(err, "shm_unlink");
    close(m->object_fd);
    if ((m->object_fd = open_shm_object(m->os_name, O_RDWR | O_CREAT | O_EXCL, mode)) < 0)
        return shx_fail_os(err, "shm_open");
    return SHX_OK;
}

static void close_descriptors(shx_os_map *m)
{
    int *fds[] = {&m->object_fd, &m->fd, &m->writer_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
    gate_release(m);
}
#endif

/* ---- attach / detach --------------------------------------------------- */

static int map_object(shx_os_map *m, size_t size, shx_error *err)
{
    m->base = NULL;
    m->size = 0;
    if (size == 0)
        return SHX_OK;
    int fd = mapping_fd(m);
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
     * Failing here only means another user made the name (or, on macOS, that
     * shm objects take no fchmod): keep what there is. */
    (void)fchmod(fd, (mode_t)mode);
#ifndef __APPLE__   /* macOS has no posix_fallocate */
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
#endif
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
static int attach_locked(shx_os_map *m, const char *name, size_t size, unsigned mode, unsigned flags,
                         shx_prepare_fn prepare, void *ctx, int *created, shx_error *err)
{
    struct stat live, object;
    size_t existing = 0;
    int rc;

    if (fstat(m->fd, &live) != 0 || fstat(m->object_fd, &object) != 0)
        return shx_fail_os(err, "fstat");
    if (live.st_nlink == 0)
        return SHX_REINIT;
    if ((flags & SHX_OPEN_REQUIRE_OWNER) && object.st_uid != geteuid())
        return shx_fail(err, SHX_E_NOTOWNER, (uint64_t)object.st_uid, (uint64_t)geteuid(), NULL);
    m->dev = (uint64_t)live.st_dev;
    m->ino = (uint64_t)live.st_ino;
#if SHX_LOCK_FILES
    if ((rc = check_full_name(m->fd, name, err)) != SHX_OK)
        return rc;
#else
    (void)name;
#endif
    if ((rc = stat_size(&object, &existing, err)) != SHX_OK)
        return rc;

    if (live_lock(m->fd, F_WRLCK, 0) != 0) {
        if (!busy_errno(errno))
            return shx_fail_os(err, "liveness lock");
        /* Others hold it.  No exclusive holder can exist while we hold the gate. */
        if (live_lock(m->fd, F_RDLCK, 1) != 0)
            return shx_fail_os(err, "liveness lock");
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
            if ((rc = empty_object(m, mode, err)) != SHX_OK)
                return rc;
            state = SHX_ATTACH_FRESH;
        } else if (rc != SHX_OK) {
            return rc;
        }
    }
    if (state == SHX_ATTACH_FRESH) {
        rc = size_fresh_object(m->object_fd, size, mode, err);
        if (rc == SHX_OK)
            rc = map_object(m, size, err);
        if (rc == SHX_OK)
            rc = prepare(ctx, m, SHX_ATTACH_FRESH, err);
        if (rc != SHX_OK) {
            /* Leave no half-made block behind; we hold it alone, so the name is ours. */
            shx_error ignored;
            (void)forget_names(m, &ignored);
            return rc;
        }
        *created = 1;
    }
    if (live_lock(m->fd, F_RDLCK, 0) != 0)
        return shx_fail_os(err, "liveness lock");
    return SHX_OK;
}

static void clear_map(shx_os_map *m)
{
    memset(m, 0, sizeof *m);
    m->fd = m->object_fd = m->fork_fd = -1;
#if SHX_LOCK_FILES
    m->gate_fd = m->writer_fd = m->writer_fork_fd = -1;
#endif
}

int shx_os_attach(shx_os_map *m, const char *name, size_t size, unsigned mode, unsigned flags,
                  const char *security, shx_prepare_fn prepare, void *ctx, int *created, shx_error *err)
{
    int rc;
    clear_map(m);
    *created = 0;
    if (security != NULL) {
        errno = EINVAL;
        return shx_fail_os(err, "security descriptors are a Windows option");
    }
    if ((rc = shx_os_name(name, flags, m->os_name, sizeof m->os_name, err)) != SHX_OK)
        return rc;
#if SHX_LOCK_FILES
    m->mode = mode;
    if ((rc = pthread_mutex_init(&m->local_writer, NULL)) != 0) {
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_init");
    }
#endif

    for (;;) {
        registry_enter();
        rc = open_and_gate(m, mode, err);
        if (rc == SHX_OK)
            rc = attach_locked(m, name, size, mode, flags, prepare, ctx, created, err);
        if (rc == SHX_OK) {
            gate_leave(m);
#if SHX_LOCK_FILES
            close(m->object_fd);   /* the mapping keeps the object */
            m->object_fd = -1;
#endif
            registry_add(m);
            registry_leave();
            return SHX_OK;
        }
        unmap_object(m);
#if SHX_LOCK_FILES
        if (m->gate_fd >= 0 && rc != SHX_REINIT)
            drop_unused_lock_files(m);
#endif
        close_descriptors(m);
        registry_leave();
        *created = 0;
        if (rc != SHX_REINIT) {
#if SHX_LOCK_FILES
            (void)pthread_mutex_destroy(&m->local_writer);
#endif
            return rc;
        }
    }
}

int shx_os_detach(shx_os_map *m, shx_keep_name_fn keep_name, int at_exit, shx_error *err)
{
    int rc = SHX_OK;
    if (m->fd < 0)
        return SHX_OK;
    registry_enter();
    registry_remove(m);
    if ((rc = gate_enter(m, err)) == SHX_OK) {
        if (!m->keep_name && live_lock(m->fd, F_WRLCK, 0) == 0) {
            /* We are the last holder.  A linked object's name is still ours to remove;
             * an unlinked one's name may already belong to a newer block. */
            struct stat st;
            if (fstat(m->fd, &st) != 0)
                rc = shx_fail_os(err, "fstat");
            else if (st.st_nlink > 0 && !(keep_name != NULL && keep_name(m)))
                rc = forget_names(m, err);
#if SHX_LOCK_FILES
            else if (st.st_nlink == 0)
                drop_unused_lock_files(m);   /* the gate file we may have made anew */
#endif
        }
        /* Stop counting before the gate opens: a detacher waiting for it must
         * not find our shared lock still there, or neither of us removes the name. */
        (void)live_lock(m->fd, F_UNLCK, 0);
        gate_leave(m);
    }
    if (!at_exit)
        unmap_object(m);
#if SHX_LOCK_FILES
    if (m->writer_fd >= 0)
        close(m->writer_fd);
    m->writer_fd = -1;
    if (!at_exit)   /* at exit other threads may still be inside the lock calls */
        (void)pthread_mutex_destroy(&m->local_writer);
#endif
    if (close(m->fd) != 0 && rc == SHX_OK && errno != EINTR)
        rc = shx_fail_os(err, "close");
    m->fd = -1;
    registry_leave();
    return rc;
}

int shx_os_unlink(const char *name, shx_error *err)
{
    shx_os_map m;
    int rc;
    clear_map(&m);
    if ((rc = shx_os_name(name, 0, m.os_name, sizeof m.os_name, err)) != SHX_OK)
        return rc;
#if SHX_LOCK_FILES
    /* Under the gate, and the lock files go with the name: holders of the
     * unlinked block then see their live file unlinked and leave names alone. */
    if ((rc = gate_take(&m, 0600, err)) != SHX_OK)
        return rc;
    rc = shm_unlink(m.os_name) == 0 ? SHX_OK : shx_fail_os(err, "shm_unlink");
    unlink_lock_files(m.os_name);
    gate_release(&m);
    return rc;
#else
    if (shm_unlink(m.os_name) != 0)
        return shx_fail_os(err, "shm_unlink");
    return SHX_OK;
#endif
}

int shx_os_sole_holder(shx_os_map *m, int *alone, shx_error *err)
{
    int rc;
    *alone = 0;
    if (m->fd < 0)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    registry_enter();
    if ((rc = gate_enter(m, err)) != SHX_OK) {
        registry_leave();
        return rc;
    }
    if (live_lock(m->fd, F_WRLCK, 0) == 0)
        *alone = 1;
    else if (!busy_errno(errno))
        rc = shx_fail_os(err, "liveness lock");
    /* Back to shared; a failed flock() upgrade has already dropped it. */
    if (live_lock(m->fd, F_RDLCK, 0) != 0 && rc == SHX_OK)
        rc = shx_fail_os(err, "liveness lock");
    gate_leave(m);
    registry_leave();
    return rc;
}

#if !SHX_LOCK_FILES
/* ---- the writer lock: a robust pthread mutex in the header (Linux) ---- */

_Static_assert(sizeof(pthread_mutex_t) <= SHX_LOCK_AREA, "pthread mutex does not fit the lock area");

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

#else
/* ---- the writer lock: flock() on NAME.lock (SHX_LOCK_FILES) --------------- */

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
        (void)flock_retry(m->writer_fd, LOCK_UN);
        (void)pthread_mutex_unlock(&m->local_writer);
    }
}

static void make_held_key(void) { (void)pthread_key_create(&held_key, release_abandoned); }

/* In a fork() child: the locks were the parent's, and are not held here. */
static void forget_all_held(void)
{
    (void)pthread_once(&held_key_once, make_held_key);
    (void)pthread_setspecific(held_key, NULL);
}

static void remember_held(shx_os_map *m)
{
    (void)pthread_once(&held_key_once, make_held_key);
    m->next_held = (shx_os_map *)pthread_getspecific(held_key);
    (void)pthread_setspecific(held_key, m);
}

/* Whether the calling thread holds m's writer lock: its own list says, which
 * no other thread writes, so there is nothing to race with. */
static int held_by_this_thread(const shx_os_map *m)
{
    (void)pthread_once(&held_key_once, make_held_key);
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

int shx_os_lock_init(shx_os_map *m, void *area, shx_error *err)
{
    (void)m;
    (void)err;
    file_writer_area *a = (file_writer_area *)area;
    memcpy(a->marker, WRITER_MARKER, sizeof WRITER_MARKER);
    __atomic_store_n(&a->owner, 0, __ATOMIC_RELEASE);
    return SHX_OK;
}

int shx_os_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err)
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
        if (flock(m->writer_fd, LOCK_EX | LOCK_NB) == 0)
            break;
        if (errno != EINTR && !busy_errno(errno)) {
            rc = shx_fail_os(err, "flock");
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

int shx_os_unlock(shx_os_map *m, void *area, shx_error *err)
{
    file_writer_area *a = (file_writer_area *)area;
    if (!held_by_this_thread(m)) {
        errno = EPERM;
        return shx_fail_os(err, "writer unlock");
    }
    __atomic_store_n(&a->owner, 0, __ATOMIC_RELEASE);
    forget_held(m);
    int rc = flock_retry(m->writer_fd, LOCK_UN) == 0 ? SHX_OK : shx_fail_os(err, "flock");
    (void)pthread_mutex_unlock(&m->local_writer);
    return rc;
}

#endif

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
    return SHX_OK;   /* woken, changed already, interrupted: the caller looks again */
}

void shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)m;
    (void)waiters;
    (void)pthread_once(&sync_once, find_os_sync);
    if (sync_wake != NULL)
        (void)sync_wake(addr, sizeof(uint32_t), OS_SYNC_SHARED);
}
#else
int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns)
{
    (void)m;
    return poll_word(addr, expected, timeout_ns);
}

void shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)m;
    (void)addr;
    (void)waiters;
}
#endif
