/* Linux backend: System V shared memory that the kernel frees with its last
 * attachment, found by name through a small entry in /dev/shm.
 *
 * Memory: a segment made with shmget(IPC_PRIVATE) and marked IPC_RMID at
 * once (unless it is to persist).  The kernel then destroys it when its
 * attach count reaches zero, however the last holder ended (detach, exit,
 * os._exit, a signal, a crash), and Linux still lets later processes attach
 * a marked segment by id while it lives.  fork() children inherit
 * attachments and are counted by the kernel: nothing to do around fork.
 * (PostgreSQL's sysv_shmem.c reads the attach count as its liveness test;
 * X11 MIT-SHM clients attach and mark for removal at once.)
 *
 * Name: /dev/shm/NAME, made with shm_open, holds a 64-byte entry: the
 * segment id, its size, its creator's uid and IPC namespace, and a random
 * token that the block's header repeats.  A crash leaves only that entry,
 * which the next attach of the name (or `sweep`) finds dead: the id no longer
 * exists, or belongs to another segment (size, creator or token differ).
 * Before the segment exists its creator writes the entry with no id but the
 * System V key it is about to create the segment with: a creator killed
 * before the segment is marked for removal leaves an entry through which
 * the next attach (or `sweep`) finds that segment and removes it.
 * An open-file-description lock on the entry's first byte is the gate that
 * attach, detach and unlink hold, so that "create it, or attach the live
 * one" and "the last holder removes the name" are decided once.
 *
 * Writer lock: for a block private to its user (no group or other bits in
 * its mode), a robust process-shared pthread mutex in the header.  glibc
 * keeps robust-list pointers inside such a mutex and follows them at unlock,
 * so a block that other users may write gets a lock whose state the kernel
 * keeps instead: an OFD lock on the entry's second byte, on a descriptor of
 * the entry each attachment keeps (see platform_posix.c for the rest).  Which
 * one a block has is read from the segment's mode, which the kernel keeps,
 * never from the block's bytes.
 */
#define _GNU_SOURCE
#include "platform_posix.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef F_OFD_SETLK
#error "this backend needs open file description locks (F_OFD_SETLK, Linux 3.15+)"
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

#define OS_NAME_MAX 255 /* NAME_MAX of /dev/shm */
#define SHM_DIR     "/dev/shm"

/* ---- names ---------------------------------------------------------------- */

int shx_os_name(const char *name, unsigned flags, char *out, size_t size, shx_error *err)
{
    (void)flags;
    size_t n = strlen(name);
    int written = 1 + n <= OS_NAME_MAX ? snprintf(out, size, "/%s", name) : -1;
    if (written < 0 || (size_t)written >= size)
        return shx_fail(err, SHX_E_NAME, n, OS_NAME_MAX - 1, "is too long for this system");
    return SHX_OK;
}

/* ---- the name entry ------------------------------------------------------ */

static const char ENTRY_MAGIC[8] = {'S', 'H', 'X', 'E', 'N', 'T', 'R', 'Y'};
#define ENTRY_VERSION 1

/* Written once by the block's creator, under the gate; read by everyone.
 * Nothing in it is a pointer: a scribbled entry can only name a wrong
 * segment, which the checks below then refuse or find dead. */
typedef struct name_entry {
    char magic[8];
    uint32_t version;
    int32_t shmid;
    uint64_t token;         /* repeated at SHX_TOKEN_OFFSET in the block */
    uint64_t size;          /* bytes of the segment */
    uint64_t ipc_namespace; /* inode of the creator's IPC namespace; 0 unknown */
    uint32_t creator_uid;
    uint32_t creator_pid;
    int32_t key; /* the System V key the segment is made with (0: none) */
    uint32_t reserved;
    int64_t created; /* Unix time */
} name_entry;

_Static_assert(sizeof(name_entry) == 64, "a name entry is 64 bytes on every ABI");

/* Which IPC namespace this process is in: System V ids mean nothing in
 * another.  Read from /proc once per process (a fork() child of ours shares
 * the namespace unless it unshares, which then execs or is a new pid); only
 * setns()/unshare() inside a running process would make the cached one stale. */
static uint64_t ipc_namespace(void)
{
    static uint64_t cached_ns;
    static uint32_t cached_pid;
    uint32_t pid = (uint32_t)getpid();
    if (__atomic_load_n(&cached_pid, __ATOMIC_ACQUIRE) == pid)
        return __atomic_load_n(&cached_ns, __ATOMIC_RELAXED);
    struct stat st;
    uint64_t ns = stat("/proc/self/ns/ipc", &st) == 0 ? (uint64_t)st.st_ino : 0;
    __atomic_store_n(&cached_ns, ns, __ATOMIC_RELAXED);
    __atomic_store_n(&cached_pid, pid, __ATOMIC_RELEASE);
    return ns;
}

enum { GATE_BYTE = 0, WRITER_BYTE = 1 };

/* An OFD lock request of one byte of an entry. */
static struct flock one_byte(short type, off_t byte)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    return fl;
}

static int lock_byte(int fd, short type, off_t byte, int wait)
{
    struct flock fl = one_byte(type, byte);
    for (;;) {
        if (fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

static int lock_gate(int fd, short type, int wait) { return lock_byte(fd, type, GATE_BYTE, wait); }

/* Opens the entry of os_name (creating an empty one if asked) and takes its
 * gate.  An entry unlinked while we waited for its gate is worthless: open
 * the name again.  Returns the descriptor, or -1 with errno set (ECANCELED
 * when intr gave the wait up). */
static int try_gate(int fd) { return lock_gate(fd, F_WRLCK, 0); }

/* Takes the gate: in the kernel, or polled and interruptible when intr is given. */
static int take_gate(int fd, const shx_os_interrupt *intr)
{
    if (intr == NULL || intr->interrupted == NULL)
        return lock_gate(fd, F_WRLCK, 1);
    int rc = shx_posix_poll_lock(try_gate, fd, intr);
    if (rc == -2)
        errno = ECANCELED; /* given up: the caller reports SHX_E_INTERRUPTED */
    return rc == 0 ? 0 : -1;
}

static int open_gated(const char *os_name, int create, unsigned mode, const shx_os_interrupt *intr, struct stat *st)
{
    for (;;) {
        int fd;
        do {
            fd = shm_open(os_name, O_RDWR | (create ? O_CREAT : 0), (mode_t)mode);
        } while (fd < 0 && errno == EINTR);
        if (fd < 0)
            return -1;
        if (take_gate(fd, intr) != 0 || fstat(fd, st) != 0) {
            int saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        if (st->st_nlink > 0)
            return fd;
        close(fd);
    }
}

/* What the readers below return besides errors: never a shx_status (those are >= 0) nor SHX_REINIT. */
enum { ENTRY_EMPTY = -10, ENTRY_FOUND = -11, SEGMENT_LIVE = -12, SEGMENT_DEAD = -13 };

/* Reads a name entry: ENTRY_EMPTY for an empty file (a creator that died
 * before writing it, or ours just made), ENTRY_FOUND, or an error for
 * anything that is not an entry of ours. */
static int read_entry(int fd, const struct stat *st, name_entry *e, shx_error *err)
{
    if (st->st_size == 0)
        return ENTRY_EMPTY;
    if (st->st_size == (off_t)sizeof *e) {
        ssize_t got;
        do {
            got = pread(fd, e, sizeof *e, 0);
        } while (got < 0 && errno == EINTR);
        if (got < 0)
            return shx_fail_os(err, "read of the name entry");
        if (got == (ssize_t)sizeof *e && memcmp(e->magic, ENTRY_MAGIC, sizeof ENTRY_MAGIC) == 0) {
            if (e->version > ENTRY_VERSION)
                return shx_fail(err, SHX_E_NEWER, e->version, ENTRY_VERSION, NULL);
            if (e->size < SHX_PEEK_BYTES || e->size > (uint64_t)SIZE_MAX)
                return shx_fail(err, SHX_E_CORRUPT, e->size, 0, "has a name entry with an impossible size");
            return ENTRY_FOUND;
        }
    }
    char head[8];
    if (st->st_size >= 8 && pread(fd, head, sizeof head, 0) == 8 && memcmp(head, SHX_MAGIC, 8) == 0)
        return shx_fail(err, SHX_E_FOREIGN, 0, 0,
                        "is a block of an older shmemext, kept in /dev/shm itself: remove it with shmemext.unlink()");
    return shx_fail(err, SHX_E_FOREIGN, 0, 0, "is not a shmemext name entry");
}

static int write_entry(int fd, const name_entry *e, shx_error *err)
{
    ssize_t put;
    do {
        put = pwrite(fd, e, sizeof *e, 0);
    } while (put < 0 && errno == EINTR);
    if (put != (ssize_t)sizeof *e) {
        if (put >= 0)
            errno = ENOSPC;
        return shx_fail_os(err, "write of the name entry");
    }
    return SHX_OK;
}

static int foreign_namespace(const name_entry *e)
{
    uint64_t here = ipc_namespace();
    return e->ipc_namespace != 0 && here != 0 && e->ipc_namespace != here;
}

static int fail_namespace(shx_error *err)
{
    errno = EXDEV;
    shx_fail_os(err, "the name entry");
    err->detail = "belongs to a block of another IPC namespace (another container?), whose memory cannot be "
                  "reached from here: give each namespace its own /dev/shm, or use another name";
    return SHX_E_OS;
}

/* ---- the segment behind an entry ------------------------------------------- */

/* Whether the entry's segment still exists and is the one the entry made:
 * the kernel's own record of its size and creator must match.  (The token
 * is checked once attached.)  An id we may not even look at is dead if the
 * entry is ours (it was recycled for somebody else), refused otherwise. */
static int segment_state(int entry_fd, const name_entry *e, struct shmid_ds *ds, shx_error *err)
{
    if (shmctl(e->shmid, IPC_STAT, ds) != 0) {
        if (errno == EINVAL || errno == EIDRM)
            return SEGMENT_DEAD;
        struct stat st;
        if (errno == EACCES && fstat(entry_fd, &st) == 0 && st.st_uid == geteuid())
            return SEGMENT_DEAD;
        return shx_fail_os(err, "shmctl");
    }
    if ((uint64_t)ds->shm_segsz != e->size || ds->shm_perm.cuid != e->creator_uid)
        return SEGMENT_DEAD;
    return SEGMENT_LIVE;
}

static int token_matches(const void *base, uint64_t token)
{
    uint64_t seen;
    memcpy(&seen, (const unsigned char *)base + SHX_TOKEN_OFFSET, sizeof seen);
    return seen == token;
}

static uint64_t random_token(void)
{
    uint64_t token = 0;
    while (token == 0) {
        ssize_t got = getrandom(&token, sizeof token, 0);
        if (got != (ssize_t)sizeof token && !(got < 0 && errno == EINTR)) {
            /* No entropy source: time and pid still tell ids apart well. */
            token = shx_os_monotonic_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL);
        }
    }
    return token;
}

/* shmget's errors name the limit that stood in the way. */
static int fail_shmget(shx_error *err, size_t size)
{
    int code = errno;
    shx_fail_os(err, "shmget");
    err->a = (uint64_t)size;
    if (code == EINVAL)
        err->detail = "the size is beyond kernel.shmmax (/proc/sys/kernel/shmmax)";
    else if (code == ENOSPC)
        err->detail = "kernel.shmmni segments or kernel.shmall pages are used up (/proc/sys/kernel/shmmni, shmall)";
    else if (code == ENOMEM)
        err->detail = "the system cannot commit that much memory";
    return SHX_E_OS;
}

/* Gives a new segment real memory now, so that a shortage is an error here
 * rather than an out-of-memory kill at some later write. */
static int prefault(void *base, size_t size, shx_error *err)
{
    int rc;
    do {
        rc = madvise(base, size, MADV_POPULATE_WRITE);
    } while (rc != 0 && errno == EINTR);
    if (rc == 0)
        return SHX_OK;
    if (errno == EINVAL) { /* a kernel before 5.14: touch every page (fresh memory is zeros) */
        long page = sysconf(_SC_PAGESIZE);
        for (size_t off = 0; off < size; off += (size_t)(page > 0 ? page : 4096))
            ((volatile unsigned char *)base)[off] = 0;
        return SHX_OK;
    }
    shx_fail_os(err, "madvise(MADV_POPULATE_WRITE)");
    err->a = (uint64_t)size;
    return SHX_E_OS;
}

/* With kernel.shm_rmid_forced set, Linux destroys every segment that no
 * process attaches once its creator is gone: persist cannot be kept there. */
static int rmid_forced(void)
{
    char c = '0';
    int fd = open("/proc/sys/kernel/shm_rmid_forced", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &c, 1) != 1)
            c = '0';
        close(fd);
    }
    return c == '1';
}

static void forget_segment(int shmid, void *base)
{
    if (base != NULL)
        (void)shmdt(base);
    if (shmid >= 0)
        (void)shmctl(shmid, IPC_RMID, NULL);
}

/* Whether a segment is one a creator left unfinished: no magic yet, and no
 * token or the entry's own (written just before the header). */
static int left_unfinished(int shmid, uint64_t token)
{
    void *base = shmat(shmid, NULL, SHM_RDONLY);
    if (base == (void *)-1)
        return 0;
    static const char no_magic[8];
    int unfinished =
        memcmp(base, no_magic, sizeof no_magic) == 0 && (token_matches(base, 0) || token_matches(base, token));
    (void)shmdt(base);
    return unfinished;
}

/* An entry whose creator died before it named a finished segment (no id
 * yet): the segment it was making, found by its key, goes if it is that one
 * (our user's, made by that pid, of that size, unmarked, unattached, with
 * no magic and no token but the entry's: an entry others may write must not
 * name one of our finished blocks for removal; `sweep` removes a finished
 * one nothing names).  Under the entry's gate, so that its creator is gone,
 * not still at work. */
static void remove_unfinished(const name_entry *e)
{
    if (e->shmid >= 0 || e->key == IPC_PRIVATE)
        return;
    int shmid = shmget((key_t)e->key, 0, 0);
    struct shmid_ds ds;
    if (shmid >= 0 && shmctl(shmid, IPC_STAT, &ds) == 0 && ds.shm_perm.cuid == geteuid() &&
        (uint32_t)ds.shm_cpid == e->creator_pid && (uint64_t)ds.shm_segsz == e->size && ds.shm_nattch == 0 &&
        !(ds.shm_perm.mode & SHM_DEST) && left_unfinished(shmid, e->token))
        (void)shmctl(shmid, IPC_RMID, NULL);
}

/* The entry a creator writes before its segment exists (shmid -1, a new
 * random key each try), and then again naming the finished segment. */
static void fill_entry(name_entry *e, size_t size, uint64_t token)
{
    memset(e, 0, sizeof *e);
    memcpy(e->magic, ENTRY_MAGIC, sizeof e->magic);
    e->version = ENTRY_VERSION;
    e->shmid = -1;
    e->token = token;
    e->size = (uint64_t)size;
    e->ipc_namespace = ipc_namespace();
    e->creator_uid = (uint32_t)geteuid();
    e->creator_pid = (uint32_t)getpid();
    e->created = (int64_t)time(NULL);
}

/* shmget under a random key recorded in the entry first.  Returns the id,
 * or -1 with errno set. */
static int make_segment(int fd, name_entry *e, size_t size, unsigned mode, shx_error *err)
{
    for (int tries = 0; tries < 64; tries++) {
        do {
            e->key = (int32_t)(random_token() & 0x7FFFFFFF);
        } while (e->key == IPC_PRIVATE);
        if (write_entry(fd, e, err) != SHX_OK)
            return -2;
        int shmid = shmget((key_t)e->key, size, IPC_CREAT | IPC_EXCL | (int)(mode & 0777));
        if (shmid >= 0 || errno != EEXIST)
            return shmid;
    }
    errno = EEXIST;
    return -1;
}

/* ---- attach / detach --------------------------------------------------- */

/* A block others may write: its writer lock is the OFD lock on the entry's
 * WRITER_BYTE, on a descriptor of the entry of its own (a new description:
 * the gate's is closed when attach ends). */
static int use_file_lock(shx_os_map *m, int entry_fd, shx_error *err)
{
    char path[40];
    snprintf(path, sizeof path, "/proc/self/fd/%d", entry_fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return shx_fail_os(err, "open of the name entry for the writer lock");
    int rc = pthread_mutex_init(&m->local_writer, NULL);
    if (rc != 0) {
        close(fd);
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_init");
    }
    m->writer_fd = fd;
    m->kernel_lock = 1;
    return SHX_OK;
}

static void drop_file_lock(shx_os_map *m)
{
    if (!m->kernel_lock)
        return;
    if (m->writer_fd >= 0)
        close(m->writer_fd);
    m->writer_fd = -1;
    m->kernel_lock = 0;
    (void)pthread_mutex_destroy(&m->local_writer);
}

/* Makes the block anew, under the gate: a segment (marked for removal at
 * once unless it is to persist, so that no crash from here on can leave it
 * behind), its memory, its header (prepare), then the entry that names it. */
static int create_block(shx_os_map *m, int fd, const struct stat *st, size_t size, unsigned mode, unsigned flags,
                        shx_prepare_fn prepare, void *ctx, shx_error *err)
{
    int rc;
    if ((flags & SHX_OPEN_PERSIST) && rmid_forced()) {
        errno = EINVAL;
        shx_fail_os(err, "shmget");
        err->detail = "persist=True cannot be kept: kernel.shm_rmid_forced is 1, so the kernel frees every "
                      "block with its last holder (set it to 0, or keep a holder: python -m shmemext hold)";
        return SHX_E_OS;
    }
    uint64_t token = random_token();
    name_entry e;
    fill_entry(&e, size, token);
    int shmid = make_segment(fd, &e, size, mode, err);
    if (shmid == -2)
        return SHX_E_OS; /* the entry could not be written */
    if (shmid < 0)
        return fail_shmget(err, size);
    void *base = shmat(shmid, NULL, 0);
    if (base == (void *)-1) {
        rc = shx_fail_os(err, "shmat");
        forget_segment(shmid, NULL);
        return rc;
    }
    if (!(flags & SHX_OPEN_PERSIST) && shmctl(shmid, IPC_RMID, NULL) != 0) {
        rc = shx_fail_os(err, "shmctl(IPC_RMID)");
        forget_segment(shmid, base);
        return rc;
    }
    if ((rc = prefault(base, size, err)) != SHX_OK) {
        forget_segment(shmid, base);
        return rc;
    }
    memcpy((unsigned char *)base + SHX_TOKEN_OFFSET, &token, sizeof token);
    m->base = base;
    m->size = size;
    m->shmid = shmid;
    m->token = token;
    if ((mode & 077) != 0 && (rc = use_file_lock(m, fd, err)) != SHX_OK) {
        forget_segment(shmid, base);
        m->base = NULL;
        m->size = 0;
        m->shmid = -1;
        return rc;
    }
    rc = prepare(ctx, m, SHX_ATTACH_FRESH, err);
    if (rc == SHX_OK) {
        e.shmid = shmid;
        rc = write_entry(fd, &e, err);
    }
    if (rc != SHX_OK) {
        drop_file_lock(m);
        forget_segment(shmid, base);
        m->base = NULL;
        m->size = 0;
        m->shmid = -1;
        return rc;
    }
    /* shm_open applied the umask to a new entry; the caller's mode is what was asked for. */
    if (st->st_uid == geteuid() && (st->st_mode & 0777) != (mode & 0777))
        (void)fchmod(fd, (mode_t)(mode & 0777));
    return SHX_OK;
}

/* Attaches the segment an entry names.  SHX_REINIT when it turns out dead
 * (gone, or its id recycled for another segment), or is ours alone and must
 * start afresh (prepare says so): then the caller makes a new block. */
static int join_block(shx_os_map *m, int fd, const name_entry *e, unsigned flags, shx_prepare_fn prepare, void *ctx,
                      shx_error *err)
{
    struct shmid_ds ds;
    int rc = segment_state(fd, e, &ds, err);
    if (rc != SEGMENT_LIVE)
        return rc == SEGMENT_DEAD ? SHX_REINIT : rc;
    if ((flags & SHX_OPEN_REQUIRE_OWNER) && ds.shm_perm.uid != geteuid())
        return shx_fail(err, SHX_E_NOTOWNER, (uint64_t)ds.shm_perm.uid, (uint64_t)geteuid(), NULL);
    void *base = shmat(e->shmid, NULL, 0);
    if (base == (void *)-1) {
        if (errno == EINVAL || errno == EIDRM)
            return SHX_REINIT; /* its last holder went just now */
        return shx_fail_os(err, "shmat");
    }
    if (!token_matches(base, e->token)) {
        (void)shmdt(base);
        return SHX_REINIT;
    }
    m->base = base;
    m->size = (size_t)e->size;
    m->shmid = e->shmid;
    m->token = e->token;
    if ((ds.shm_perm.mode & 077) != 0 && (rc = use_file_lock(m, fd, err)) != SHX_OK) {
        (void)shmdt(base);
        m->base = NULL;
        m->shmid = -1;
        return rc;
    }
    /* Counted before our shmat: holders come only under the gate we hold,
     * and one that goes meanwhile only makes "shared" too careful. */
    rc = prepare(ctx, m, ds.shm_nattch == 0 ? SHX_ATTACH_ALONE : SHX_ATTACH_SHARED, err);
    if (rc == SHX_REINIT) /* nobody else holds it: it goes with our shmdt */
        (void)shmctl(e->shmid, IPC_RMID, NULL);
    if (rc != SHX_OK) {
        drop_file_lock(m);
        (void)shmdt(base);
        m->base = NULL;
        m->size = 0;
        m->shmid = -1;
    }
    return rc;
}

static void clear_map(shx_os_map *m)
{
    memset(m, 0, sizeof *m);
    m->shmid = -1;
    m->writer_fd = m->writer_fork_fd = -1;
}

int shx_os_attach(shx_os_map *m, const char *name, size_t size, unsigned mode, unsigned flags, const char *security,
                  shx_prepare_fn prepare, void *ctx, const shx_os_interrupt *intr, int *created, shx_error *err)
{
    int rc;
    clear_map(m);
    if ((rc = shx_posix_attach_start(m, name, flags, security, created, err)) != SHX_OK)
        return rc;
    if ((rc = shx_posix_registry_enter(err)) != SHX_OK)
        return rc;
    struct stat st;
    int existing_only = (flags & SHX_OPEN_EXISTING) != 0;
    int fd = open_gated(m->os_name, !existing_only, mode, intr, &st);
    if (fd < 0) {
        if (errno == ECANCELED)
            rc = shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL);
        else if (errno == ENOENT && existing_only)
            rc = shx_fail(err, SHX_E_NOTFOUND, 0, 0, NULL);
        else
            rc = shx_fail_os(err, "shm_open");
        shx_posix_registry_leave();
        return rc;
    }
    name_entry e;
    if ((flags & SHX_OPEN_REQUIRE_OWNER) && st.st_uid != geteuid()) {
        rc = shx_fail(err, SHX_E_NOTOWNER, (uint64_t)st.st_uid, (uint64_t)geteuid(), NULL);
    } else if ((rc = read_entry(fd, &st, &e, err)) == ENTRY_FOUND) {
        if (foreign_namespace(&e)) {
            rc = fail_namespace(err);
        } else if (e.shmid < 0) { /* its creator died before it was finished */
            remove_unfinished(&e);
            rc = SHX_REINIT;
        } else {
            rc = join_block(m, fd, &e, flags, prepare, ctx, err);
        }
    } else if (rc == ENTRY_EMPTY) {
        rc = SHX_REINIT;
    }
    if (rc == SHX_REINIT) {
        /* The entry was empty or names memory that is gone: a new block is due. */
        rc = existing_only ? shx_fail(err, SHX_E_NOTFOUND, 0, 0, NULL)
                           : create_block(m, fd, &st, size, mode, flags, prepare, ctx, err);
        if (rc == SHX_OK)
            *created = 1;
        else /* the entry was empty or dead, and we hold its gate: leave nothing behind */
            (void)shm_unlink(m->os_name);
    }
    close(fd); /* opens the gate */
    if (rc == SHX_OK)
        shx_posix_registry_add(m);
    shx_posix_registry_leave();
    return rc;
}

/* Attachments this process left in place at exit (threads may still run in
 * them), by segment id: the kernel still counts them, and a later detach at
 * exit must not take them for other processes. */
static int *lingering;
static size_t lingering_count, lingering_size;

static size_t own_attachments(int shmid)
{
    size_t n = 1;
    for (size_t i = 0; i < lingering_count; i++)
        n += lingering[i] == shmid;
    return n;
}

static void linger(int shmid)
{
    if (lingering_count == lingering_size) {
        size_t size = lingering_size ? 2 * lingering_size : 16;
        int *grown = realloc(lingering, size * sizeof *grown);
        if (grown == NULL)
            return; /* the name then stays: `sweep` or the next open removes it */
        lingering = grown;
        lingering_size = size;
    }
    lingering[lingering_count++] = shmid;
}

int shx_os_detach(shx_os_map *m, shx_keep_name_fn keep_name, int at_exit, const shx_os_interrupt *intr, shx_error *err)
{
    (void)keep_name; /* the kernel knows which segments persist: those not marked for removal */
    int rc;
    if (m->shmid < 0)
        return SHX_OK;
    if ((rc = shx_posix_registry_enter(err)) != SHX_OK)
        return rc;
    struct stat st;
    int fd = open_gated(m->os_name, 0, 0, intr, &st);
    if (fd < 0 && errno == ECANCELED) {
        shx_posix_registry_leave();
        return shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL);
    }
    shx_posix_registry_remove(m);
    if (fd >= 0) {
        /* The last holder removes the name, if it still names this block. */
        name_entry e;
        struct shmid_ds ds;
        shx_error ignored;
        if (read_entry(fd, &st, &e, &ignored) == ENTRY_FOUND && e.shmid == m->shmid && e.token == m->token &&
            shmctl(m->shmid, IPC_STAT, &ds) == 0 && (ds.shm_perm.mode & SHM_DEST) &&
            (size_t)ds.shm_nattch <= own_attachments(m->shmid) && shm_unlink(m->os_name) != 0)
            rc = shx_fail_os(err, "shm_unlink");
    }
    if (at_exit) {
        linger(m->shmid);
        if (m->writer_fd >= 0) /* other threads may still be inside the lock calls: keep the mutex */
            close(m->writer_fd);
        m->writer_fd = -1;
    } else {
        if (shmdt(m->base) != 0 && rc == SHX_OK)
            rc = shx_fail_os(err, "shmdt");
        drop_file_lock(m);
    }
    if (fd >= 0)
        close(fd);
    m->shmid = -1;
    if (!at_exit) {
        m->base = NULL;
        m->size = 0;
    }
    shx_posix_registry_leave();
    return rc;
}

/* Whether what the name holds is a block of an older shmemext, which kept the
 * whole block in /dev/shm: unlink may remove it. */
static int older_block(int fd, const struct stat *st)
{
    char head[8];
    return st->st_size >= 8 && pread(fd, head, sizeof head, 0) == 8 && memcmp(head, SHX_MAGIC, 8) == 0;
}

int shx_os_unlink(const char *name, shx_error *err)
{
    char os_name[256];
    int rc;
    if ((rc = shx_os_name(name, 0, os_name, sizeof os_name, err)) != SHX_OK)
        return rc;
    struct stat st;
    int fd = open_gated(os_name, 0, 0, NULL, &st);
    if (fd < 0)
        return shx_fail_os(err, "shm_open");
    name_entry e;
    struct shmid_ds ds;
    rc = read_entry(fd, &st, &e, err);
    if (rc == ENTRY_FOUND && !foreign_namespace(&e)) {
        remove_unfinished(&e);
        /* A persistent segment goes with its last holder from now on. */
        rc = segment_state(fd, &e, &ds, err);
        if (rc == SEGMENT_LIVE && !(ds.shm_perm.mode & SHM_DEST) && shmctl(e.shmid, IPC_RMID, NULL) != 0)
            rc = shx_fail_os(err, "shmctl(IPC_RMID)");
        else if (rc == SEGMENT_LIVE || rc == SEGMENT_DEAD)
            rc = SHX_OK;
    } else if (rc == ENTRY_FOUND || rc == ENTRY_EMPTY || (rc == SHX_E_FOREIGN && older_block(fd, &st))) {
        rc = SHX_OK;
    }
    if (rc == SHX_OK && shm_unlink(os_name) != 0)
        rc = shx_fail_os(err, "shm_unlink");
    close(fd);
    return rc;
}

int shx_os_holders(shx_os_map *m, int64_t *count, shx_error *err)
{
    struct shmid_ds ds;
    if (m->shmid < 0)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    if (shmctl(m->shmid, IPC_STAT, &ds) != 0)
        return shx_fail_os(err, "shmctl");
    *count = (int64_t)ds.shm_nattch;
    return SHX_OK;
}

int shx_os_others_may_write(shx_os_map *m)
{
    struct shmid_ds ds;
    if (m->shmid < 0 || shmctl(m->shmid, IPC_STAT, &ds) != 0)
        return 1;
    return (ds.shm_perm.mode & 022) != 0 || ds.shm_perm.uid != geteuid();
}

/* fork(): the kernel counts the child's inherited attachments.  Only a
 * kernel-kept writer lock needs care: its OFD lock belongs to the open file
 * description, which a child shares, so that both would hold the lock at
 * once.  Before fork() a new description is opened for the child, which
 * keeps it; without one the child must not write (shx_os_lock refuses). */
void shx_posix_fork_prepare(shx_os_map *m)
{
    m->writer_fork_fd = -1;
    if (m->writer_fd >= 0) {
        char path[40];
        snprintf(path, sizeof path, "/proc/self/fd/%d", m->writer_fd);
        m->writer_fork_fd = open(path, O_RDWR | O_CLOEXEC);
    }
}

void shx_posix_fork_parent(shx_os_map *m) { shx_posix_writer_fork_parent(m); }

void shx_posix_fork_child(shx_os_map *m) { shx_posix_writer_fork_child(m); }

int shx_posix_writer_try(int fd) { return lock_byte(fd, F_WRLCK, WRITER_BYTE, 0); }
void shx_posix_writer_release(int fd) { (void)lock_byte(fd, F_UNLCK, WRITER_BYTE, 0); }

/* ---- listing and sweeping ------------------------------------------------ */

typedef int (*entry_fn)(void *ctx, const char *name, int fd, const name_entry *e);

/* An empty entry (its creator died before writing it) read as one that
 * names no segment. */
static void no_entry(name_entry *e)
{
    memset(e, 0, sizeof *e);
    e->shmid = -1;
}

/* Whether somebody holds the entry's gate (attaching, detaching, creating). */
static int gate_held(int fd)
{
    struct flock fl = one_byte(F_WRLCK, GATE_BYTE);
    return fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

/* Calls fn for every name entry of this user's in /dev/shm (opened for
 * writing, so that a sweep can take its gate).  An empty one (its creator
 * died before writing it) comes as an entry naming no segment, unless its
 * gate is held: then a creator is at work on it. */
static int each_entry(entry_fn fn, void *ctx, shx_error *err)
{
    DIR *dir = opendir(SHM_DIR);
    if (dir == NULL)
        return shx_fail_os(err, "opendir of " SHM_DIR);
    int rc = SHX_OK;
    for (struct dirent *d; rc == SHX_OK && (d = readdir(dir)) != NULL;) {
        if (d->d_name[0] == '.')
            continue;
        int fd = openat(dirfd(dir), d->d_name, O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
        if (fd < 0)
            continue;
        struct stat st;
        name_entry e;
        shx_error ignored;
        int found = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid()
                        ? read_entry(fd, &st, &e, &ignored)
                        : SHX_E_FOREIGN;
        if (found == ENTRY_EMPTY && !gate_held(fd)) {
            no_entry(&e);
            found = ENTRY_FOUND;
        }
        if (found == ENTRY_FOUND)
            rc = fn(ctx, d->d_name, fd, &e);
        close(fd);
    }
    closedir(dir);
    return rc;
}

/* What the kernel knows of an entry's segment, and a copy of its header. */
typedef struct segment_look {
    int alive; /* 1 live, 0 dead, -1 in another IPC namespace */
    struct shmid_ds ds;
    unsigned char header[SHX_PEEK_BYTES];
    size_t header_len;
} segment_look;

static void look_at_segment(int fd, const name_entry *e, segment_look *look)
{
    shx_error ignored;
    memset(look, 0, sizeof *look);
    if (foreign_namespace(e)) {
        look->alive = -1;
        return;
    }
    if (segment_state(fd, e, &look->ds, &ignored) != SEGMENT_LIVE)
        return;
    void *base = shmat(e->shmid, NULL, SHM_RDONLY);
    if (base == (void *)-1) {
        look->alive = !(errno == EINVAL || errno == EIDRM);
        return;
    }
    look->alive = token_matches(base, e->token);
    if (look->alive) {
        memcpy(look->header, base, SHX_PEEK_BYTES);
        look->header_len = SHX_PEEK_BYTES;
    }
    (void)shmdt(base);
}

static void describe(shx_os_info *info, const char *name, const name_entry *e, const segment_look *look)
{
    int known = look->alive == 1;
    info->name = name;
    info->size = known ? e->size : 0;
    info->holders = known ? (int64_t)look->ds.shm_nattch : -1;
    info->persist = known ? !(look->ds.shm_perm.mode & SHM_DEST) : -1;
    info->alive = look->alive != 0;
    info->creator_pid = known ? (uint32_t)look->ds.shm_cpid : e->creator_pid;
    info->created = e->created;
    info->header = look->header_len ? look->header : NULL;
    info->header_len = look->header_len;
}

typedef struct walk {
    shx_os_info_fn fn;
    void *ctx;
    struct {
        int shmid;
        uint64_t token;
    } * live; /* sweep: the segments that live entries name */
    size_t live_count, live_size;
    shx_error *err;
} walk;

static int list_one(void *vw, const char *name, int fd, const name_entry *e)
{
    walk *w = (walk *)vw;
    segment_look look;
    shx_os_info info;
    look_at_segment(fd, e, &look);
    /* Our own look attached it once more; the count is read before that. */
    describe(&info, name, e, &look);
    w->fn(w->ctx, &info);
    return SHX_OK;
}

int shx_os_list(shx_os_info_fn fn, void *ctx, shx_error *err)
{
    walk w = {fn, ctx, NULL, 0, 0, err};
    return each_entry(list_one, &w, err);
}

/* Sweep, first pass: removes entries whose segment is gone (under the
 * entry's gate, not waited for: an entry somebody is attaching is in use),
 * and notes the segments the others name. */
static int sweep_entry(void *vw, const char *name, int fd, const name_entry *seen)
{
    walk *w = (walk *)vw;
    struct stat st;
    name_entry e;
    shx_error ignored;
    (void)seen;
    if (lock_gate(fd, F_WRLCK, 0) != 0 || fstat(fd, &st) != 0 || st.st_nlink == 0)
        return SHX_OK;
    int found = read_entry(fd, &st, &e, &ignored);
    if (found == ENTRY_EMPTY) /* we hold its gate: nobody is writing it */
        no_entry(&e);
    else if (found != ENTRY_FOUND)
        return SHX_OK;
    remove_unfinished(&e);
    segment_look look;
    look_at_segment(fd, &e, &look);
    if (look.alive) {
        if (w->live_count == w->live_size) {
            size_t size = w->live_size ? 2 * w->live_size : 64;
            void *grown = realloc(w->live, size * sizeof *w->live);
            if (grown == NULL)
                return shx_fail(w->err, SHX_E_OS, 0, 0, NULL); /* out of memory */
            w->live = grown;
            w->live_size = size;
        }
        w->live[w->live_count].shmid = e.shmid;
        w->live[w->live_count].token = e.token;
        w->live_count++;
        return SHX_OK;
    }
    char os_name[OS_NAME_MAX + 2];
    snprintf(os_name, sizeof os_name, "/%s", name);
    if (shm_unlink(os_name) == 0) {
        shx_os_info info;
        describe(&info, name, &e, &look);
        w->fn(w->ctx, &info);
    }
    return SHX_OK;
}

static int named_by_live_entry(const walk *w, int shmid, uint64_t token)
{
    for (size_t i = 0; i < w->live_count; i++) {
        if (w->live[i].shmid == shmid && w->live[i].token == token)
            return 1;
    }
    return 0;
}

/* Sweep, second pass: segments of this user's that carry a block header but
 * that nothing attaches and no entry names (a persistent block whose entry
 * was deleted by hand, or a creator killed between shmget and its entry). */
static void sweep_orphans(walk *w)
{
    struct shm_info info;
    int highest = shmctl(0, SHM_INFO, (struct shmid_ds *)(void *)&info);
    for (int index = 0; index <= highest; index++) {
        struct shmid_ds ds;
        int shmid = shmctl(index, SHM_STAT, &ds);
        if (shmid < 0 || ds.shm_perm.cuid != geteuid() || ds.shm_nattch != 0 || (ds.shm_perm.mode & SHM_DEST) ||
            ds.shm_segsz < SHX_PEEK_BYTES)
            continue;
        void *base = shmat(shmid, NULL, SHM_RDONLY);
        if (base == (void *)-1)
            continue;
        uint64_t token;
        memcpy(&token, (const unsigned char *)base + SHX_TOKEN_OFFSET, sizeof token);
        int orphan = memcmp(base, SHX_MAGIC, 8) == 0 && !named_by_live_entry(w, shmid, token);
        segment_look look = {1, ds, {0}, SHX_PEEK_BYTES};
        memcpy(look.header, base, SHX_PEEK_BYTES);
        (void)shmdt(base);
        if (orphan && shmctl(shmid, IPC_RMID, NULL) == 0) {
            char label[32];
            snprintf(label, sizeof label, "(shmid %d)", shmid);
            shx_os_info out = {
                label,       (uint64_t)ds.shm_segsz, 0, 1, 1, (uint32_t)ds.shm_cpid, (int64_t)ds.shm_ctime,
                look.header, look.header_len};
            w->fn(w->ctx, &out);
        }
    }
}

int shx_os_sweep(shx_os_info_fn fn, void *ctx, shx_error *err)
{
    walk w = {fn, ctx, NULL, 0, 0, err};
    int rc = each_entry(sweep_entry, &w, err);
    if (rc == SHX_OK)
        sweep_orphans(&w);
    free(w.live);
    return rc;
}

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

/* The mutex lives in memory that any process allowed to write the block can
 * overwrite, and the C library trusts it: a scribbled type (say,
 * priority-protect) ends in an assertion inside pthread_mutex_lock.  The type
 * never changes after init, so a lock whose type word differs from what our
 * attributes write is refused.  Which word holds the type is found without
 * naming the library's private fields: the words in which a mutex of our
 * type and one of another type differ. */
#define MUTEX_WORDS (sizeof(pthread_mutex_t) / sizeof(uint32_t))
static uint32_t expected_words[MUTEX_WORDS];
static unsigned char type_words[MUTEX_WORDS]; /* the indexes of the words the type is kept in */
static size_t type_word_count;
static _Atomic int type_words_known; /* so that a lock's check costs no call into the library */
static pthread_once_t type_word_once = PTHREAD_ONCE_INIT;

static void find_type_words(void)
{
    pthread_mutex_t ours, other;
    pthread_mutexattr_t attr;
    memset(&ours, 0, sizeof ours);
    memset(&other, 0, sizeof other);
    if (init_mutex(&ours) == 0) {
        int ok = pthread_mutexattr_init(&attr) == 0;
        ok = ok && pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED) == 0 &&
             pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST) == 0 &&
             pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_NORMAL) == 0 && pthread_mutex_init(&other, &attr) == 0;
        if (ok) {
            memcpy(expected_words, &ours, sizeof expected_words);
            uint32_t words[MUTEX_WORDS];
            memcpy(words, &other, sizeof words);
            for (size_t i = 0; i < MUTEX_WORDS; i++) {
                if (words[i] != expected_words[i])
                    type_words[type_word_count++] = (unsigned char)i;
            }
            (void)pthread_mutex_destroy(&other);
        }
        (void)pthread_mutexattr_destroy(&attr);
        (void)pthread_mutex_destroy(&ours);
    }
    atomic_store_explicit(&type_words_known, 1, memory_order_release);
}

static int mutex_intact(const pthread_mutex_t *mutex)
{
    if (!atomic_load_explicit(&type_words_known, memory_order_acquire))
        (void)pthread_once(&type_word_once, find_type_words);
    const unsigned char *bytes = (const unsigned char *)(const void *)mutex;
    for (size_t i = 0; i < type_word_count; i++) {
        uint32_t word;
        memcpy(&word, bytes + 4 * (size_t)type_words[i], sizeof word);
        if (word != expected_words[type_words[i]])
            return 0;
    }
    return 1;
}

int shx_os_lock_init(shx_os_map *m, void *area, shx_error *err)
{
    if (m->kernel_lock)
        return shx_posix_file_lock_init(area, err);
    int rc = init_mutex((pthread_mutex_t *)area);
    if (rc != 0) {
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_init");
    }
    return SHX_OK;
}

int shx_os_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err)
{
    if (m->kernel_lock)
        return shx_posix_file_lock(m, area, timeout_ns, owner_died, err);
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
    if (m->kernel_lock)
        return shx_posix_file_unlock(m, area, err);
    if (!mutex_intact((pthread_mutex_t *)area))
        return shx_fail(err, SHX_E_CORRUPT, 0, 0, "has an overwritten writer lock");
    int rc = pthread_mutex_unlock((pthread_mutex_t *)area);
    if (rc != 0) {
        errno = rc;
        return shx_fail_os(err, "pthread_mutex_unlock");
    }
    return SHX_OK;
}
