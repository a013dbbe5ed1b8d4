/* The lock-file backend (macOS, the BSDs; Linux when built with
 * SHMEMEXT_LOCK_FILES=1): shm_open + mmap, with liveness, the attach gate and
 * the writer lock kept by flock() on small lock files beside the object.
 *
 * shm descriptors take no locks there, so three files in a lock directory
 * stand beside each object: NAME.gate, NAME.live and NAME.lock.  Every
 * attachment holds a shared lock on NAME.live, which the kernel drops when
 * the process dies; attach and detach run under an exclusive lock on
 * NAME.gate, so "am I the only holder?" (an exclusive liveness lock that
 * succeeds without waiting) has a stable answer while we act on it.  There
 * are no robust mutexes either: the writer lock is the flock() on NAME.lock
 * plus a pthread mutex for this process's threads, and an owner word in the
 * header tells the next holder that a writer died.  The live file is the
 * block's identity: it is removed together with the name, so a holder of an
 * older block never removes a newer one's name.
 *
 * The kernel cannot free such memory by itself when its last holder dies, so
 * every attach reaps, under its own gate, this user's blocks whose liveness
 * lock nobody holds (and that are not persistent): a crash's memory comes
 * back at the next use of shmemext by any process of the user.
 *
 * flock() conversions are not atomic (the old lock goes first); that is
 * harmless here because every conversion happens under the gate, and a
 * failed upgrade is followed by taking the shared lock back.
 */
#define _GNU_SOURCE
#include "platform_posix.h"

#if !SHX_LOCK_FILES
#error "platform_lockfiles.c is the backend of SHX_LOCK_FILES builds"
#endif

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
#include <dirent.h>
#include <sys/file.h>

#define OS_NAME_MAX      31 /* PSHMNAMLEN on macOS, the slash included */
#define SHORT_PREFIX     13 /* "/" + 13 + "~" + 16 hex digits = 31 */
#define DEFAULT_LOCK_DIR "/tmp/.shmemext"

/* ---- names ---------------------------------------------------------------- */

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

int shx_os_name(const char *name, unsigned flags, char *out, size_t size, shx_error *err)
{
    (void)flags;
    size_t n = strlen(name);
    int written;
    if (1 + n <= OS_NAME_MAX) {
        written = snprintf(out, size, "/%s", name);
    } else {
        written = snprintf(out, size, "/%.*s~%016llx", SHORT_PREFIX, name, (unsigned long long)name_hash(name));
    }
    if (written < 0 || (size_t)written >= size)
        return shx_fail(err, SHX_E_NAME, n, OS_NAME_MAX - 1, "is too long for this system");
    return SHX_OK;
}

/* ---- lock primitives ------------------------------------------------------ */

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

/* ---- lock files (SHX_LOCK_FILES) ------------------------------------------ */

enum lock_file { GATE_FILE, LIVE_FILE, WRITER_FILE };
static const char *const lock_suffix[] = {".gate", ".live", ".lock"};

static const char *lock_dir(void)
{
    const char *dir = getenv("SHMEMEXT_LOCK_DIR");
    return dir != NULL && dir[0] != '\0' ? dir : DEFAULT_LOCK_DIR;
}

/* Lock files live in a directory of the block's owner, <lock dir>/u<uid>,
 * that only its owner may write (0711: others may open the lock files of its
 * shared blocks by name, never create, remove or replace one).  The lock
 * directory itself is shared by every user, like /tmp (world-writable and
 * sticky); whoever made it, a per-user directory is trusted only when it is
 * a real directory of its user's that nobody else can write. */
static int owner_dir(char *out, size_t size, uint32_t owner, shx_error *err)
{
    const char *base = lock_dir();
    int n = snprintf(out, size, "%s/u%lu", base, (unsigned long)owner);
    if (n < 0 || (size_t)n >= size) {
        errno = ENAMETOOLONG;
        return shx_fail_os(err, "the lock directory");
    }
    if (owner == (uint32_t)geteuid()) {
        if (mkdir(base, 01777) == 0)
            (void)chmod(base, 01777); /* mkdir applied the umask */
        else if (errno != EEXIST)
            return shx_fail_os(err, "mkdir of the lock directory");
        if (mkdir(out, 0711) == 0)
            (void)chmod(out, 0711);
        else if (errno != EEXIST)
            return shx_fail_os(err, "mkdir of the lock directory");
    }
    struct stat st;
    if (lstat(out, &st) != 0)
        return shx_fail_os(err, "lstat of the lock directory");
    if (!S_ISDIR(st.st_mode) || st.st_uid != owner || (st.st_mode & 022) != 0) {
        /* Named in full: this is the user's way out. */
        static __thread char why[768];
        snprintf(why, sizeof why,
                 "its lock directory %s cannot be trusted: it is %s owned by uid %lu%s, where a directory of uid %lu "
                 "that no one else may write was expected; remove it (it may have been planted) or point "
                 "SHMEMEXT_LOCK_DIR elsewhere",
                 out,
                 S_ISDIR(st.st_mode)   ? "a directory"
                 : S_ISLNK(st.st_mode) ? "a symbolic link"
                                       : "not a directory",
                 (unsigned long)st.st_uid, (st.st_mode & 022) ? " and writable by others" : "", (unsigned long)owner);
        errno = EPERM;
        shx_fail_os(err, "the lock directory");
        err->detail = why;
        return SHX_E_OS;
    }
    return SHX_OK;
}

static int lock_path(char *out, size_t size, uint32_t owner, const char *os_name, enum lock_file which, shx_error *err)
{
    char dir[900];
    int rc = owner_dir(dir, sizeof dir, owner, err);
    if (rc != SHX_OK)
        return rc;
    int n = snprintf(out, size, "%s/%s%s", dir, os_name + 1, lock_suffix[which]);
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
static int try_exclusive(int fd) { return flock_retry(fd, LOCK_EX | LOCK_NB); }

static int gate_take(shx_os_map *m, unsigned mode, const shx_os_interrupt *intr, shx_error *err)
{
    char path[1024];
    int rc;
    if ((rc = lock_path(path, sizeof path, m->lock_owner, m->os_name, GATE_FILE, err)) != SHX_OK)
        return rc;
    for (;;) {
        int fd = open_lock_file(path, mode, 0);
        if (fd < 0)
            return shx_fail_os(err, "open of the gate lock file");
        struct stat st;
        int got = intr != NULL && intr->interrupted != NULL ? shx_posix_poll_lock(try_exclusive, fd, intr)
                                                            : flock_retry(fd, LOCK_EX);
        if (got != 0 || fstat(fd, &st) != 0) {
            rc = got == -2 ? shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL)
                           : shx_fail_os(err, "flock of the gate lock file");
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
static void unlink_lock_files(uint32_t owner, const char *os_name)
{
    static const enum lock_file order[] = {LIVE_FILE, WRITER_FILE, GATE_FILE};
    char path[1024];
    shx_error ignored;
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        if (lock_path(path, sizeof path, owner, os_name, order[i], &ignored) == SHX_OK)
            (void)unlink(path);
    }
}

/* Under the gate: removes the name and, with it, the lock files. */
static int remove_names(uint32_t owner, const char *os_name, shx_error *err)
{
    int rc = shm_unlink(os_name) != 0 && errno != ENOENT ? shx_fail_os(err, "shm_unlink") : SHX_OK;
    unlink_lock_files(owner, os_name);
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
    if (lock_path(path, sizeof path, m->lock_owner, m->os_name, LIVE_FILE, &ignored) != SHX_OK)
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
    unlink_lock_files(m->lock_owner, m->os_name);
}

/* Long names share a short form with every other name of the same prefix and
 * hash.  The live file remembers the full name of its block, so a collision
 * is an error instead of two names silently sharing one block. */
static int check_full_name(int fd, const char *name, int *recorded, shx_error *err)
{
    char stored[256];
    size_t n = strlen(name);
    ssize_t got = pread(fd, stored, sizeof stored - 1, 0);
    if (got < 0)
        return shx_fail_os(err, "read of the live lock file");
    *recorded = got > 0;
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

/* ---- fork() ------------------------------------------------------------ */

/* Opens a lock file of m's anew, if it is still the one m has. */
static int open_lock_file_again(const shx_os_map *m, enum lock_file which, int fd_now)
{
    char path[1024];
    shx_error ignored;
    struct stat now, again;
    if (fd_now < 0 || lock_path(path, sizeof path, m->lock_owner, m->os_name, which, &ignored) != SHX_OK ||
        fstat(fd_now, &now) != 0)
        return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd >= 0 && (fstat(fd, &again) != 0 || again.st_dev != now.st_dev || again.st_ino != now.st_ino)) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* A fork() child shares its parent's open file descriptions, and with them the
 * liveness locks: the parent's detach would then count the child out.  So,
 * before fork(), the parent opens each attached object's live file anew and
 * locks it; the child keeps that descriptor as its own and the parent closes
 * its copy.  Doing it before the fork leaves no window in which the parent
 * could detach as the last holder while the child is still on its way.  The
 * writer lock is a flock() too, so the child gets its own writer descriptor
 * as well: sharing the parent's would let both hold the lock at once. */
static int reopen_live_file(const shx_os_map *m)
{
    int fd = open_lock_file_again(m, LIVE_FILE, m->fd);
    if (fd >= 0 && live_lock(fd, F_RDLCK, 0) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

void shx_posix_fork_prepare(shx_os_map *m)
{
    m->fork_fd = reopen_live_file(m);
    m->writer_fork_fd = open_lock_file_again(m, WRITER_FILE, m->writer_fd);
}

void shx_posix_fork_parent(shx_os_map *m)
{
    if (m->fork_fd >= 0)
        close(m->fork_fd);
    else
        /* The child could get no live file of its own (short of descriptors,
         * say) and counts through ours, which we cannot tell from our own:
         * our detach must not remove the name while it may still use the
         * block.  The name stays until the reaper finds the block unheld. */
        m->keep_name = 1;
    m->fork_fd = -1;
    shx_posix_writer_fork_parent(m);
}

void shx_posix_fork_child(shx_os_map *m)
{
    if (m->fork_fd >= 0) {
        close(m->fd);
        m->fd = m->fork_fd;
    } else {
        /* We still count through the shared lock, but cannot tell our
         * parent's detach from ours: never remove the name from here. */
        m->keep_name = 1;
    }
    m->fork_fd = -1;
    shx_posix_writer_fork_child(m);
}

/* ---- the gate and the names, per liveness mechanism ----------------------- */

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
/* Whose directory holds the lock files of os_name: its object's owner, or
 * ours when there is no object yet (we would create it). */
static int find_lock_owner(const char *os_name, uint32_t *owner, shx_error *err)
{
    int fd = open_shm_object(os_name, O_RDONLY, 0);
    struct stat st;
    *owner = (uint32_t)geteuid();
    if (fd < 0)
        return errno == ENOENT || errno == EACCES ? SHX_OK : shx_fail_os(err, "shm_open");
    if (fstat(fd, &st) == 0)
        *owner = (uint32_t)st.st_uid;
    close(fd);
    return SHX_OK;
}

static int open_and_gate(shx_os_map *m, unsigned mode, unsigned flags, const shx_os_interrupt *intr, shx_error *err)
{
    char path[1024];
    int rc;
    if ((rc = find_lock_owner(m->os_name, &m->lock_owner, err)) != SHX_OK)
        return rc;
    if ((flags & SHX_OPEN_REQUIRE_OWNER) && m->lock_owner != (uint32_t)geteuid())
        return shx_fail(err, SHX_E_NOTOWNER, m->lock_owner, (uint64_t)geteuid(), NULL);
    if ((rc = gate_take(m, mode, intr, err)) != SHX_OK)
        return rc;
    if ((rc = lock_path(path, sizeof path, m->lock_owner, m->os_name, LIVE_FILE, err)) != SHX_OK)
        return rc;
    if ((m->fd = open_lock_file(path, mode, 1)) < 0)
        return shx_fail_os(err, "open of the live lock file");
    if ((rc = lock_path(path, sizeof path, m->lock_owner, m->os_name, WRITER_FILE, err)) != SHX_OK)
        return rc;
    if ((m->writer_fd = open_lock_file(path, mode, 0)) < 0)
        return shx_fail_os(err, "open of the writer lock file");
    if ((m->object_fd = open_shm_object(m->os_name, O_RDWR | O_CREAT, mode)) < 0)
        return shx_fail_os(err, "shm_open");
    struct stat st;
    if (fstat(m->object_fd, &st) != 0)
        return shx_fail_os(err, "fstat");
    if ((uint32_t)st.st_uid != m->lock_owner)
        return SHX_REINIT; /* another user made the object meanwhile: its lock files are elsewhere */
    return SHX_OK;
}

/* The object's descriptor carries no locks: mapping a copy of it is safe. */
static int mapping_fd(const shx_os_map *m) { return dup(m->object_fd); }

static int forget_names(const shx_os_map *m, shx_error *err) { return remove_names(m->lock_owner, m->os_name, err); }

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

/* ---- attach / detach --------------------------------------------------- */

static void reap_dead_blocks(const char *attaching);

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
#ifndef __APPLE__ /* macOS has no posix_fallocate */
    int rc;
    do {
        rc = posix_fallocate(fd, 0, (off_t)size);
    } while (rc == EINTR);
    if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
        errno = rc;
        shx_fail_os(err, "posix_fallocate");
        err->a = (uint64_t)size; /* named in the message: how much did not fit */
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

static int starts_with_magic(int fd)
{
    char head[8];
    return pread(fd, head, sizeof head, 0) == (ssize_t)sizeof head && memcmp(head, SHX_MAGIC, sizeof head) == 0;
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
    int recorded = 0;
    if ((rc = check_full_name(m->fd, name, &recorded, err)) != SHX_OK)
        return rc;
    if ((rc = stat_size(&object, &existing, err)) != SHX_OK)
        return rc;
    if (!recorded && existing > 0 && !starts_with_magic(m->object_fd)) {
        /* No attach of ours ever knew this name (its live file is new), yet
         * an object is there: another program's, never an unfinished block
         * of ours to start afresh, whatever its first bytes. */
        return shx_fail(err, SHX_E_FOREIGN, 0, 0, "was made by another program");
    }

    if (live_lock(m->fd, F_WRLCK, 0) != 0) {
        if (!shx_posix_busy(errno))
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
        if (rc == SHX_REINIT && (flags & SHX_OPEN_EXISTING)) {
            unmap_object(m);
            state = SHX_ATTACH_FRESH; /* dead: refused below, as a missing one is */
        } else if (rc == SHX_REINIT) {
            unmap_object(m);
            if ((rc = empty_object(m, mode, err)) != SHX_OK)
                return rc;
            state = SHX_ATTACH_FRESH;
        } else if (rc != SHX_OK) {
            return rc;
        }
    }
    if (state == SHX_ATTACH_FRESH && (flags & SHX_OPEN_EXISTING)) {
        /* The object open_and_gate made (or a dead one) goes again; we hold it
         * alone.  Its lock files go in shx_os_attach, gate last. */
        (void)shm_unlink(m->os_name);
        return shx_fail(err, SHX_E_NOTFOUND, 0, 0, NULL);
    }
    if (state == SHX_ATTACH_FRESH) {
        rc = size_fresh_object(m->object_fd, size, mode, err);
        if (rc == SHX_OK)
            rc = map_object(m, size, err);
        if (rc == SHX_OK)
            rc = prepare(ctx, m, SHX_ATTACH_FRESH, err);
        if (rc != SHX_OK) {
            /* Leave no half-made block behind; we hold it alone, so the name is
             * ours.  The lock files go in shx_os_attach, the gate last: removed
             * here, a newcomer could take a new gate while we still work. */
            (void)shm_unlink(m->os_name);
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
    m->gate_fd = m->writer_fd = m->writer_fork_fd = -1;
}

int shx_os_attach(shx_os_map *m, const char *name, size_t size, unsigned mode, unsigned flags, const char *security,
                  shx_prepare_fn prepare, void *ctx, const shx_os_interrupt *intr, int *created, shx_error *err)
{
    int rc;
    clear_map(m);
    if ((rc = shx_posix_attach_start(m, name, flags, security, created, err)) != SHX_OK)
        return rc;
    m->mode = mode;
    m->kernel_lock = 1;
    if ((rc = pthread_mutex_init(&m->local_writer, NULL)) != 0) {
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_init");
    }

    for (;;) {
        if ((rc = shx_posix_registry_enter(err)) != SHX_OK)
            return rc;
        rc = open_and_gate(m, mode, flags, intr, err);
        if (rc == SHX_OK)
            reap_dead_blocks(m->os_name);
        if (rc == SHX_OK)
            rc = attach_locked(m, name, size, mode, flags, prepare, ctx, created, err);
        if (rc == SHX_OK) {
            gate_leave(m);
            close(m->object_fd); /* the mapping keeps the object */
            m->object_fd = -1;
            shx_posix_registry_add(m);
            shx_posix_registry_leave();
            return SHX_OK;
        }
        unmap_object(m);
        if (m->gate_fd >= 0 && rc != SHX_REINIT)
            drop_unused_lock_files(m);
        close_descriptors(m);
        shx_posix_registry_leave();
        *created = 0;
        if (rc != SHX_REINIT) {
            (void)pthread_mutex_destroy(&m->local_writer);
            return rc;
        }
    }
}

int shx_os_detach(shx_os_map *m, shx_keep_name_fn keep_name, int at_exit, const shx_os_interrupt *intr, shx_error *err)
{
    int rc = SHX_OK;
    if (m->fd < 0)
        return SHX_OK;
    if ((rc = shx_posix_registry_enter(err)) != SHX_OK)
        return rc;
    rc = gate_take(m, m->mode, intr, err);
    if (rc == SHX_E_INTERRUPTED) {
        shx_posix_registry_leave();
        return rc;
    }
    shx_posix_registry_remove(m);
    if (rc == SHX_OK) {
        if (!m->keep_name && live_lock(m->fd, F_WRLCK, 0) == 0) {
            /* We are the last holder.  A linked object's name is still ours to remove;
             * an unlinked one's name may already belong to a newer block. */
            struct stat st;
            if (fstat(m->fd, &st) != 0)
                rc = shx_fail_os(err, "fstat");
            else if (st.st_nlink > 0 && !(keep_name != NULL && keep_name(m)))
                rc = forget_names(m, err);
            else if (st.st_nlink == 0)
                drop_unused_lock_files(m); /* the gate file we may have made anew */
        }
        /* Stop counting before the gate opens: a detacher waiting for it must
         * not find our shared lock still there, or neither of us removes the name.
         * A description shared with a fork child (keep_name) is the child's
         * count too: closing our descriptor leaves it, unlocking would not. */
        if (!m->keep_name)
            (void)live_lock(m->fd, F_UNLCK, 0);
        gate_leave(m);
    }
    if (!at_exit)
        unmap_object(m);
    if (m->writer_fd >= 0)
        close(m->writer_fd);
    m->writer_fd = -1;
    if (!at_exit) /* at exit other threads may still be inside the lock calls */
        (void)pthread_mutex_destroy(&m->local_writer);
    if (close(m->fd) != 0 && rc == SHX_OK && errno != EINTR)
        rc = shx_fail_os(err, "close");
    m->fd = -1;
    shx_posix_registry_leave();
    return rc;
}

int shx_os_unlink(const char *name, shx_error *err)
{
    shx_os_map m;
    int rc;
    clear_map(&m);
    if ((rc = shx_os_name(name, 0, m.os_name, sizeof m.os_name, err)) != SHX_OK)
        return rc;
    /* Under the gate, and the lock files go with the name: holders of the
     * unlinked block then see their live file unlinked and leave names alone. */
    if ((rc = find_lock_owner(m.os_name, &m.lock_owner, err)) != SHX_OK)
        return rc;
    char dir[900];
    shx_error none;
    if (m.lock_owner != (uint32_t)geteuid() && owner_dir(dir, sizeof dir, m.lock_owner, &none) != SHX_OK &&
        none.os_error == ENOENT) {
        /* Its owner has no lock directory: nobody attached it through lock
         * files, so there is no gate to take. */
        return shm_unlink(m.os_name) == 0 ? SHX_OK : shx_fail_os(err, "shm_unlink");
    }
    if ((rc = gate_take(&m, 0600, NULL, err)) != SHX_OK)
        return rc;
    rc = shm_unlink(m.os_name) == 0 ? SHX_OK : shx_fail_os(err, "shm_unlink");
    unlink_lock_files(m.lock_owner, m.os_name);
    gate_release(&m);
    return rc;
}

int shx_os_holders(shx_os_map *m, int64_t *count, shx_error *err)
{
    if (m->fd < 0)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    *count = -1; /* flock() tells "held or not", never by how many */
    return SHX_OK;
}

int shx_os_others_may_write(shx_os_map *m)
{
    struct stat st;
    int fd = shm_open(m->os_name, O_RDONLY, 0);
    if (fd < 0)
        return 1;
    int rc = fstat(fd, &st);
    close(fd);
    return rc != 0 || (st.st_mode & 022) != 0 || st.st_uid != geteuid();
}

/* ---- reaping, listing, sweeping ------------------------------------------ */

/* What a look at an object finds, without attaching to it. */
typedef struct object_peek {
    int exists;
    uint32_t uid;
    uint64_t size;
    int ours; /* starts with the shmemext magic, or was never finished (zeros) */
    int persist;
    unsigned char header[SHX_PEEK_BYTES];
    size_t header_len;
} object_peek;

static void peek_object(const char *os_name, object_peek *p)
{
    memset(p, 0, sizeof *p);
    int fd;
    do {
        fd = shm_open(os_name, O_RDONLY, 0);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return;
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size >= 0) {
        p->exists = 1;
        p->uid = (uint32_t)st.st_uid;
        p->size = (uint64_t)st.st_size;
        size_t n = p->size < SHX_PEEK_BYTES ? (size_t)p->size : SHX_PEEK_BYTES;
        void *base = n > 0 ? mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        if (base != MAP_FAILED) {
            memcpy(p->header, base, n);
            p->header_len = n;
            (void)munmap(base, n);
        }
        static const char zeros[8];
        if (p->header_len >= SHX_FLAGS_OFFSET + 4) {
            uint32_t flags;
            memcpy(&flags, p->header + SHX_FLAGS_OFFSET, sizeof flags);
            p->ours = memcmp(p->header, SHX_MAGIC, 8) == 0 || memcmp(p->header, zeros, 8) == 0;
            p->persist = memcmp(p->header, SHX_MAGIC, 8) == 0 && (flags & SHX_PERSIST_BIT) != 0;
        } else {
            p->ours = p->size == 0; /* a creator that died before sizing it */
        }
    }
    close(fd);
}

/* Whether a lock file's lock is free: nobody holds it (1), somebody does (0). */
static int lock_is_free(int fd) { return flock_retry(fd, LOCK_EX | LOCK_NB) == 0; }

/* The full block name a live file records, or "" if it records none. */
static void read_full_name(int fd, char *out, size_t size)
{
    ssize_t got = pread(fd, out, size - 1, 0);
    out[got > 0 ? got : 0] = '\0';
}

/* Calls fn for every live file of this user's in the lock directory, with
 * the file's stem (the OS name without its slash) and an open descriptor. */
typedef int (*live_file_fn)(void *ctx, const char *stem, int live_fd);

static int each_live_file(live_file_fn fn, void *ctx, shx_error *err)
{
    static const char suffix[] = ".live";
    char own[900];
    int rc = owner_dir(own, sizeof own, (uint32_t)geteuid(), err);
    if (rc != SHX_OK)
        return rc;
    DIR *dir = opendir(own);
    if (dir == NULL)
        return errno == ENOENT ? SHX_OK : shx_fail_os(err, "opendir of the lock directory");
    for (struct dirent *e; rc == SHX_OK && (e = readdir(dir)) != NULL;) {
        size_t n = strlen(e->d_name);
        if (n <= sizeof suffix - 1 || n - (sizeof suffix - 1) > OS_NAME_MAX - 1 ||
            strcmp(e->d_name + n - (sizeof suffix - 1), suffix) != 0)
            continue;
        char stem[OS_NAME_MAX + 1];
        memcpy(stem, e->d_name, n - (sizeof suffix - 1));
        stem[n - (sizeof suffix - 1)] = '\0';
        int fd = openat(dirfd(dir), e->d_name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
        if (fd < 0)
            continue;
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid() && st.st_nlink > 0)
            rc = fn(ctx, stem, fd);
        close(fd);
    }
    closedir(dir);
    return rc;
}

typedef struct reap_request {
    const char *skip;      /* the OS name being attached (its gate is ours already) */
    shx_os_info_fn report; /* told of each block removed, or NULL */
    void *ctx;
} reap_request;

/* Removes one block nobody holds, unless it is to persist.  Takes the
 * block's gate without waiting: one somebody is attaching is not dead. */
static int reap_one(void *vrq, const char *stem, int live_fd)
{
    reap_request *rq = (reap_request *)vrq;
    char os_name[OS_NAME_MAX + 2];
    snprintf(os_name, sizeof os_name, "/%s", stem);
    if (rq->skip != NULL && strcmp(os_name, rq->skip) == 0)
        return SHX_OK;
    /* The gate first: an attacher holds it while it tests the live lock, and
     * must not take ours for a holder's. */
    char path[1024];
    shx_error ignored;
    uint32_t me = (uint32_t)geteuid();
    if (lock_path(path, sizeof path, me, os_name, GATE_FILE, &ignored) != SHX_OK)
        return SHX_OK;
    int gate = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat gst, now, then;
    if (gate >= 0 && lock_is_free(gate) && fstat(gate, &gst) == 0 && gst.st_nlink > 0 &&
        lock_path(path, sizeof path, me, os_name, LIVE_FILE, &ignored) == SHX_OK && stat(path, &now) == 0 &&
        fstat(live_fd, &then) == 0 && now.st_ino == then.st_ino && now.st_dev == then.st_dev && lock_is_free(live_fd)) {
        object_peek peek;
        peek_object(os_name, &peek);
        if (!peek.exists || peek.uid != me) {
            /* Lock files that guard nothing of ours (root, say, must never
             * remove another user's object through them). */
            unlink_lock_files(me, os_name);
        } else if (peek.ours && !peek.persist) {
            char full[256];
            read_full_name(live_fd, full, sizeof full);
            (void)remove_names(me, os_name, &ignored);
            if (rq->report != NULL) {
                shx_os_info info = {full[0] ? full : stem,
                                    peek.size,
                                    0,
                                    0,
                                    0,
                                    0,
                                    (int64_t)then.st_mtime,
                                    peek.header_len ? peek.header : NULL,
                                    peek.header_len};
                rq->report(rq->ctx, &info);
            }
        }
    }
    if (gate >= 0)
        close(gate);
    return SHX_OK;
}

/* Under the gate of `attaching`: gives back the memory of this user's blocks
 * that every holder left without detaching. */
static void reap_dead_blocks(const char *attaching)
{
    reap_request rq = {attaching, NULL, NULL};
    shx_error ignored;
    (void)each_live_file(reap_one, &rq, &ignored);
}

int shx_os_sweep(shx_os_info_fn fn, void *ctx, shx_error *err)
{
    reap_request rq = {NULL, fn, ctx};
    return each_live_file(reap_one, &rq, err);
}

typedef struct list_request {
    shx_os_info_fn fn;
    void *ctx;
} list_request;

static int list_one(void *vrq, const char *stem, int live_fd)
{
    list_request *rq = (list_request *)vrq;
    char os_name[OS_NAME_MAX + 2], full[256];
    struct stat st;
    snprintf(os_name, sizeof os_name, "/%s", stem);
    read_full_name(live_fd, full, sizeof full);
    object_peek peek;
    peek_object(os_name, &peek);
    /* Tested under the block's gate (not waited for): an attacher holds it
     * while it tests the live lock, and must not take ours for a holder's.
     * A gate somebody holds means an attach or detach under way: held. */
    char path[1024];
    shx_error ignored;
    int held = 1;
    int gate = lock_path(path, sizeof path, (uint32_t)geteuid(), os_name, GATE_FILE, &ignored) == SHX_OK
                   ? open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
                   : -1;
    if (gate >= 0 && lock_is_free(gate)) {
        held = !lock_is_free(live_fd);
        if (!held)
            (void)flock_retry(live_fd, LOCK_UN);
    }
    if (gate >= 0)
        close(gate);
    shx_os_info info = {full[0] ? full : stem,
                        peek.size,
                        held ? -1 : 0,
                        peek.header_len ? peek.persist : -1,
                        peek.exists && (held || peek.persist),
                        0,
                        fstat(live_fd, &st) == 0 ? (int64_t)st.st_mtime : 0,
                        peek.header_len ? peek.header : NULL,
                        peek.header_len};
    rq->fn(rq->ctx, &info);
    return SHX_OK;
}

int shx_os_list(shx_os_info_fn fn, void *ctx, shx_error *err)
{
    list_request rq = {fn, ctx};
    return each_live_file(list_one, &rq, err);
}

/* ---- the writer lock: flock() on NAME.lock ------------------------------- */

int shx_posix_writer_try(int fd) { return flock_retry(fd, LOCK_EX | LOCK_NB); }
void shx_posix_writer_release(int fd) { (void)flock_retry(fd, LOCK_UN); }

int shx_os_lock_init(shx_os_map *m, void *area, shx_error *err)
{
    (void)m;
    return shx_posix_file_lock_init(area, err);
}

int shx_os_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err)
{
    return shx_posix_file_lock(m, area, timeout_ns, owner_died, err);
}

int shx_os_unlock(shx_os_map *m, void *area, shx_error *err) { return shx_posix_file_unlock(m, area, err); }
