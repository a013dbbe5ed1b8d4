/* Drives the block core and the platform backend without Python.
 *
 * Each case runs real processes (fork on POSIX) where it claims something
 * about processes.  Prints one line per check and "N passed, N failed".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#include "check.h"
#include "segment.h"

static char prefix[64];

/* test_queue.c: the queue's cases, counted into ours; they reap with wait_child(). */
void run_queue_tests(int *passed_out, int *failed_out);
int wait_child(pid_t pid);

static const char *block_name(const char *what)
{
    static char buf[128];
    snprintf(buf, sizeof buf, "%s-%s", prefix, what);
    return buf;
}

static void describe(const shx_error *err)
{
    char msg[256];
    shx_strerror(err, msg, sizeof msg);
    printf("    (%s)\n", msg);
}

/* A destination for shx_value_get: a fixed buffer. */
typedef struct {
    char buf[1 << 16];
} fixed_dst;

static void *to_fixed(void *ctx, uint32_t type, size_t nbytes)
{
    (void)type;
    return nbytes <= sizeof(((fixed_dst *)ctx)->buf) ? ((fixed_dst *)ctx)->buf : NULL;
}

static int get_text(shx_block *b, char *out, size_t size, uint64_t *version)
{
    static fixed_dst dst;
    uint32_t type;
    size_t n;
    shx_error err;
    int rc = shx_value_get(b, to_fixed, &dst, NULL, &type, &n, version, &err);
    if (rc != SHX_OK || n >= size)
        return -1;
    memcpy(out, dst.buf, n);
    out[n] = '\0';
    return (int)type;
}

static int set_text(shx_block *b, const char *text)
{
    shx_error err;
    int rc = shx_value_set(b, SHX_TYPE_ASCII, text, strlen(text), NULL, &err);
    if (rc != SHX_OK)
        describe(&err);
    return rc;
}

static int object_exists(const char *name)
{
    char os_name[256];
    shx_error err;
    if (shx_os_name(name, 0, os_name, sizeof os_name, &err) != SHX_OK)
        return 0;
    int fd = shm_open(os_name, O_RDONLY, 0);
    if (fd >= 0)
        close(fd);
    return fd >= 0;
}

int wait_child(pid_t pid)
{
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void test_names(void)
{
    shx_error err;
    CHECK(shx_name_check("jobs.v1_A-2", 11, &err) == SHX_OK, "portable name accepted");
    CHECK(shx_name_check("", 0, &err) == SHX_E_NAME, "empty name refused");
    CHECK(shx_name_check("a/b", 3, &err) == SHX_E_NAME, "slash refused");
    CHECK(shx_name_check("..", 2, &err) == SHX_E_NAME, "dot-dot refused");
    CHECK(shx_name_check("a\0b", 3, &err) == SHX_E_NAME, "NUL refused");
    char longname[SHX_NAME_MAX + 2];
    memset(longname, 'x', sizeof longname);
    CHECK(shx_name_check(longname, SHX_NAME_MAX, &err) == SHX_OK, "name of %d accepted", SHX_NAME_MAX);
    CHECK(shx_name_check(longname, SHX_NAME_MAX + 1, &err) == SHX_E_NAME, "name of %d refused", SHX_NAME_MAX + 1);
}

static void test_create_open_release(void)
{
    shx_block a = {0}, b = {0};
    shx_error err;
    char text[64];
    const char *name = block_name("life");

    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created,
          "first open creates the block");
    CHECK(a.capacity == SHX_DEFAULT_CAPACITY, "default capacity is %d", SHX_DEFAULT_CAPACITY);
    CHECK(get_text(&a, text, sizeof text, NULL) == SHX_TYPE_EMPTY && text[0] == '\0', "a new block reads empty");
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && !b.created, "second open finds it");
    CHECK(set_text(&a, "hello") == SHX_OK && get_text(&b, text, sizeof text, NULL) == SHX_TYPE_ASCII &&
              strcmp(text, "hello") == 0,
          "both handles share the value");
    shx_block c = {0}, d = {0};
    CHECK(shx_block_open(&d, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK, "third open");
    CHECK(shx_block_open(&d, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_E_INUSE,
          "opening into a handle still attached is refused");
    CHECK(shx_block_close(&d, 0, &err) == SHX_OK, "third handle detached");
    CHECK(shx_block_open(&c, name, SHX_KIND_VALUE, 1 << 20, 0, 0600, &err) == SHX_E_CAPACITY,
          "asking more capacity than the block has is refused");
    CHECK(shx_block_open(&c, name, SHX_KIND_SEGMENT, 0, 0, 0600, &err) == SHX_E_KIND,
          "opening a value cell as a segment is refused");
    CHECK(shx_block_close(&a, 0, &err) == SHX_OK && object_exists(name), "the block outlives one detach");
    CHECK(shx_block_close(&b, 0, &err) == SHX_OK && !object_exists(name), "the last detach removes it");
    CHECK(shx_block_close(&b, 0, &err) == SHX_OK, "close is idempotent");
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created &&
              get_text(&a, text, sizeof text, NULL) == SHX_TYPE_EMPTY,
          "reopened after release: new and empty");
    shx_block_close(&a, 0, &err);
}

static void test_two_processes(void)
{
    shx_block a = {0};
    shx_error err;
    const char *name = block_name("share");
    shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err);
    set_text(&a, "from parent");
    pid_t pid = fork();
    if (pid == 0) {
        shx_block b = {0};
        char text[64];
        if (shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) != SHX_OK || b.created)
            _exit(2);
        if (get_text(&b, text, sizeof text, NULL) != SHX_TYPE_ASCII || strcmp(text, "from parent") != 0)
            _exit(3);
        set_text(&b, "from child");
        shx_block_close(&b, 0, &err);
        _exit(0);
    }
    int rc = wait_child(pid);
    char text[64];
    uint64_t version;
    CHECK(rc == 0, "a child process reads the parent's value (exit %d)", rc);
    CHECK(get_text(&a, text, sizeof text, &version) == SHX_TYPE_ASCII && strcmp(text, "from child") == 0 &&
              version == 2,
          "the parent reads the child's value, version 2");
    CHECK(object_exists(name), "the child's detach does not release the parent's block");
    shx_block_close(&a, 0, &err);
    CHECK(!object_exists(name), "released once both are gone");
}

static void test_fork_child_outlives_parent(void)
{
    const char *name = block_name("fork");
    int ready[2], done[2];
    if (pipe(ready) != 0 || pipe(done) != 0)
        return;
    pid_t middle = fork();
    if (middle == 0) {
        shx_block a = {0};
        shx_error err;
        if (shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) != SHX_OK)
            _exit(2);
        set_text(&a, "kept by the child");
        pid_t grandchild = fork();
        if (grandchild == 0) {
            char c;
            if (read(done[0], &c, 1) != 1)
                _exit(4); /* the test process says when */
            char text[64];
            int ok = get_text(&a, text, sizeof text, NULL) == SHX_TYPE_ASCII;
            shx_block_close(&a, 0, &err);
            _exit(ok && strcmp(text, "kept by the child") == 0 ? 0 : 5);
        }
        shx_block_close(&a, 0, &err); /* the parent detaches and exits first */
        _exit(write(ready[1], "r", 1) == 1 ? 0 : 3);
    }
    char c;
    int rc = wait_child(middle);
    CHECK(rc == 0 && read(ready[0], &c, 1) == 1, "parent detached after forking");
    CHECK(object_exists(name), "a forked child keeps the block after its parent detached");
    if (write(done[1], "d", 1) != 1)
        return;
    /* The grandchild is not our child: wait for the name to go. */
    for (int i = 0; i < 200 && object_exists(name); i++)
        usleep(10000);
    CHECK(!object_exists(name), "released when the forked child detaches");
}

static void test_persist(void)
{
    shx_block a = {0};
    shx_error err;
    char text[64];
    const char *name = block_name("persist");
    shx_block_open(&a, name, SHX_KIND_VALUE, 0, SHX_PERSIST, 0600, &err);
    set_text(&a, "persisted");
    shx_block_close(&a, 0, &err);
    CHECK(object_exists(name), "a persistent block outlives its last detach");
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, SHX_EXISTING, 0600, &err) == SHX_OK && !a.created &&
              get_text(&a, text, sizeof text, NULL) == SHX_TYPE_ASCII && strcmp(text, "persisted") == 0,
          "and keeps its value (SHX_EXISTING finds it, with no holder)");
    CHECK(shx_unlink(name, &err) == SHX_OK && !object_exists(name), "unlink removes the name");
    shx_block_close(&a, 0, &err);
    CHECK(shx_unlink(name, &err) == SHX_E_OS && err.os_error == ENOENT, "unlinking a missing name: ENOENT");
}

static void test_crash_release(void)
{
    shx_block a = {0};
    shx_error err;
    char text[64];
    const char *name = block_name("crash");
    for (int i = 0; i < 3; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            shx_block b = {0};
            if (shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) != SHX_OK)
                _exit(2);
            set_text(&b, "left by the dead");
            for (;;)
                pause();
        }
        usleep(50000);
        kill(pid, SIGKILL);
        wait_child(pid);
    }
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, SHX_EXISTING, 0600, &err) == SHX_E_NOTFOUND &&
              !object_exists(name),
          "what SIGKILLed holders left is no block to SHX_EXISTING (and is cleared)");
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created &&
              get_text(&a, text, sizeof text, NULL) == SHX_TYPE_EMPTY,
          "after every holder was SIGKILLed, the next open starts afresh");
    shx_block_close(&a, 0, &err);
    CHECK(!object_exists(name), "and its detach leaves nothing behind");
}

static void test_lock_owner_death(void)
{
    shx_block a = {0};
    shx_error err;
    char text[64];
    const char *name = block_name("lockdeath");
    shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err);
    set_text(&a, "committed");
    int pipefd[2];
    if (pipe(pipefd) != 0)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        int died;
        shx_block_lock(&a, -1, &died, NULL, &err);
        /* Scribble over the slot a writer would fill next, as a dying writer would. */
        shx_slot *s = &a.hdr->slot[(shx_value_version(&a) + 1) & 1];
        atomic_store(&s->seq, atomic_load(&s->seq) | 1);
        memset(a.data + ((shx_value_version(&a) + 1) & 1) * a.slot_stride, 'X', 64);
        if (write(pipefd[1], "l", 1) != 1)
            _exit(1);
        for (;;)
            pause();
    }
    char c;
    if (read(pipefd[0], &c, 1) != 1)
        return;
    int died = 0;
    CHECK(shx_block_lock(&a, 0, &died, NULL, &err) == SHX_E_TIMEOUT, "the lock is held by the child");
    CHECK(get_text(&a, text, sizeof text, NULL) == SHX_TYPE_ASCII && strcmp(text, "committed") == 0,
          "readers get the committed value while a writer is mid-write");
    kill(pid, SIGKILL);
    wait_child(pid);
    CHECK(shx_block_lock(&a, 1000000000, &died, NULL, &err) == SHX_OK && died,
          "the next locker gets the lock and learns the owner died");
    CHECK(shx_block_unlock(&a, &err) == SHX_OK, "and releases it");
    CHECK(shx_block_unlock(&a, &err) == SHX_E_OS && err.os_error == EPERM, "releasing a lock not held is an error");
    CHECK(shx_block_lock(&a, 0, &died, NULL, &err) == SHX_OK && shx_block_lock(&a, 0, &died, NULL, &err) == SHX_E_OS &&
              err.os_error == EDEADLK && shx_block_unlock(&a, &err) == SHX_OK,
          "relocking by the holder is an error, not a deadlock");
    CHECK(set_text(&a, "after") == SHX_OK && get_text(&a, text, sizeof text, NULL) == SHX_TYPE_ASCII &&
              strcmp(text, "after") == 0,
          "writing works again after the owner's death");
    CHECK(set_text(&a, "twice") == SHX_OK && get_text(&a, text, sizeof text, NULL) == SHX_TYPE_ASCII &&
              strcmp(text, "twice") == 0,
          "both slots are usable");
    shx_block_close(&a, 0, &err);
}

static void test_value_protocol(void)
{
    shx_block a = {0};
    shx_error err;
    const char *name = block_name("protocol");
    shx_block_open(&a, name, SHX_KIND_VALUE, 64, 0, 0600, &err);
    char big[65];
    memset(big, 'a', sizeof big);
    CHECK(shx_value_set(&a, SHX_TYPE_BYTES, big, 65, NULL, &err) == SHX_E_TOOBIG && err.a == 65 && err.b == 64,
          "a value over the capacity is refused with both sizes");
    CHECK(shx_value_set(&a, SHX_TYPE_BYTES, big, 64, NULL, &err) == SHX_OK, "a value of exactly the capacity fits");

    /* The checks that keep get() from building an invalid str. */
    const unsigned char ascii[] = "plain", latin1[] = "caf\xe9";
    const uint16_t ucs2_ok[] = {0x41, 0x20AC}, ucs2_narrow[] = {0x41, 0x42};
    const uint32_t ucs4_ok[] = {0x41, 0x1F600}, ucs4_narrow[] = {0x41, 0x20AC}, ucs4_high[] = {0x1F600, 0x110000};
    CHECK(shx_value_check(SHX_TYPE_ASCII, ascii, 5, &err) == SHX_OK, "ASCII accepted");
    CHECK(shx_value_check(SHX_TYPE_ASCII, latin1, 4, &err) == SHX_E_BADVALUE, "ASCII with a high byte refused");
    CHECK(shx_value_check(SHX_TYPE_LATIN1, latin1, 4, &err) == SHX_OK, "Latin-1 accepted");
    CHECK(shx_value_check(SHX_TYPE_LATIN1, ascii, 5, &err) == SHX_E_BADVALUE, "Latin-1 without a high byte refused");
    CHECK(shx_value_check(SHX_TYPE_UCS2, ucs2_ok, 4, &err) == SHX_OK, "UCS-2 accepted");
    CHECK(shx_value_check(SHX_TYPE_UCS2, ucs2_narrow, 4, &err) == SHX_E_BADVALUE, "UCS-2 that fits Latin-1 refused");
    CHECK(shx_value_check(SHX_TYPE_UCS2, ucs2_ok, 3, &err) == SHX_E_BADVALUE, "UCS-2 of odd length refused");
    CHECK(shx_value_check(SHX_TYPE_UCS4, ucs4_ok, 8, &err) == SHX_OK, "UCS-4 accepted");
    CHECK(shx_value_check(SHX_TYPE_UCS4, ucs4_narrow, 8, &err) == SHX_E_BADVALUE, "UCS-4 that fits UCS-2 refused");
    CHECK(shx_value_check(SHX_TYPE_UCS4, ucs4_high, 8, &err) == SHX_E_BADVALUE, "UCS-4 beyond U+10FFFF refused");
    CHECK(shx_value_check(9, ascii, 5, &err) == SHX_E_BADVALUE, "unknown type refused");

    /* A committed slot with an impossible length is an error, not an over-read. */
    shx_slot *s = &a.hdr->slot[shx_value_version(&a) & 1];
    uint64_t saved = s->nbytes;
    s->nbytes = UINT64_C(1) << 40;
    fixed_dst dst;
    uint32_t type;
    size_t n;
    CHECK(shx_value_get(&a, to_fixed, &dst, NULL, &type, &n, NULL, &err) == SHX_E_BADVALUE,
          "a hostile length is refused");
    s->nbytes = saved;
    shx_block_close(&a, 0, &err);
}

/* A destination that, the first time it is asked, lets two set()s overtake
 * the reader (so the slot it is on is rewritten) and then says it cannot
 * hold the size it read, as a caller's too small buffer or a failed
 * allocation would: that size was torn, and must not be the answer. */
typedef struct {
    shx_block *b;
    int calls;
    fixed_dst dst;
} overtaken_dst;

static void *overtaken_once(void *ctx, uint32_t type, size_t nbytes)
{
    overtaken_dst *d = (overtaken_dst *)ctx;
    if (d->calls++ == 0) {
        shx_error err;
        (void)shx_value_set(d->b, SHX_TYPE_ASCII, "overtaken", 9, NULL, &err);
        (void)shx_value_set(d->b, SHX_TYPE_ASCII, "newest", 6, NULL, &err);
        return NULL;
    }
    return to_fixed(&d->dst, type, nbytes);
}

static void test_torn_size_is_asked_again(void)
{
    shx_block a = {0};
    shx_error err;
    shx_block_open(&a, block_name("torn-size"), SHX_KIND_VALUE, 64, 0, 0600, &err);
    set_text(&a, "first");
    overtaken_dst d = {&a, 0, {{0}}};
    uint32_t type;
    size_t n;
    int rc = shx_value_get(&a, overtaken_once, &d, NULL, &type, &n, NULL, &err);
    CHECK(rc == SHX_OK && d.calls == 2 && n == 6 && memcmp(d.dst.buf, "newest", 6) == 0,
          "a destination refused for a size a writer has since torn is asked for again (rc %d, %d calls)", rc, d.calls);
    shx_block_close(&a, 0, &err);
}

/* get() checks the copy as it makes it, in chunks: the one unit that decides
 * may sit anywhere, in the first chunk, a later one, or the ragged tail. */
static int get_verdict(shx_block *b, uint32_t type, const void *data, size_t nbytes)
{
    static fixed_dst dst;
    shx_error err;
    uint32_t t;
    size_t n;
    if (shx_value_set(b, type, data, nbytes, NULL, &err) != SHX_OK)
        return -1;
    return shx_value_get(b, to_fixed, &dst, NULL, &t, &n, NULL, &err);
}

static void test_checked_copy(void)
{
    shx_block a = {0};
    shx_error err;
    static unsigned char bytes[60000];
    static uint16_t ucs2[30000];
    static uint32_t ucs4[15000];
    shx_block_open(&a, block_name("checked"), SHX_KIND_VALUE, sizeof bytes, 0, 0600, &err);
    const size_t places[] = {0, 8191, 16384, 40001, sizeof bytes - 1};
    for (size_t i = 0; i < sizeof places / sizeof places[0]; i++) {
        size_t at = places[i];
        memset(bytes, 'a', sizeof bytes);
        bytes[at] = 0xE9;
        CHECK(get_verdict(&a, SHX_TYPE_ASCII, bytes, sizeof bytes - 3) ==
                  (at < sizeof bytes - 3 ? SHX_E_BADVALUE : SHX_OK),
              "ASCII with one high byte at %zu of %zu", at, sizeof bytes - 3);
        CHECK(get_verdict(&a, SHX_TYPE_LATIN1, bytes, sizeof bytes) == SHX_OK, "Latin-1 whose only high byte is at %zu",
              at);
        for (size_t u = 0; u < 30000; u++)
            ucs2[u] = 0x41;
        ucs2[at / 2] = 0x20AC;
        CHECK(get_verdict(&a, SHX_TYPE_UCS2, ucs2, sizeof ucs2) == SHX_OK, "UCS-2 whose only wide unit is at %zu",
              at / 2);
        for (size_t u = 0; u < 15000; u++)
            ucs4[u] = 0x1F600;
        ucs4[at / 4] = 0x110000;
        CHECK(get_verdict(&a, SHX_TYPE_UCS4, ucs4, sizeof ucs4) == SHX_E_BADVALUE,
              "UCS-4 with U+110000 at unit %zu refused", at / 4);
        ucs4[at / 4] = 0xFFFFFFFF;
        CHECK(get_verdict(&a, SHX_TYPE_UCS4, ucs4, sizeof ucs4) == SHX_E_BADVALUE,
              "UCS-4 with 0xFFFFFFFF at unit %zu refused", at / 4);
        for (size_t u = 0; u < 15000; u++)
            ucs4[u] = 0x100000;
        ucs4[at / 4] = 0x10FFFF;
        CHECK(get_verdict(&a, SHX_TYPE_UCS4, ucs4, sizeof ucs4) == SHX_OK, "UCS-4 up to U+10FFFF accepted");
    }
    /* Around the size where the checked copy turns to 32-byte registers, a high
     * byte in each half of a 64-byte step and in the tail. */
    int missed = 0;
    for (size_t n = 200; n <= 400; n++) {
        const size_t at_list[] = {0, 31, 32, 63, 64, 95, 127, n - 9, n - 1};
        for (size_t j = 0; j < sizeof at_list / sizeof at_list[0]; j++) {
            memset(bytes, 'a', n);
            bytes[at_list[j]] = 0x80;
            missed += get_verdict(&a, SHX_TYPE_ASCII, bytes, n) != SHX_E_BADVALUE;
        }
    }
    CHECK(missed == 0, "ASCII of 200 to 400 bytes with one high byte anywhere refused (%d missed)", missed);
    memset(bytes, 'a', sizeof bytes);
    CHECK(get_verdict(&a, SHX_TYPE_LATIN1, bytes, sizeof bytes) == SHX_E_BADVALUE, "Latin-1 with no high byte refused");
    CHECK(get_verdict(&a, SHX_TYPE_ASCII, bytes, 7) == SHX_OK, "a short ASCII value accepted");
    shx_block_close(&a, 0, &err);
}

/* The writer lock lives in the shared bytes too; a scribbled lock type would
 * reach glibc's assertions, so it is refused before glibc sees it.  With lock
 * files the shared part is a marker and an owner word: a scribbled marker is
 * refused the same way. */
static void test_scribbled_lock(void)
{
#if SHX_LOCK_FILES || defined(__GLIBC__)
    shx_block a = {0};
    shx_error err;
    shx_block_open(&a, block_name("scribbled-lock"), SHX_KIND_VALUE, 64, 0, 0600, &err);
    CHECK(shx_value_set(&a, SHX_TYPE_BYTES, "ok", 2, NULL, &err) == SHX_OK, "set before the scribble");
#if SHX_LOCK_FILES
    char *scribbled = (char *)a.hdr->lock_area;
    char saved = *scribbled;
    *scribbled ^= 0x40;
#else
    pthread_mutex_t *mutex = (pthread_mutex_t *)a.hdr->lock_area;
    int *scribbled = &mutex->__data.__kind;
    int saved = *scribbled;
    *scribbled = 0x40 | saved; /* the priority-protect bit */
#endif
    CHECK(shx_value_set(&a, SHX_TYPE_BYTES, "no", 2, NULL, &err) == SHX_E_CORRUPT, "a lock of another type is refused");
    describe(&err);
    *scribbled = saved;
    CHECK(shx_value_set(&a, SHX_TYPE_BYTES, "ok", 2, NULL, &err) == SHX_OK, "and works again once restored");
    shx_block_close(&a, 0, &err);
#endif
}

static void *large_dst(void *ctx, uint32_t type, size_t nbytes)
{
    (void)type;
    (void)nbytes;
    return *(void **)ctx;
}

/* Waits for the other side's next version: SHX_OK, or what went wrong. */
static int answer_wait(shx_block *b, uint64_t *seen)
{
    shx_error err;
    uint64_t now;
    int rc = shx_value_wait(b, *seen, 2000000000, &now, &err);
    *seen = now;
    return rc;
}

/* A child answers each set() of ping with one of pong, `rounds` times.
 * With `phantom`, each set() of ping first counts a waiter that is not there
 * (one that died counted).  Returns the round trips made before one was lost;
 * all of them only if the child also saw every one. */
static int round_trips(shx_block *ping, shx_block *pong, int rounds, int phantom)
{
    shx_error err;
    uint64_t seen_ping = shx_value_version(ping), seen_pong = shx_value_version(pong);
    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < rounds; i++) {
            if (answer_wait(ping, &seen_ping) != SHX_OK ||
                shx_value_set(pong, SHX_TYPE_BYTES, &i, sizeof i, NULL, &err) != SHX_OK)
                _exit(1);
        }
        _exit(0);
    }
    int i = 0;
    for (; i < rounds; i++) {
        if (phantom)
            atomic_fetch_add(&ping->hdr->waiters, 1);
        shx_value_set(ping, SHX_TYPE_BYTES, &i, sizeof i, NULL, &err);
        if (answer_wait(pong, &seen_pong) != SHX_OK)
            break;
    }
    if (i < rounds)
        kill(pid, SIGKILL);
    return wait_child(pid) == 0 ? i : -1;
}

/* Two processes answer each other's set() thousands of times.  The child's
 * waits do not spin, so nearly every one counts itself a waiter and sleeps;
 * the parent's spin, so its next set() comes within a microsecond of the
 * child's answer, while the child is counting itself: a wake-up lost between
 * the two leaves a wait to time out. */
static void test_wait_ping_pong(void)
{
    enum { ROUNDS = 20000 };
    shx_block ping = {0}, pong = {0};
    shx_error err;
    CHECK(shx_block_open(&ping, block_name("ping"), SHX_KIND_VALUE, 16, 0, 0600, &err) == SHX_OK &&
              shx_block_open(&pong, block_name("pong"), SHX_KIND_VALUE, 16, 0, 0600, &err) == SHX_OK,
          "two values to answer on");
    atomic_store(&ping.spin_off, 1);
    int made = round_trips(&ping, &pong, ROUNDS, 0);
    CHECK(made == ROUNDS, "%d set/wait round trips between processes, none lost", made);
    int died;
    uint64_t now;
    CHECK(shx_block_lock(&ping, 0, &died, NULL, &err) == SHX_OK &&
              shx_value_wait(&ping, shx_value_version(&ping), 2000000000, &now, &err) == SHX_E_OS &&
              shx_block_unlock(&ping, &err) == SHX_OK,
          "a wait by the holder of the lock, which no set() could end, is an error");
    shx_block_close(&ping, 0, &err);
    shx_block_close(&pong, 0, &err);
}

#ifdef __linux__
/* A waiter SIGKILLed while it sleeps never uncounts itself.  The set()s
 * after it find nobody asleep and recount; a live waiter is still woken
 * after that, and a phantom count (a dead waiter's, written in each round)
 * makes thousands of round trips recount without losing a wake-up. */
static void test_dead_waiters(void)
{
    enum { ROUNDS = 5000 };
    shx_block ping = {0}, pong = {0};
    shx_error err;
    uint64_t now;
    CHECK(shx_block_open(&ping, block_name("dead-ping"), SHX_KIND_VALUE, 16, 0, 0600, &err) == SHX_OK &&
              shx_block_open(&pong, block_name("dead-pong"), SHX_KIND_VALUE, 16, 0, 0600, &err) == SHX_OK,
          "two values to answer on");
    atomic_store(&ping.spin_off, 1);
    pid_t doomed = fork();
    if (doomed == 0)
        _exit(shx_value_wait(&ping, shx_value_version(&ping), 30000000000, &now, &err) == SHX_OK ? 0 : 1);
    for (int i = 0; i < 2000 && shx_value_waiters(&ping) == 0; i++)
        usleep(1000);
    usleep(50000); /* asleep in the kernel by now */
    kill(doomed, SIGKILL);
    int counted = (int)shx_value_waiters(&ping);
    wait_child(doomed);
    int sets = 0;
    while (shx_value_waiters(&ping) != 0 && sets < 10) {
        shx_value_set(&ping, SHX_TYPE_BYTES, &sets, sizeof sets, NULL, &err);
        sets++;
    }
    CHECK(counted == 1 && shx_value_waiters(&ping) == 0 && sets <= 5,
          "a killed waiter's count is gone after %d set()s (was %d)", sets, counted);

    uint64_t before = shx_value_version(&ping);
    pid_t sleeper = fork();
    if (sleeper == 0)
        _exit(shx_value_wait(&ping, before, 10000000000, &now, &err) == SHX_OK && now == before + 1 ? 0 : 1);
    for (int i = 0; i < 2000 && shx_value_waiters(&ping) == 0; i++)
        usleep(1000);
    usleep(50000);
    int recounted = shx_value_recount_waiters(&ping);
    int again = 0;
    for (int i = 0; i < 2000 && !(again = shx_value_waiters(&ping) == 1); i++)
        usleep(1000);
    uint64_t t0 = shx_os_monotonic_ns();
    shx_value_set(&ping, SHX_TYPE_BYTES, "x", 1, NULL, &err);
    int woke = wait_child(sleeper) == 0;
    CHECK(recounted && again && woke && shx_os_monotonic_ns() - t0 < 1000000000,
          "a sleeping waiter, woken by a recount, counts itself again and wakes on the next set()");

    uint32_t epoch = (uint32_t)(atomic_load(&ping.hdr->waiters) >> 32);
    int made = round_trips(&ping, &pong, ROUNDS, 1);
    uint32_t recounts = (uint32_t)(atomic_load(&ping.hdr->waiters) >> 32) - epoch;
    CHECK(made == ROUNDS && recounts > 0, "%d round trips with a dead waiter counted in each, none lost (%u recounts)",
          made, recounts);
    for (sets = 0; shx_value_waiters(&ping) != 0 && sets < 10; sets++)
        shx_value_set(&ping, SHX_TYPE_BYTES, &sets, sizeof sets, NULL, &err);
    CHECK(shx_value_waiters(&ping) == 0, "and the count is back to zero %d set()s after", sets);
    shx_block_close(&ping, 0, &err);
    shx_block_close(&pong, 0, &err);
}
#endif

/* A checked copy aligns its stores to the destination, so its first bytes
 * are copied twice: at every destination offset in a line, every byte must
 * arrive and a single high byte anywhere (in the doubled head above all) must
 * fail an ASCII value, at sizes around the small-copy and chunk boundaries. */
static void test_checked_copy_alignment(void)
{
    static const size_t sizes[] = {1023, 1024, 1025, 1088, 4096 + 37, 16384, 16384 + 63, 70001};
    const size_t most = 70001;
    unsigned char *src = malloc(most), *out = malloc(most + 128);
    shx_block a = {0};
    shx_error err;
    shx_block_open(&a, block_name("aligned"), SHX_KIND_VALUE, most, 0, 0600, &err);
    int arrived = 1, refused = 1, cases = 0;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        for (size_t i = 0; i < n; i++)
            src[i] = (unsigned char)('a' + (i * 7 + k) % 26);
        size_t spots[] = {0, 1, 15, 16, 31, 32, 33, 63, 64, n / 2, n - 33, n - 1};
        for (size_t off = 0; off < 64; off++) {
            unsigned char *dst = out + off;
            void *dst_ctx = dst;
            uint32_t type;
            size_t got;
            shx_value_set(&a, SHX_TYPE_ASCII, src, n, NULL, &err);
            memset(out, 0, most + 128);
            int rc = shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err);
            arrived &= rc == SHX_OK && got == n && memcmp(dst, src, n) == 0;
            for (size_t j = 0; j < sizeof spots / sizeof spots[0]; j++) {
                src[spots[j]] |= 0x80;
                shx_value_set(&a, SHX_TYPE_ASCII, src, n, NULL, &err);
                refused &= shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err) == SHX_E_BADVALUE;
                src[spots[j]] &= 0x7F;
                cases++;
            }
        }
    }
    CHECK(arrived, "checked copies of 1023 B to 68 KiB arrive whole at all 64 destination offsets");
    CHECK(refused, "a high byte at head, middle or tail fails ASCII at every destination offset (%d cases)", cases);
    shx_block_close(&a, 0, &err);
    free(src);
    free(out);
}

/* Unchecked copies from 4 KiB up go by aligned vector stores, which end with
 * a store over bytes stored already: at every offset of source and
 * destination in a line, each byte must arrive and none past the end be
 * written, for every length of the tail left after the loop. */
static void test_unchecked_copy_alignment(void)
{
    static const size_t sizes[] = {4095, 4096, 4097, 4096 + 31, 4096 + 32, 4096 + 33, 4096 + 63, 70001};
    const size_t most = 70001;
    unsigned char *src = malloc(most + 64), *out = malloc(most + 192);
    for (size_t i = 0; i < most + 64; i++)
        src[i] = (unsigned char)(i * 13 + (i >> 8));
    shx_block v = {0}, seg = {0};
    shx_error err;
    shx_block_open(&v, block_name("unchecked"), SHX_KIND_VALUE, most, 0, 0600, &err);
    shx_block_open(&seg, block_name("unchecked-seg"), SHX_KIND_SEGMENT, most + 128, 0, 0600, &err);
    int values_ok = 1, writes_ok = 1, reads_ok = 1, cases = 0;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        for (size_t so = 0; so < 64; so++) {
            for (size_t dso = 0; dso < 64; dso += so % 8 == 0 ? 1 : 21) {
                uint32_t type;
                size_t got;
                memset(out, 0xA5, most + 192);
                void *dst_ctx = out + 64 + dso;
                shx_value_set(&v, SHX_TYPE_BYTES, src + so, n, NULL, &err);
                int rc = shx_value_get(&v, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err);
                values_ok &= rc == SHX_OK && got == n && memcmp(out + 64 + dso, src + so, n) == 0 &&
                             out[63 + dso] == 0xA5 && out[64 + dso + n] == 0xA5;
                memset(seg.data, 0x5A, most + 128);
                rc = shx_segment_write(&seg, dso, src + so, n, NULL, &err);
                writes_ok &= rc == SHX_OK && memcmp(seg.data + dso, src + so, n) == 0 && seg.data[dso + n] == 0x5A &&
                             (dso == 0 || seg.data[dso - 1] == 0x5A);
                memset(out, 0xA5, most + 192);
                rc = shx_segment_read(&seg, dso, out + 64 + so, n, NULL, &err);
                reads_ok &= rc == SHX_OK && memcmp(out + 64 + so, src + so, n) == 0 && out[64 + so + n] == 0xA5;
                cases++;
            }
        }
    }
    CHECK(values_ok, "byte values of 4095 B to 68 KiB arrive whole, nothing past either end (%d offsets)", cases);
    CHECK(writes_ok, "segment writes of 4095 B to 68 KiB at every offset stay within their range");
    CHECK(reads_ok, "segment reads of 4095 B to 68 KiB at every offset stay within their range");
    shx_block_close(&v, 0, &err);
    shx_block_close(&seg, 0, &err);
    free(src);
    free(out);
}

/* Values of 8 MiB and more go into the block with streaming stores: every
 * byte must still arrive, whatever the alignment of either side. */
static void test_large_copies(void)
{
    const size_t n = ((size_t)9 << 20) + 13;
    unsigned char *src = malloc(n + 16), *out = malloc(n + 64);
    for (size_t i = 0; i < n + 16; i++)
        src[i] = (unsigned char)(i * 31 + (i >> 13));
    shx_block a = {0}, seg = {0};
    shx_error err;
    shx_block_open(&a, block_name("large"), SHX_KIND_VALUE, n, 0, 0600, &err);
    shx_block_open(&seg, block_name("large-seg"), SHX_KIND_SEGMENT, n + 64, 0, 0600, &err);
    int all_ok = 1;
    for (size_t shift = 0; shift < 4; shift++) {
        uint32_t type;
        size_t got;
        shx_value_set(&a, SHX_TYPE_BYTES, src + shift * 3, n - shift, NULL, &err);
        unsigned char *dst = out + shift * 11; /* 0, 11, 22 and 33 bytes past malloc's alignment */
        memset(out, 0x5A, n + 64);
        void *dst_ctx = dst;
        int rc = shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err);
        all_ok &= rc == SHX_OK && got == n - shift && memcmp(dst, src + shift * 3, n - shift) == 0;
        for (unsigned char *p = dst + (n - shift); p < out + n + 64; p++)
            all_ok &= *p == 0x5A;
        for (unsigned char *p = out; p < dst; p++)
            all_ok &= *p == 0x5A;
        rc = shx_segment_write(&seg, 1 + shift * 7, src + shift, n - 8, NULL, &err);
        all_ok &= rc == SHX_OK && memcmp(seg.data + 1 + shift * 7, src + shift, n - 8) == 0;
    }
    CHECK(all_ok, "9 MiB values and segment writes arrive whole at every alignment, nothing written around them");

    /* Text checked while streaming, into destinations 8 or 16 bytes aligned. */
    for (size_t at = 0; at < 2; at++) {
        uint32_t type;
        size_t got;
        unsigned char *dst = out + 8 * at;
        void *dst_ctx = dst;
        size_t len = n - 64;
        memset(src, 'a', len);
        shx_value_set(&a, SHX_TYPE_ASCII, src, len, NULL, &err);
        CHECK(shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err) == SHX_OK && got == len &&
                  dst[len - 1] == 'a',
              "9 MiB of ASCII read back (destination offset %zu)", 8 * at);
        src[len - 5] = 0xE9;
        shx_value_set(&a, SHX_TYPE_ASCII, src, len, NULL, &err);
        CHECK(shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err) == SHX_E_BADVALUE,
              "one high byte near the end of 9 MiB of 'ASCII' is refused (offset %zu)", 8 * at);
        src[len - 5] = 'a';
        src[len / 2] = 0xE9; /* a single high byte decides Latin-1 half way through */
        shx_value_set(&a, SHX_TYPE_LATIN1, src, len, NULL, &err);
        CHECK(shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err) == SHX_OK &&
                  memcmp(dst, src, len) == 0,
              "9 MiB of Latin-1 read back whole (offset %zu)", 8 * at);
        src[len / 2] = 'a';
        src[0] = 0xE9; /* decided in the first chunk: the rest, over 8 MiB, is copied unchecked */
        shx_value_set(&a, SHX_TYPE_LATIN1, src, len, NULL, &err);
        memset(out, 0, n + 64);
        CHECK(shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err) == SHX_OK && got == len &&
                  memcmp(dst, src, len) == 0,
              "9 MiB of Latin-1 decided by its first byte read back whole (offset %zu)", 8 * at);
        uint32_t *units = (uint32_t *)src;
        size_t count = len / 4;
        for (size_t u = 0; u < count; u++)
            units[u] = u == count - 1 ? 0x1F600 : 0x41;
        shx_value_set(&a, SHX_TYPE_UCS4, src, count * 4, NULL, &err);
        CHECK(shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err) == SHX_OK,
              "9 MiB of UCS-4 whose only wide unit is the last (offset %zu)", 8 * at);
        units[count / 3] = 0x110000;
        shx_value_set(&a, SHX_TYPE_UCS4, src, count * 4, NULL, &err);
        CHECK(shx_value_get(&a, large_dst, &dst_ctx, NULL, &type, &got, NULL, &err) == SHX_E_BADVALUE,
              "U+110000 inside 9 MiB of UCS-4 is refused (offset %zu)", 8 * at);
    }
    shx_block_close(&a, 0, &err);
    shx_block_close(&seg, 0, &err);
    free(src);
    free(out);
}

static void test_segment(void)
{
    shx_block a = {0}, b = {0};
    shx_error err;
    const char *name = block_name("segment");
    CHECK(shx_block_open(&a, name, SHX_KIND_SEGMENT, 1000, 0, 0600, &err) == SHX_OK && a.capacity == 1000,
          "a raw segment of exactly the size asked");
    CHECK(((uintptr_t)a.data & 4095) == 0, "segment data is page aligned");
    CHECK(shx_segment_write(&a, 990, "0123456789", 10, NULL, &err) == SHX_OK, "write up to the last byte");
    CHECK(shx_segment_write(&a, 991, "0123456789", 10, NULL, &err) == SHX_E_RANGE && err.a == 1001 && err.b == 1000,
          "a write past the end is refused");
    CHECK(shx_segment_read(&a, UINT64_MAX, NULL, 1, NULL, &err) == SHX_E_RANGE, "an overflowing offset is refused");
    CHECK(shx_block_open(&b, name, SHX_KIND_SEGMENT, 0, 0, 0600, &err) == SHX_OK && !b.created && b.capacity == 1000,
          "a second handle sees the same size");
    char got[10];
    CHECK(shx_segment_read(&b, 990, got, 10, NULL, &err) == SHX_OK && memcmp(got, "0123456789", 10) == 0,
          "and the same bytes");
    CHECK(shx_value_set(&b, SHX_TYPE_BYTES, "x", 1, NULL, &err) == SHX_E_KIND, "a segment is not a value cell");
    shx_block_close(&a, 0, &err);
    shx_block_close(&b, 0, &err);
    CHECK(!object_exists(name), "released like a value cell");
}

static void test_foreign_header(void)
{
    const char *name = block_name("foreign");
    char os_name[160];
    snprintf(os_name, sizeof os_name, "/%s", name);
    int fd = shm_open(os_name, O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, 8192) != 0 || pwrite(fd, "NOTOURS!", 8, 0) != 8)
        return;
    close(fd);
    shx_block a = {0};
    shx_error err;
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_E_FOREIGN,
          "a foreign object under the name is refused, not overwritten");
    shm_unlink(os_name);

    shx_block_open(&a, block_name("newer"), SHX_KIND_VALUE, 0, SHX_PERSIST, 0600, &err);
    a.hdr->layout = SHX_LAYOUT + 1;
    shx_block_close(&a, 0, &err);
    CHECK(shx_block_open(&a, block_name("newer"), SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_E_NEWER &&
              err.a == SHX_LAYOUT + 1,
          "a block of a newer layout is refused");
    shx_unlink(block_name("newer"), &err);
}

static void test_many_attachers(void)
{
    const char *name = block_name("many");
    enum { N = 8 };
    int go[2], results[2];
    if (pipe(go) != 0 || pipe(results) != 0)
        return;
    pid_t pids[N];
    for (int i = 0; i < N; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            char c;
            shx_block b = {0};
            shx_error err;
            if (read(go[0], &c, 1) != 1)
                _exit(1);
            if (shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) != SHX_OK)
                _exit(2);
            char r = b.created ? 'C' : 'o';
            if (write(results[1], &r, 1) != 1)
                _exit(3);
            usleep(200000);
            shx_block_close(&b, 0, &err);
            _exit(0);
        }
    }
    char start[N];
    memset(start, 'g', N);
    if (write(go[1], start, N) != N)
        return;
    int creators = 0, ok = 1;
    for (int i = 0; i < N; i++) {
        char r;
        if (read(results[0], &r, 1) != 1)
            ok = 0;
        creators += r == 'C';
    }
    for (int i = 0; i < N; i++)
        ok &= wait_child(pids[i]) == 0;
    CHECK(ok && creators == 1, "%d processes attaching at once: exactly one created it (%d)", N, creators);
    CHECK(!object_exists(name), "released after all %d detached", N);
}

/* Names of any allowed length work everywhere; where the OS allows short
 * names only (macOS: 31 bytes with the slash), long ones get a short form of
 * a prefix, '~' and a hash, and two names never silently share a block. */
static void test_long_names(void)
{
    shx_error err;
    char one[SHX_NAME_MAX + 1], two[SHX_NAME_MAX + 1], os_one[256], os_two[256], text[64];
    snprintf(one, sizeof one, "%s-long-", prefix);
    size_t n = strlen(one);
    memset(one + n, 'a', SHX_NAME_MAX - n);
    one[SHX_NAME_MAX] = '\0';
    memcpy(two, one, sizeof two);
    two[SHX_NAME_MAX - 1] = 'b';
    CHECK(shx_os_name(one, 0, os_one, sizeof os_one, &err) == SHX_OK &&
              shx_os_name(two, 0, os_two, sizeof os_two, &err) == SHX_OK && strcmp(os_one, os_two) != 0,
          "names differing in the last character have different OS names");
#if SHX_LOCK_FILES
    CHECK(strlen(os_one) <= 31 && strchr(os_one, '~') != NULL, "a long name's OS name fits 31 bytes (%s)", os_one);
    char again[256];
    CHECK(shx_os_name(one, 0, again, sizeof again, &err) == SHX_OK && strcmp(again, os_one) == 0,
          "the short form is stable");
#else
    CHECK(strlen(os_one) == SHX_NAME_MAX + 1, "a long name is used in full");
#endif
    shx_block a = {0}, b = {0};
    CHECK(shx_block_open(&a, one, SHX_KIND_VALUE, 64, 0, 0600, &err) == SHX_OK && a.created &&
              shx_block_open(&b, two, SHX_KIND_VALUE, 64, 0, 0600, &err) == SHX_OK && b.created,
          "two long names with one prefix are two blocks");
    set_text(&a, "one");
    set_text(&b, "two");
    pid_t pid = fork();
    if (pid == 0) {
        shx_block c = {0};
        int ok = shx_block_open(&c, one, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && !c.created &&
                 get_text(&c, text, sizeof text, NULL) == SHX_TYPE_ASCII && strcmp(text, "one") == 0;
        shx_block_close(&c, 0, &err);
        _exit(ok ? 0 : 1);
    }
    CHECK(wait_child(pid) == 0, "another process finds a long-named block by its name");
    shx_block_close(&b, 0, &err);
    CHECK(object_exists(one) && !object_exists(two), "each is released on its own");
    shx_block_close(&a, 0, &err);
    CHECK(!object_exists(one), "and the other too");
}

/* Two threads of one process exclude each other on the writer lock (with lock
 * files this is the process-local half of the lock). */
static void *hold_lock_briefly(void *arg)
{
    shx_block *b = (shx_block *)arg;
    shx_error err;
    int died;
    if (shx_block_lock(b, -1, &died, NULL, &err) != SHX_OK)
        return (void *)1;
    struct timespec ts = {0, 200000000};
    nanosleep(&ts, NULL);
    return shx_block_unlock(b, &err) == SHX_OK ? NULL : (void *)1;
}

static void *lock_and_end(void *arg)
{
    shx_error err;
    int died;
    return shx_block_lock((shx_block *)arg, -1, &died, NULL, &err) == SHX_OK ? NULL : (void *)1;
}

static void test_lock_between_threads(void)
{
    shx_block a = {0};
    shx_error err;
    int died;
    void *result = (void *)1;
    shx_block_open(&a, block_name("threads"), SHX_KIND_VALUE, 64, 0, 0600, &err);
    pthread_t t;
    if (pthread_create(&t, NULL, hold_lock_briefly, &a) != 0)
        return;
    struct timespec ts = {0, 50000000};
    nanosleep(&ts, NULL);
    CHECK(shx_block_lock(&a, 0, &died, NULL, &err) == SHX_E_TIMEOUT, "a second thread cannot take a held lock");
    CHECK(shx_block_unlock(&a, &err) == SHX_E_OS && err.os_error == EPERM, "nor release it");
    CHECK(shx_block_lock(&a, 2000000000, &died, NULL, &err) == SHX_OK && !died, "it gets it once the holder lets go");
    pthread_join(t, &result);
    CHECK(result == NULL && shx_block_unlock(&a, &err) == SHX_OK, "both threads locked and unlocked cleanly");
    if (pthread_create(&t, NULL, lock_and_end, &a) != 0)
        return;
    pthread_join(t, &result);
    CHECK(result == NULL && shx_block_lock(&a, 1000000000, &died, NULL, &err) == SHX_OK && died,
          "a thread that ends holding the lock hands it on as an owner death");
    CHECK(shx_block_unlock(&a, &err) == SHX_OK && shx_block_lock(&a, 0, &died, NULL, &err) == SHX_OK && !died &&
              shx_block_unlock(&a, &err) == SHX_OK,
          "after which it is an ordinary lock again");
    shx_block_close(&a, 0, &err);
}

#if SHX_LOCK_FILES
static const char *lock_file_path(const char *name, const char *suffix)
{
    static char path[1024];
    char os_name[256];
    shx_error err;
    const char *dir = getenv("SHMEMEXT_LOCK_DIR");
    shx_os_name(name, 0, os_name, sizeof os_name, &err);
    snprintf(path, sizeof path, "%s/u%lu/%s%s", dir && *dir ? dir : "/tmp/.shmemext", (unsigned long)geteuid(),
             os_name + 1, suffix);
    return path;
}

static int lock_file_exists(const char *name, const char *suffix)
{
    return access(lock_file_path(name, suffix), F_OK) == 0;
}

/* The lock files live exactly as long as the block, and the live file's
 * record of the full name turns a short-form collision into an error. */
static void test_lock_files(void)
{
    shx_block a = {0}, b = {0};
    shx_error err;
    const char *name = block_name("lockfiles");
    shx_block_open(&a, name, SHX_KIND_VALUE, 64, 0, 0600, &err);
    CHECK(lock_file_exists(name, ".live") && lock_file_exists(name, ".lock") && lock_file_exists(name, ".gate"),
          "an attached block has its three lock files");
    shx_block_close(&a, 0, &err);
    CHECK(!lock_file_exists(name, ".live") && !lock_file_exists(name, ".lock") && !lock_file_exists(name, ".gate"),
          "the last detach removes them with the name");

    shx_block_open(&a, name, SHX_KIND_VALUE, 64, 0, 0600, &err);
    int fd = open(lock_file_path(name, ".live"), O_WRONLY | O_TRUNC);
    CHECK(fd >= 0 && write(fd, "someone-else", 12) == 12, "the live file's name record can be replaced");
    if (fd >= 0)
        close(fd);
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 64, 0, 0600, &err) == SHX_E_OS && err.os_error == EEXIST,
          "a block recorded under another full name is refused");
    describe(&err);
    shx_block_close(&a, 0, &err);
}
#endif

#ifdef __linux__
#include <sched.h>
/* The CPU count that wait() spins by is what this process may run on (its
 * affinity mask), not what the machine has.  Measured in a child: the count
 * is read once per process. */
/* Binds the calling process to one CPU; 0 on success. */
static int bind_to_cpu(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set);
}

/* Runnable threads, machine-wide, as /proc/loadavg says (this one included). */
static long runnable_now(void)
{
    FILE *f = fopen("/proc/loadavg", "r");
    double one, five, fifteen;
    long runnable = -1;
    if (f != NULL) {
        if (fscanf(f, "%lf %lf %lf %ld/", &one, &five, &fifteen, &runnable) != 4)
            runnable = -1;
        fclose(f);
    }
    return runnable;
}

/* Oversubscription is the whole machine's runnable count against its CPUs:
 * a process bound to CPU 0 while another keeps CPU 1 busy is not
 * oversubscribed (its CPU is free), though the machine-wide count (the hog
 * and itself) exceeds its one CPU.  Judged only at moments when the count,
 * read just before and after, is within the CPUs online: other processes of
 * the machine may make it busy at any moment. */
static void test_oversubscribed_counts_the_machine(void)
{
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online < 2)
        return;
    pid_t hog = fork();
    if (hog == 0) {
        (void)bind_to_cpu(1);
        for (;;)
            ;
    }
    pid_t pid = fork();
    if (pid == 0) {
        if (bind_to_cpu(0) != 0)
            _exit(2);
        struct timespec gap = {0, 20000000};
        int judged = 0;
        for (int i = 0; i < 100; i++) {
            long before = runnable_now();
            int over = shx_os_cpus_oversubscribed();
            long after = runnable_now();
            if (before > 1 && before <= online && after <= online) {
                if (over)
                    _exit(1);
                judged++;
            }
            nanosleep(&gap, NULL);
        }
        _exit(judged > 0 ? 0 : 3);
    }
    int rc = wait_child(pid);
    CHECK(rc == 0 || rc == 3, "one busy CPU of two does not make a process bound to the other oversubscribed%s",
          rc == 3 ? " (not judged: the machine stayed busy with other work)" : "");
    kill(hog, SIGKILL);
    (void)waitpid(hog, NULL, 0);
}

static void test_cpu_count_follows_affinity(void)
{
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        if (bind_to_cpu(0) != 0)
            _exit(2);
        _exit(shx_os_cpu_count() == 1 ? 0 : 1);
    }
    CHECK(wait_child(pid) == 0, "a process bound to one CPU counts one CPU");
}
#endif

/* ---- the handle guard: calls and closes from many threads ---- */

typedef struct {
    shx_guard guard;
    unsigned char *mapping; /* freed by the one close that wins: ASan/valgrind see any use after */
    _Atomic int detaches;
    _Atomic int used_after; /* a call that saw the mapping gone while inside the guard */
    _Atomic long calls;
    _Atomic int stop;
    int refuse_first;     /* the first winner gives up, as a close() refused for an export does */
    pthread_mutex_t *big; /* where set: the lock of serialized callers (a GIL), which closers hold too */
} guard_case;

static void guard_pause(void *ctx)
{
    (void)ctx;
    sched_yield();
}

/* A closer's pause under the big lock lets it go meanwhile, as close() does the GIL. */
static void guard_pause_unlocked(void *ctx)
{
    guard_case *c = (guard_case *)ctx;
    pthread_mutex_unlock(c->big);
    sched_yield();
    pthread_mutex_lock(c->big);
}

static void guard_touch(guard_case *c)
{
    unsigned char *m = c->mapping;
    if (m == NULL)
        atomic_fetch_add(&c->used_after, 1);
    else
        __atomic_fetch_add(&m[atomic_fetch_add(&c->calls, 1) % 4096], 1, __ATOMIC_RELAXED);
}

/* A call under the big lock that lets it go mid-way every other time, as a
 * long copy or a wait lets the GIL go, and uses the mapping on both sides. */
static void *guard_user_serialized(void *arg)
{
    guard_case *c = (guard_case *)arg;
    for (long n = 0; !atomic_load(&c->stop); n++) {
        pthread_mutex_lock(c->big);
        if (shx_guard_enter_serialized(&c->guard)) {
            guard_touch(c);
            if (n % 2) {
                pthread_mutex_unlock(c->big);
                guard_touch(c);
                sched_yield(); /* a closer gets the lock now */
                guard_touch(c);
                pthread_mutex_lock(c->big);
            }
            guard_touch(c);
            shx_guard_leave_serialized(&c->guard);
        }
        int closed = shx_guard_closed(&c->guard);
        pthread_mutex_unlock(c->big);
        if (closed)
            break;
        sched_yield();
    }
    return NULL;
}

static void *guard_user(void *arg)
{
    guard_case *c = (guard_case *)arg;
    while (!atomic_load(&c->stop)) {
        if (!shx_guard_enter(&c->guard)) {
            if (shx_guard_closed(&c->guard))
                break;
            sched_yield();
            continue;
        }
        guard_touch(c);
        shx_guard_leave(&c->guard);
    }
    return NULL;
}

static void *guard_closer(void *arg)
{
    guard_case *c = (guard_case *)arg;
    const shx_guard_waiter waiter = {c->big != NULL ? guard_pause_unlocked : guard_pause, c};
    if (c->big != NULL)
        pthread_mutex_lock(c->big);
    for (;;) {
        int r = shx_guard_close(&c->guard, 0, &waiter);
        if (r == SHX_GUARD_DONE)
            break;
        if (c->refuse_first) {
            c->refuse_first = 0;
            shx_guard_close_end(&c->guard, 0);
            continue; /* and close again, now for real */
        }
        unsigned char *m = c->mapping;
        c->mapping = NULL;
        free(m);
        atomic_fetch_add(&c->detaches, 1);
        shx_guard_close_end(&c->guard, 1);
        break;
    }
    if (c->big != NULL)
        pthread_mutex_unlock(c->big);
    return NULL;
}

/* Rounds of users calling and closers closing at once; with `big`, half
 * the users are serialized callers under it. */
static void guard_rounds(pthread_mutex_t *big)
{
    enum { USERS = 4, CLOSERS = 3 };
    const char *how = big != NULL ? "guard (half the callers serialized under a lock the closers hold)" : "guard";
    /* Fewer under valgrind, which runs one thread at a time. */
    const char *env = getenv("SHX_GUARD_ROUNDS");
    const int ROUNDS = env != NULL ? atoi(env) : 200;
    int bad_detaches = 0, used_after = 0, not_closed = 0;
    long calls = 0;
    for (int round = 0; round < ROUNDS; round++) {
        guard_case c;
        memset(&c, 0, sizeof c);
        shx_guard_init(&c.guard);
        c.mapping = (unsigned char *)calloc(1, 4096);
        c.refuse_first = round % 2;
        c.big = big;
        pthread_t users[USERS], closers[CLOSERS];
        for (int i = 0; i < USERS; i++)
            pthread_create(&users[i], NULL, big != NULL && i % 2 ? guard_user_serialized : guard_user, &c);
        struct timespec pause = {0, (round % 7) * 20000L};
        nanosleep(&pause, NULL);
        for (int i = 0; i < CLOSERS; i++)
            pthread_create(&closers[i], NULL, guard_closer, &c);
        for (int i = 0; i < CLOSERS; i++)
            pthread_join(closers[i], NULL);
        atomic_store(&c.stop, 1);
        for (int i = 0; i < USERS; i++)
            pthread_join(users[i], NULL);
        bad_detaches += atomic_load(&c.detaches) != 1;
        used_after += atomic_load(&c.used_after);
        not_closed += !shx_guard_closed(&c.guard) || shx_guard_inflight(&c.guard) != 0;
        calls += atomic_load(&c.calls);
    }
    CHECK(bad_detaches == 0, "%s: %d rounds of %d threads calling and %d closing: one detach each (%d rounds not)", how,
          ROUNDS, USERS, CLOSERS, bad_detaches);
    CHECK(used_after == 0 && calls > 0, "%s: no call used the mapping after its close (%d did; %ld calls)", how,
          used_after, calls);
    CHECK(not_closed == 0, "%s: every round ends CLOSED with nothing in flight (%d did not)", how, not_closed);
}

static void test_guard_threads(void)
{
    guard_rounds(NULL);
    pthread_mutex_t big = PTHREAD_MUTEX_INITIALIZER;
    guard_rounds(&big);

    /* A close() from inside a call of its own thread (a signal handler's)
     * cannot wait for that call: it is deferred, and a second close() from
     * the same place returns at once. */
    shx_guard g;
    shx_guard_init(&g);
    static const shx_guard_waiter waiter = {guard_pause, NULL};
    int entered = shx_guard_enter(&g);
    int first = shx_guard_close(&g, 1, &waiter);
    int second = shx_guard_close(&g, 1, &waiter);
    int refused = shx_guard_enter(&g);
    CHECK(entered && first == SHX_GUARD_DEFER && atomic_load(&g.deferred) && second == SHX_GUARD_DONE && !refused,
          "guard: a close inside the thread's own call is deferred; calls after it are refused");
    shx_guard_leave(&g);
    shx_guard_close_end(&g, 1);
    CHECK(shx_guard_close(&g, 0, &waiter) == SHX_GUARD_DONE && shx_guard_closed(&g),
          "guard: closing a closed guard is done at once");
}

/* One thread sleeping on many values: a set() in another process, a ring,
 * a nudge and the timeout each end the wait, and it leaves no waiter counted. */
typedef struct {
    shx_os_bell *bell;
    shx_block *block; /* nudged instead, when set */
} ringer_arg;

static void *ring_later(void *p)
{
    ringer_arg *r = (ringer_arg *)p;
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if (r->block != NULL)
        shx_value_nudge_watchers(r->block);
    else
        shx_os_bell_ring(r->bell);
    return NULL;
}

static double ms_since(uint64_t start) { return (double)(shx_os_monotonic_ns() - start) / 1e6; }

static void test_wait_any(void)
{
    enum { N = 3 };
    shx_block blocks[N];
    shx_block *list[N];
    uint64_t seen[N];
    shx_error err;
    char names[N][128];
    int opened = 1;
    for (int i = 0; i < N; i++) {
        char what[16];
        snprintf(what, sizeof what, "any%d", i);
        snprintf(names[i], sizeof names[i], "%s", block_name(what));
        memset(&blocks[i], 0, sizeof blocks[i]);
        opened &= shx_block_open(&blocks[i], names[i], SHX_KIND_VALUE, 64, 0, 0600, &err) == SHX_OK;
        list[i] = &blocks[i];
        seen[i] = shx_value_version(&blocks[i]);
    }
    CHECK(opened, "three value blocks to watch");
    if (!opened)
        return;
    shx_os_bell bell;
    CHECK(shx_os_bell_init(&bell, &err) == SHX_OK, "a bell");

    pid_t pid = fork();
    if (pid == 0) {
        shx_block b = {0};
        if (shx_block_open(&b, names[1], SHX_KIND_VALUE, 64, 0, 0600, &err) != SHX_OK)
            _exit(2);
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
        _exit(set_text(&b, "wake the watcher") == SHX_OK ? 0 : 3);
    }
    uint64_t start = shx_os_monotonic_ns();
    int rc = shx_value_wait_any(list, seen, N, &bell, shx_os_bell_rings(&bell), INT64_C(10000000000), &err);
    double took = ms_since(start);
    CHECK(rc == SHX_OK && shx_value_version(&blocks[1]) == seen[1] + 1,
          "a set() of the second of three blocks in another process ends the wait (%.1f ms)", took);
    CHECK(took < 5000 && wait_child(pid) == 0, "promptly, and the child set it");
    int counted = 0;
    for (int i = 0; i < N; i++)
        counted += (int)shx_value_waiters(&blocks[i]) + atomic_load(&blocks[i].watching);
    CHECK(counted == 0, "and no waiter is left counted on any of them");
    seen[1] = shx_value_version(&blocks[1]);

    start = shx_os_monotonic_ns();
    rc = shx_value_wait_any(list, seen, N, &bell, shx_os_bell_rings(&bell), 100 * 1000 * 1000, &err);
    took = ms_since(start);
    CHECK(rc == SHX_E_TIMEOUT && took >= 99 && took < 3000, "with nothing set it times out (%.1f ms)", took);

    uint32_t rung = shx_os_bell_rings(&bell);
    shx_os_bell_ring(&bell);
    start = shx_os_monotonic_ns();
    rc = shx_value_wait_any(list, seen, N, &bell, rung, INT64_C(10000000000), &err);
    CHECK(rc == SHX_OK && ms_since(start) < 1000, "a ring made after the count was read ends it at once");

    pthread_t t;
    ringer_arg ring = {&bell, NULL};
    pthread_create(&t, NULL, ring_later, &ring);
    start = shx_os_monotonic_ns();
    rc = shx_value_wait_any(list, seen, N, &bell, shx_os_bell_rings(&bell), INT64_C(10000000000), &err);
    took = ms_since(start);
    pthread_join(t, NULL);
    CHECK(rc == SHX_OK && took < 5000, "a ring from another thread wakes it (%.1f ms)", took);

    ringer_arg nudge = {&bell, &blocks[2]};
    pthread_create(&t, NULL, ring_later, &nudge);
    start = shx_os_monotonic_ns();
    rc = shx_value_wait_any(list, seen, N, &bell, shx_os_bell_rings(&bell), INT64_C(10000000000), &err);
    took = ms_since(start);
    pthread_join(t, NULL);
    CHECK(rc == SHX_OK && took < 5000 && shx_value_version(&blocks[2]) == seen[2],
          "so does a nudge of one block's watchers (a close()), which changes nothing (%.1f ms)", took);

    seen[0] = seen[0] + 7;
    CHECK(shx_value_wait_any(list, seen, N, &bell, shx_os_bell_rings(&bell), INT64_C(10000000000), &err) == SHX_OK,
          "a version that differs already returns at once");
    CHECK(shx_value_wait_any(list, seen, SHX_WAIT_ANY_MAX + 1, &bell, 0, 0, &err) == SHX_E_SIZE &&
              err.a == SHX_WAIT_ANY_MAX + 1 && err.b == SHX_WAIT_ANY_MAX,
          "more than %d blocks are refused", SHX_WAIT_ANY_MAX);
    shx_os_bell_free(&bell);
    for (int i = 0; i < N; i++)
        shx_block_close(&blocks[i], 0, &err);
    shx_block *closed = &blocks[0];
    CHECK(shx_value_wait_any(&closed, seen, 1, &bell, 0, 0, &err) == SHX_E_CLOSED, "a closed block is refused");
}

int main(void)
{
    snprintf(prefix, sizeof prefix, "shmemext-ctest-%d", (int)getpid());
#ifdef __linux__
    test_cpu_count_follows_affinity();
    test_oversubscribed_counts_the_machine();
#endif
    test_names();
    test_create_open_release();
    test_two_processes();
    test_fork_child_outlives_parent();
    test_persist();
    test_crash_release();
    test_lock_owner_death();
    test_value_protocol();
    test_torn_size_is_asked_again();
    test_checked_copy();
    test_scribbled_lock();
    test_wait_ping_pong();
#ifdef __linux__
    test_dead_waiters();
#endif
    test_checked_copy_alignment();
    test_unchecked_copy_alignment();
    test_large_copies();
    test_segment();
    test_foreign_header();
    test_many_attachers();
    test_long_names();
    test_lock_between_threads();
    test_guard_threads();
    test_wait_any();
#if SHX_LOCK_FILES
    test_lock_files();
#endif
    run_queue_tests(&passed, &failed);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
