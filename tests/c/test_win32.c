/* Drives the block core over the Win32 backend, with real processes: this
 * program starts copies of itself (CreateProcess) for the other side.
 * Cross-compiled with MinGW-w64 and run under Wine in CI (make -C tests/c wine).
 * Prints one line per check and "N passed, N failed".
 */
#define WIN32_LEAN_AND_MEAN
#include <windows.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "queue.h"
#include "segment.h"

static char self_path[MAX_PATH];

static void *to_buffer(void *ctx, uint32_t type, size_t nbytes)
{
    (void)type;
    return nbytes < 256 ? ctx : NULL;
}

/* The committed value as a NUL-terminated string, or "" on error. */
static const char *text_of(shx_block *b)
{
    static char buf[256];
    uint32_t type;
    size_t n;
    shx_error err;
    if (shx_value_get(b, to_buffer, buf, NULL, &type, &n, NULL, &err) != SHX_OK)
        return "<error>";
    buf[n] = '\0';
    return buf;
}

static int set_text(shx_block *b, const char *text)
{
    shx_error err;
    return shx_value_set(b, SHX_TYPE_ASCII, text, strlen(text), NULL, &err);
}

static HANDLE event(const char *block, const char *what)
{
    char name[300];
    snprintf(name, sizeof name, "Local\\%s.%s", block, what);
    return CreateEventA(NULL, TRUE, FALSE, name);
}

/* Starts this program as `child <role> <block>`. */
static HANDLE start_child(const char *role, const char *block)
{
    char cmd[MAX_PATH + 400];
    snprintf(cmd, sizeof cmd, "\"%s\" child %s %s", self_path, role, block);
    STARTUPINFOA si;
    PROCESS_INFORMATION pi;
    memset(&si, 0, sizeof si);
    si.cb = sizeof si;
    if (!CreateProcessA(NULL, cmd, NULL, NULL, FALSE, 0, NULL, NULL, &si, &pi))
        return NULL;
    CloseHandle(pi.hThread);
    return pi.hProcess;
}

static DWORD wait_exit(HANDLE process)
{
    DWORD code = 999;
    WaitForSingleObject(process, 30000);
    GetExitCodeProcess(process, &code);
    CloseHandle(process);
    return code;
}

/* ---- child roles ------------------------------------------------------ */

enum { QUEUE_MESSAGES = 3000 };

/* A queue's roles: put numbered messages (waiting for room), or die holding
 * the producers' lock half way through a record. */
static int queue_child(const char *role, const char *name)
{
    shx_block q = {0};
    shx_error err;
    if (shx_block_open(&q, name, SHX_KIND_QUEUE, 0, 0, 0600, &err) != SHX_OK)
        return 2;
    if (strcmp(role, "qproduce") == 0) {
        for (uint32_t i = 0; i < QUEUE_MESSAGES; i++) {
            char msg[64];
            int n = snprintf(msg, sizeof msg, "message %u", (unsigned)i);
            shx_iov iov = {msg, (size_t)n};
            if (shx_queue_put(&q, SHX_TYPE_BYTES, &iov, 1, 20000000000LL, NULL, &err) != SHX_OK)
                return 3;
        }
        shx_block_close(&q, 0, &err);
        return 0;
    }
    if (strcmp(role, "qlockdie") == 0) {
        int died;
        shx_block_lock(&q, -1, &died, NULL, &err);
        shx_queue_ctl *ctl = (shx_queue_ctl *)(void *)((unsigned char *)q.hdr + SHX_QUEUE_CTL_OFFSET);
        memset(q.data + atomic_load(&ctl->tail) % q.capacity, 'X', 48);
        SetEvent(event(name, "locked"));
        Sleep(30000);
        return 4;
    }
    return 9;
}

static int child(const char *role, const char *name)
{
    shx_block b = {0};
    shx_error err;
    if (role[0] == 'q')
        return queue_child(role, name);
    if (shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) != SHX_OK)
        return 2;
    if (strcmp(role, "open") == 0) { /* attach and leave: must not wait for a held writer lock */
        shx_block_close(&b, 0, &err);
        return 0;
    }
    if (strcmp(role, "read") == 0) {
        if (b.created || strcmp(text_of(&b), "from parent") != 0)
            return 3;
        set_text(&b, "from child");
        shx_block_close(&b, 0, &err);
        return 0;
    }
    if (strcmp(role, "hold") == 0) {
        set_text(&b, "held by the child");
        SetEvent(event(name, "ready"));
        WaitForSingleObject(event(name, "go"), 30000);
        shx_block_close(&b, 0, &err);
        return 0;
    }
    if (strcmp(role, "wait") == 0) {
        /* Sleeps on the block's semaphore until the parent's set(). */
        uint64_t seen = shx_value_version(&b), now = 0;
        SetEvent(event(name, "waiting"));
        int rc = shx_value_wait(&b, seen, (int64_t)20000000000, &now, &err);
        shx_block_close(&b, 0, &err);
        return rc == SHX_OK && now == seen + 1 ? 0 : 5;
    }
    if (strcmp(role, "setlater") == 0) {
        Sleep(100);
        int rc = set_text(&b, "wake the watcher");
        shx_block_close(&b, 0, &err);
        return rc == SHX_OK ? 0 : 6;
    }
    if (strcmp(role, "lockdie") == 0) {
        int died;
        shx_block_lock(&b, -1, &died, NULL, &err);
        /* Scribble over the slot the next writer fills, as a dying writer would. */
        shx_slot *s = &b.hdr->slot[(shx_value_version(&b) + 1) & 1];
        atomic_store(&s->seq, atomic_load(&s->seq) | 1);
        memset(b.data + ((shx_value_version(&b) + 1) & 1) * b.slot_stride, 'X', 64);
        SetEvent(event(name, "locked"));
        Sleep(30000);
        return 4;
    }
    return 9;
}

/* ---- the cases ---------------------------------------------------------- */

/* Whether a named mapping of this name still exists. */
static int mapping_exists(const char *name)
{
    char os_name[256];
    shx_error err;
    if (shx_os_name(name, 0, os_name, sizeof os_name, &err) != SHX_OK)
        return 0;
    HANDLE h = OpenFileMappingA(FILE_MAP_READ, FALSE, os_name);
    if (h != NULL)
        CloseHandle(h);
    return h != NULL;
}

static void test_create_open(const char *name)
{
    char os_name[300];
    shx_error name_err;
    CHECK(shx_os_name("jobs", 0, os_name, sizeof os_name, &name_err) == SHX_OK && strcmp(os_name, "Local\\jobs") == 0,
          "a block's OS name is in the session namespace (%s)", os_name);
    CHECK(shx_os_name("jobs", SHX_OPEN_GLOBAL, os_name, sizeof os_name, &name_err) == SHX_OK &&
              strcmp(os_name, "Global\\jobs") == 0,
          "or with scope=global in the global one (%s)", os_name);
    shx_block a = {0}, b = {0};
    shx_error err;
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, SHX_EXISTING, 0600, &err) == SHX_E_NOTFOUND &&
              !mapping_exists(name),
          "SHX_EXISTING: no block of the name, so none is made");
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created,
          "CreateFileMapping creates the block: created");
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 0, SHX_EXISTING, 0600, &err) == SHX_OK && !b.created,
          "SHX_EXISTING opens a block that exists");
    shx_block_close(&b, 0, &err);
    CHECK(a.capacity == SHX_DEFAULT_CAPACITY && strcmp(text_of(&a), "") == 0, "zero-filled: reads empty");
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && !b.created,
          "ERROR_ALREADY_EXISTS: the second open is not the creator");
    CHECK(set_text(&a, "shared") == SHX_OK && strcmp(text_of(&b), "shared") == 0, "both views share the value");
    shx_block c = {0};
    CHECK(shx_block_open(&c, name, SHX_KIND_VALUE, 1 << 20, 0, 0600, &err) == SHX_E_CAPACITY,
          "asking more than the existing capacity is refused");
    shx_block_close(&a, 0, &err);
    shx_block_close(&b, 0, &err);
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created &&
              strcmp(text_of(&a), "") == 0,
          "after the last handle closed, the next open creates it afresh");
    shx_block_close(&a, 0, &err);
}

static void test_two_processes(const char *name)
{
    shx_block a = {0};
    shx_error err;
    shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err);
    set_text(&a, "from parent");
    DWORD code = wait_exit(start_child("read", name));
    CHECK(code == 0, "a child process reads the parent's value (exit %lu)", (unsigned long)code);
    CHECK(strcmp(text_of(&a), "from child") == 0 && shx_value_version(&a) == 2,
          "the parent reads the child's value, version 2");
    shx_block_close(&a, 0, &err);
}

static void test_lifetime_follows_handles(const char *name)
{
    shx_error err;
    HANDLE ready = event(name, "ready"), go = event(name, "go");
    HANDLE proc = start_child("hold", name);
    CHECK(WaitForSingleObject(ready, 30000) == WAIT_OBJECT_0, "the child holds the block");
    shx_block a = {0};
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && !a.created &&
              strcmp(text_of(&a), "held by the child") == 0,
          "a second process finds it and its value");
    shx_block_close(&a, 0, &err);
    SetEvent(go);
    CHECK(wait_exit(proc) == 0, "the child detaches and exits");
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created &&
              strcmp(text_of(&a), "") == 0,
          "with every handle closed the block is gone: created afresh");
    shx_block_close(&a, 0, &err);
    CloseHandle(ready);
    CloseHandle(go);
}

static void test_killed_sole_holder(const char *name)
{
    shx_error err;
    HANDLE ready = event(name, "ready"), go = event(name, "go");
    HANDLE proc = start_child("hold", name);
    CHECK(WaitForSingleObject(ready, 30000) == WAIT_OBJECT_0 && mapping_exists(name), "the only holder has the block");
    TerminateProcess(proc, 1);
    wait_exit(proc);
    CHECK(!mapping_exists(name), "TerminateProcess of the only holder: the kernel frees the block and its name");
    shx_block a = {0};
    int64_t holders = 0;
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created &&
              strcmp(text_of(&a), "") == 0,
          "and the next open starts from zeros");
    CHECK(shx_block_holders(&a, &holders, &err) == SHX_OK && holders == -1, "holders: Windows cannot tell (-1)");
    shx_block_close(&a, 0, &err);
    CloseHandle(ready);
    CloseHandle(go);
}

static void test_lock_owner_death(const char *name)
{
    shx_block a = {0};
    shx_error err;
    shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err);
    set_text(&a, "committed");
    HANDLE locked = event(name, "locked");
    HANDLE proc = start_child("lockdie", name);
    CHECK(WaitForSingleObject(locked, 30000) == WAIT_OBJECT_0, "the child holds the lock");
    int died = 0;
    CHECK(shx_block_lock(&a, 0, &died, NULL, &err) == SHX_E_TIMEOUT, "so the parent cannot take it");
    CHECK(strcmp(text_of(&a), "committed") == 0, "readers get the committed value while a writer is mid-write");
    CHECK(wait_exit(start_child("open", name)) == 0, "a held writer lock does not keep a new process from attaching");
    TerminateProcess(proc, 1);
    wait_exit(proc);
    CHECK(wait_exit(start_child("open", name)) == 0, "nor does an abandoned one, which attaching leaves alone");
    CHECK(shx_block_lock(&a, 1000000000, &died, NULL, &err) == SHX_OK && died,
          "WAIT_ABANDONED: the next locker gets the lock and learns the owner died");
    CHECK(shx_block_lock(&a, 0, &died, NULL, &err) == SHX_E_OS && err.os_error == EDEADLK,
          "relocking by the holder is an error, as on POSIX (Windows mutexes would recurse)");
    shx_block b = {0};
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK &&
              shx_block_lock(&b, 0, &died, NULL, &err) == SHX_E_OS && err.os_error == EDEADLK,
          "a second handle in the same thread does not take it again (EDEADLK, as on POSIX)");
    CHECK(shx_block_unlock(&b, &err) == SHX_OK, "and either handle of the holding thread releases it");
    shx_block_close(&b, 0, &err);
    CHECK(shx_block_lock(&a, 0, &died, NULL, &err) == SHX_OK && !died, "taken again");
    CHECK(shx_block_unlock(&a, &err) == SHX_OK, "and it releases it");
    CHECK(shx_block_unlock(&a, &err) == SHX_E_OS && err.os_error == EPERM, "releasing a lock not held is an error");
    CHECK(set_text(&a, "after") == SHX_OK && strcmp(text_of(&a), "after") == 0 && set_text(&a, "again") == SHX_OK &&
              strcmp(text_of(&a), "again") == 0,
          "writing works again through both slots");
    shx_block_close(&a, 0, &err);
    CloseHandle(locked);
}

static void test_value_protocol(const char *name)
{
    shx_block a = {0};
    shx_error err;
    shx_block_open(&a, name, SHX_KIND_VALUE, 64, 0, 0600, &err);
    char big[65];
    memset(big, 'a', sizeof big);
    CHECK(shx_value_set(&a, SHX_TYPE_BYTES, big, 65, NULL, &err) == SHX_E_TOOBIG && err.a == 65 && err.b == 64,
          "a value over the capacity is refused");
    CHECK(shx_value_set_utf8(&a, "caf\xc3\xa9", 5, NULL, &err) == SHX_OK, "UTF-8 text is stored");
    char out[16];
    size_t len;
    int is_text;
    CHECK(shx_value_get_utf8(&a, out, sizeof out, &len, &is_text, NULL, NULL, &err) == SHX_OK && is_text && len == 5 &&
              memcmp(out, "caf\xc3\xa9", 5) == 0,
          "and read back as UTF-8");
    uint64_t now;
    CHECK(shx_value_wait(&a, shx_value_version(&a), 20000000, &now, &err) == SHX_E_TIMEOUT, "wait times out");
    shx_block_close(&a, 0, &err);

    shx_block s = {0};
    char seg_name[80];
    snprintf(seg_name, sizeof seg_name, "%s-segment", name);
    CHECK(shx_block_open(&s, seg_name, SHX_KIND_SEGMENT, 1000, 0, 0600, &err) == SHX_OK && s.capacity == 1000,
          "a raw segment of exactly the size asked");
    CHECK(shx_segment_write(&s, 990, "0123456789", 10, NULL, &err) == SHX_OK &&
              shx_segment_write(&s, 991, "0123456789", 10, NULL, &err) == SHX_E_RANGE,
          "segment bounds are checked");
    shx_block_close(&s, 0, &err);
    CHECK(shx_unlink(name, &err) == SHX_E_OS, "unlink is refused: a Windows block lives while a handle is open");
}

static void test_wake_up(const char *name)
{
    shx_block a = {0};
    shx_error err;
    shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err);
    char sem_name[300];
    snprintf(sem_name, sizeof sem_name, "Local\\%s.wake", name);
    HANDLE sem = OpenSemaphoreA(SYNCHRONIZE, FALSE, sem_name);
    CHECK(sem != NULL, "each block has its wake-up semaphore");
    if (sem != NULL)
        CloseHandle(sem);
    HANDLE waiting = event(name, "waiting");
    HANDLE proc = start_child("wait", name);
    WaitForSingleObject(waiting, 30000);
    Sleep(300); /* let it go to sleep on the semaphore */
    CHECK(shx_value_waiters(&a) == 1, "the other process is registered as a waiter");
    ULONGLONG t0 = GetTickCount64();
    set_text(&a, "wake up");
    DWORD code = wait_exit(proc);
    ULONGLONG took = GetTickCount64() - t0;
    CHECK(code == 0, "set() in one process wakes a wait() in another, which sees the new version (%lu)",
          (unsigned long)code);
    CHECK(took < 5000, "promptly (%llu ms)", (unsigned long long)took);
    CHECK(shx_value_waiters(&a) == 0, "and it unregistered");
    shx_block_close(&a, 0, &err);
}

static DWORD WINAPI ring_later(LPVOID p)
{
    Sleep(50);
    shx_os_bell_ring((shx_os_bell *)p);
    return 0;
}

/* One thread sleeping on several blocks' semaphores and a bell. */
static void test_wait_any(const char *name)
{
    char names[3][80];
    shx_block blocks[3];
    memset(blocks, 0, sizeof blocks);
    shx_block *list[3];
    uint64_t seen[3];
    shx_error err;
    int opened = 1;
    for (int i = 0; i < 3; i++) {
        snprintf(names[i], sizeof names[i], "%s-%d", name, i);
        opened &= shx_block_open(&blocks[i], names[i], SHX_KIND_VALUE, 64, 0, 0600, &err) == SHX_OK;
        list[i] = &blocks[i];
        seen[i] = shx_value_version(&blocks[i]);
    }
    shx_os_bell bell;
    CHECK(opened && shx_os_bell_init(&bell, &err) == SHX_OK, "three blocks and a bell");
    if (!opened)
        return;
    HANDLE proc = start_child("setlater", names[2]);
    ULONGLONG t0 = GetTickCount64();
    int rc = shx_value_wait_any(list, seen, 3, &bell, shx_os_bell_rings(&bell), INT64_C(10000000000), &err);
    ULONGLONG took = GetTickCount64() - t0;
    CHECK(rc == SHX_OK && shx_value_version(&blocks[2]) == seen[2] + 1,
          "a set() of the third block in another process ends a wait on all three (%llu ms)", (unsigned long long)took);
    CHECK(wait_exit(proc) == 0 && took < 5000, "promptly");
    int counted = 0;
    for (int i = 0; i < 3; i++)
        counted += (int)shx_value_waiters(&blocks[i]);
    CHECK(counted == 0, "and no waiter is left counted");
    seen[2] = shx_value_version(&blocks[2]);
    HANDLE t = CreateThread(NULL, 0, ring_later, &bell, 0, NULL);
    t0 = GetTickCount64();
    rc = shx_value_wait_any(list, seen, 3, &bell, shx_os_bell_rings(&bell), INT64_C(10000000000), &err);
    took = GetTickCount64() - t0;
    WaitForSingleObject(t, 5000);
    CloseHandle(t);
    CHECK(rc == SHX_OK && took < 5000, "a ring from another thread ends it (%llu ms)", (unsigned long long)took);
    t0 = GetTickCount64();
    rc = shx_value_wait_any(list, seen, 3, &bell, shx_os_bell_rings(&bell), 100 * 1000 * 1000, &err);
    took = GetTickCount64() - t0;
    CHECK(rc == SHX_E_TIMEOUT && took >= 90, "with nothing set it times out (%llu ms)", (unsigned long long)took);
    shx_os_bell_free(&bell);
    for (int i = 0; i < 3; i++)
        shx_block_close(&blocks[i], 0, &err);
}

static void test_global_and_sddl(const char *name)
{
    shx_block a = {0}, b = {0};
    shx_error err;
    char global_name[300];
    snprintf(global_name, sizeof global_name, "Global\\%s", name);
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, SHX_GLOBAL, 0600, &err) == SHX_OK && a.created,
          "SHX_GLOBAL creates the block in the Global\\ namespace");
    HANDLE h = OpenFileMappingA(FILE_MAP_READ, FALSE, global_name);
    CHECK(h != NULL, "it is there under Global\\%s", name);
    if (h != NULL)
        CloseHandle(h);
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && b.created,
          "and the same name in Local\\ is another block");
    shx_block_close(&b, 0, &err);
    shx_block_close(&a, 0, &err);

    /* Everyone: generic all, instead of the per-user default. */
    CHECK(shx_block_open_secured(&a, name, SHX_KIND_VALUE, 0, 0, 0600, "D:P(A;;GA;;;WD)", &err) == SHX_OK,
          "a block created with an SDDL security descriptor");
    CHECK(set_text(&a, "secured") == SHX_OK && strcmp(text_of(&a), "secured") == 0, "works as any other");
    CHECK(shx_os_others_may_write(&a.map) == 1, "a DACL that lets Everyone write is seen as shared");
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && !b.created &&
              shx_os_others_may_write(&b.map) == 1,
          "and so by a later opener that asks for a private block");
    shx_block_close(&b, 0, &err);
    shx_block_close(&a, 0, &err);
    CHECK(shx_block_open(&a, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && a.created &&
              shx_os_others_may_write(&a.map) == 0,
          "a private block (mode 0600: this user alone) is not");
    CHECK(shx_block_open(&b, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK && !b.created &&
              shx_os_others_may_write(&b.map) == 0,
          "nor to another opener");
    shx_block_close(&b, 0, &err);
    shx_block_close(&a, 0, &err);
    CHECK(shx_block_open_secured(&a, name, SHX_KIND_VALUE, 0, 0, 0600, "D:P(A;;GR;;;WD)(A;;GA;;;SY)", &err) == SHX_OK &&
              shx_os_others_may_write(&a.map) == 0,
          "nor one that lets Everyone only read (and the system write)");
    shx_block_close(&a, 0, &err);
    int rc = shx_block_open_secured(&a, name, SHX_KIND_VALUE, 0, 0, 0600, "not SDDL at all", &err);
    CHECK(rc == SHX_E_OS && err.win32 && err.detail != NULL, "an invalid SDDL string is an error (%lu), not ignored",
          (unsigned long)err.os_error);
}

typedef struct {
    char buf[256];
} small_dst;

static void *to_small(void *ctx, uint32_t type, size_t nbytes)
{
    (void)type;
    return nbytes < sizeof(((small_dst *)ctx)->buf) ? ((small_dst *)ctx)->buf : NULL;
}

/* Another process puts into a queue too small for its messages, so that it
 * sleeps for room (the block's one semaphore, shared with the consumers'
 * wait) while this one takes them; then a producer dies holding the lock. */
static void test_queue(const char *name)
{
    shx_block q = {0};
    shx_error err;
    small_dst d;
    uint32_t type;
    size_t n;
    CHECK(shx_block_open(&q, name, SHX_KIND_QUEUE, 256, 0, 0600, &err) == SHX_OK, "a 256-byte queue");
    atomic_store(&q.spin_off, 1);
    HANDLE proc = start_child("qproduce", name);
    int in_order = 1;
    for (uint32_t i = 0; i < QUEUE_MESSAGES && in_order; i++) {
        char want[64];
        int len = snprintf(want, sizeof want, "message %u", (unsigned)i);
        in_order = shx_queue_get(&q, to_small, &d, 20000000000LL, NULL, &type, &n, &err) == SHX_OK &&
                   n == (size_t)len && memcmp(d.buf, want, n) == 0;
    }
    CHECK(wait_exit(proc) == 0 && in_order, "%d messages from another process, in order, both sides sleeping",
          QUEUE_MESSAGES);
    proc = start_child("qlockdie", name);
    WaitForSingleObject(event(name, "locked"), 30000);
    shx_iov iov = {"after", 5};
    CHECK(shx_queue_put(&q, SHX_TYPE_BYTES, &iov, 1, 50000000, NULL, &err) == SHX_E_FULL,
          "a producer waits behind the lock holder");
    TerminateProcess(proc, 1);
    wait_exit(proc);
    CHECK(shx_queue_put(&q, SHX_TYPE_BYTES, &iov, 1, 5000000000LL, NULL, &err) == SHX_OK &&
              shx_queue_get(&q, to_small, &d, 0, NULL, &type, &n, &err) == SHX_OK && n == 5 &&
              memcmp(d.buf, "after", 5) == 0 &&
              shx_queue_get(&q, to_small, &d, 0, NULL, &type, &n, &err) == SHX_E_EMPTY,
          "after the holder is killed the lock is handed on, and its half record never appears");
    shx_block_close(&q, 0, &err);
}

int main(int argc, char **argv)
{
    GetModuleFileNameA(NULL, self_path, sizeof self_path);
    if (argc == 4 && strcmp(argv[1], "child") == 0)
        return child(argv[2], argv[3]);
    char names[10][64];
    for (int i = 0; i < 10; i++)
        snprintf(names[i], sizeof names[i], "shmemext-wtest-%lu-%d", (unsigned long)GetCurrentProcessId(), i);
    test_create_open(names[0]);
    test_two_processes(names[1]);
    test_lifetime_follows_handles(names[2]);
    test_lock_owner_death(names[3]);
    test_value_protocol(names[4]);
    test_wake_up(names[5]);
    test_global_and_sddl(names[6]);
    test_killed_sole_holder(names[7]);
    test_wait_any(names[8]);
    test_queue(names[9]);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
