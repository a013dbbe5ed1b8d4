/* Win32 backend: a paging-file-backed named file mapping, as in the classic
 * "shared memory in a DLL" pattern, and a named mutex as the writer lock.
 *
 * Lifetime needs no bookkeeping here: the kernel keeps a named mapping while
 * any handle to it is open and drops it with the last one, also when a
 * process dies.  Attachers serialize on a named mutex of their own
 * (NAME.attach), so nobody reads a header its creator has not finished; the
 * writer lock is another (NAME.lock), which attach never touches: a held lock
 * does not keep anyone from attaching, and its WAIT_ABANDONED is left for
 * the next writer to see.
 */
#define WIN32_LEAN_AND_MEAN
#include <limits.h>
#include <windows.h>
#include <sddl.h>
#include <aclapi.h>

#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "platform.h"

#ifndef EDEADLK
#define EDEADLK 36
#endif

int shx_fail_os(shx_error *err, const char *op)
{
    DWORD code = GetLastError();
    shx_fail(err, SHX_E_OS, 0, 0, NULL);
    err->os_error = (int)code;
    err->win32 = 1;
    err->op = op;
    return SHX_E_OS;
}

/* An error in errno terms (EDEADLK, EPERM) that the callers test for. */
static int fail_errno(shx_error *err, int code, const char *op)
{
    shx_fail(err, SHX_E_OS, 0, 0, NULL);
    err->os_error = code;
    err->op = op;
    return SHX_E_OS;
}

uint32_t shx_os_pid(void) { return (uint32_t)GetCurrentProcessId(); }

/* "Local\<name><suffix>" (or "Global\...") as UTF-16; names are ASCII (checked by the core). */
static void object_name(wchar_t *out, size_t cap, const char *name, const char *suffix, int global)
{
    const wchar_t *prefix = global ? L"Global\\" : L"Local\\";
    size_t n = 0;
    for (const wchar_t *p = prefix; *p && n + 1 < cap; p++)
        out[n++] = *p;
    for (const char *p = name; *p && n + 1 < cap; p++)
        out[n++] = (wchar_t)(unsigned char)*p;
    for (const char *p = suffix; *p && n + 1 < cap; p++)
        out[n++] = (wchar_t)(unsigned char)*p;
    out[n] = 0;
}

int shx_os_name(const char *name, unsigned flags, char *out, size_t size, shx_error *err)
{
    int n = snprintf(out, size, "%s%s", (flags & SHX_OPEN_GLOBAL) ? "Global\\" : "Local\\", name);
    if (n < 0 || (size_t)n >= size)
        return shx_fail(err, SHX_E_NAME, strlen(name), size - 1, "is too long for this system");
    return SHX_OK;
}

static SECURITY_ATTRIBUTES *from_sddl(SECURITY_ATTRIBUTES *sa, const char *sddl, shx_error *err, int *rc)
{
    PSECURITY_DESCRIPTOR sd = NULL;
    if (!ConvertStringSecurityDescriptorToSecurityDescriptorA(sddl, SDDL_REVISION_1, &sd, NULL)) {
        *rc = shx_fail_os(err, "ConvertStringSecurityDescriptorToSecurityDescriptor");
        err->detail = "the security string is not a valid SDDL descriptor";
        return NULL;
    }
    sa->nLength = sizeof *sa;
    sa->lpSecurityDescriptor = sd;
    sa->bInheritHandle = FALSE;
    return sa;
}

/* Room for the TOKEN_USER of this process's token: its SID follows it. */
typedef union token_user_buf {
    TOKEN_USER user;
    char bytes[256];
} token_user_buf;

/* The SID of the user this process runs as (inside *buf), or NULL with the
 * failed call's name in *failed and its error in GetLastError(). */
static PSID current_user(token_user_buf *buf, const char **failed)
{
    HANDLE token;
    DWORD len = 0;
    if (!OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &token)) {
        *failed = "OpenProcessToken";
        return NULL;
    }
    BOOL ok = GetTokenInformation(token, TokenUser, buf, sizeof *buf, &len);
    DWORD error = GetLastError();
    CloseHandle(token);
    if (!ok) {
        SetLastError(error);
        *failed = "GetTokenInformation";
        return NULL;
    }
    return buf->user.User.Sid;
}

/* Security for new objects: the caller's SDDL if given; else, for a private
 * block, a DACL granting only the current user; else NULL (the default DACL). */
static SECURITY_ATTRIBUTES *object_security(SECURITY_ATTRIBUTES *sa, unsigned mode, const char *security,
                                            shx_error *err, int *rc)
{
    *rc = SHX_OK;
    if (security != NULL)
        return from_sddl(sa, security, err, rc);
    if ((mode & 077) != 0)
        return NULL;
    token_user_buf buf;
    const char *failed = NULL;
    PSID user = current_user(&buf, &failed);
    if (user == NULL) {
        *rc = shx_fail_os(err, failed);
        return NULL;
    }
    wchar_t *sid = NULL;
    if (!ConvertSidToStringSidW(user, &sid)) {
        *rc = shx_fail_os(err, "ConvertSidToStringSidW");
        return NULL;
    }
    /* Protected DACL, generic-all for the user alone: "D:P(A;;GA;;;<sid>)". */
    wchar_t sddl[256];
    size_t n = 0;
    for (const wchar_t *parts[] = {L"D:P(A;;GA;;;", sid, L")"}, **p = parts; p < parts + 3; p++)
        for (const wchar_t *c = *p; *c && n + 1 < sizeof sddl / sizeof sddl[0]; c++)
            sddl[n++] = *c;
    sddl[n] = 0;
    LocalFree(sid);
    PSECURITY_DESCRIPTOR sd = NULL;
    if (!ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, SDDL_REVISION_1, &sd, NULL)) {
        *rc = shx_fail_os(err, "ConvertStringSecurityDescriptorToSecurityDescriptorW");
        return NULL;
    }
    sa->nLength = sizeof *sa;
    sa->lpSecurityDescriptor = sd;
    sa->bInheritHandle = FALSE;
    return sa;
}

static void close_all(shx_os_map *m)
{
    if (m->base != NULL)
        UnmapViewOfFile(m->base);
    if (m->mapping != NULL)
        CloseHandle((HANDLE)m->mapping);
    if (m->mutex != NULL)
        CloseHandle((HANDLE)m->mutex);
    if (m->wake != NULL)
        CloseHandle((HANDLE)m->wake);
    m->base = NULL;
    m->mapping = NULL;
    m->mutex = NULL;
    m->wake = NULL;
    m->size = 0;
}

int shx_os_attach(shx_os_map *m, const char *name, size_t size, unsigned mode, unsigned flags, const char *security,
                  shx_prepare_fn prepare, void *ctx, const shx_os_interrupt *intr, int *created, shx_error *err)
{
    /* Ownership (SHX_OPEN_REQUIRE_OWNER) is enforced by the DACL. */
    int global = (flags & SHX_OPEN_GLOBAL) != 0;
    size_t n = strlen(name);
    memset(m, 0, sizeof *m);
    *created = 0;
    int rc;
    if (n + 1 > sizeof m->os_name)
        return shx_fail(err, SHX_E_NAME, n, sizeof m->os_name - 1, "name too long");
    if ((rc = shx_os_name(name, flags, m->os_name, sizeof m->os_name, err)) != SHX_OK)
        return rc;

    wchar_t map_name[300], lock_name[300], wake_name[300], attach_name[300];
    object_name(map_name, 300, name, "", global);
    object_name(lock_name, 300, name, ".lock", global);
    object_name(wake_name, 300, name, ".wake", global);
    object_name(attach_name, 300, name, ".attach", global);
    SECURITY_ATTRIBUTES sa_storage;
    HANDLE gate = NULL;
    SECURITY_ATTRIBUTES *sa = object_security(&sa_storage, mode, security, err, &rc);
    if (rc != SHX_OK)
        return rc;

    m->mutex = CreateMutexW(sa, FALSE, lock_name);
    if (m->mutex == NULL) {
        rc = shx_fail_os(err, "CreateMutexW");
        if (global && err->os_error == ERROR_ACCESS_DENIED)
            err->detail =
                "a Global\\ block needs SeCreateGlobalPrivilege (services and elevated administrators have it)";
        goto done;
    }
    m->wake = CreateSemaphoreW(sa, 0, LONG_MAX, wake_name);
    if (m->wake == NULL) {
        rc = shx_fail_os(err, "CreateSemaphoreW");
        goto done;
    }
    gate = CreateMutexW(sa, FALSE, attach_name);
    if (gate == NULL) {
        rc = shx_fail_os(err, "CreateMutexW");
        goto done;
    }
    /* An attacher that died in here abandoned the gate: its half-made
     * mapping went with its handles, so WAIT_ABANDONED is as good as free. */
    DWORD w;
    for (;;) {
        w = WaitForSingleObject(gate, intr != NULL && intr->interrupted != NULL ? SHX_OS_POLL_NS / 1000000 : INFINITE);
        if (w != WAIT_TIMEOUT)
            break;
        if (intr->interrupted(intr->ctx)) {
            rc = shx_fail(err, SHX_E_INTERRUPTED, 0, 0, NULL);
            goto done;
        }
    }
    if (w != WAIT_OBJECT_0 && w != WAIT_ABANDONED) {
        rc = shx_fail_os(err, "WaitForSingleObject");
        goto done;
    }
    m->mapping = CreateFileMappingW(INVALID_HANDLE_VALUE, sa, PAGE_READWRITE | SEC_COMMIT,
                                    (DWORD)((uint64_t)size >> 32), (DWORD)(size & 0xFFFFFFFFu), map_name);
    DWORD created_error = GetLastError();
    if (m->mapping == NULL) {
        rc = shx_fail_os(err, "CreateFileMappingW");
        if (global && err->os_error == ERROR_ACCESS_DENIED)
            err->detail =
                "a Global\\ block needs SeCreateGlobalPrivilege (services and elevated administrators have it)";
    } else {
        int existed = created_error == ERROR_ALREADY_EXISTS;
        if (!existed && (flags & SHX_OPEN_EXISTING)) {
            /* Made just now, by us alone under the gate: it goes with its handle below. */
            rc = shx_fail(err, SHX_E_NOTFOUND, 0, 0, NULL);
            goto unlock;
        }
        m->base = MapViewOfFile((HANDLE)m->mapping, FILE_MAP_ALL_ACCESS, 0, 0, 0);
        MEMORY_BASIC_INFORMATION info;
        if (m->base == NULL) {
            rc = shx_fail_os(err, "MapViewOfFile");
        } else if (VirtualQuery(m->base, &info, sizeof info) == 0) {
            rc = shx_fail_os(err, "VirtualQuery");
        } else {
            /* An existing mapping's size is only known rounded to pages. */
            m->size = existed ? info.RegionSize : size;
            rc = prepare(ctx, m, existed ? SHX_ATTACH_SHARED : SHX_ATTACH_FRESH, err);
            *created = rc == SHX_OK && !existed;
        }
    }
unlock:
    ReleaseMutex(gate);
done:
    if (gate != NULL)
        CloseHandle(gate);
    if (sa != NULL)
        LocalFree(sa->lpSecurityDescriptor);
    if (rc != SHX_OK) {
        close_all(m);
        *created = 0;
    }
    return rc;
}

int shx_os_detach(shx_os_map *m, shx_keep_name_fn keep_name, int at_exit, const shx_os_interrupt *intr, shx_error *err)
{
    (void)intr;      /* closing handles never waits */
    (void)keep_name; /* no kernel persistence: `hold` keeps a handle open instead */
    (void)err;
    if (at_exit)
        return SHX_OK; /* process exit closes every handle */
    close_all(m);
    return SHX_OK;
}

void shx_os_detach_all_at_exit(shx_keep_name_fn keep_name) { (void)keep_name; }

int shx_os_unlink(const char *name, shx_error *err)
{
    (void)name;
    SetLastError(ERROR_NOT_SUPPORTED);
    return shx_fail_os(err, "unlink (a Windows block lives exactly while a handle is open)");
}

int shx_os_holders(shx_os_map *m, int64_t *count, shx_error *err)
{
    if (m->mapping == NULL)
        return shx_fail(err, SHX_E_CLOSED, 0, 0, NULL);
    *count = -1; /* the kernel counts the handles, but tells nobody how many */
    return SHX_OK;
}

/* Rights over a section that let their holder change its memory, or its
 * DACL so as to grant itself that. */
#define WRITE_RIGHTS (SECTION_MAP_WRITE | GENERIC_WRITE | GENERIC_ALL | WRITE_DAC | WRITE_OWNER)

/* The user this process runs as, the system, and the administrators (who
 * can take any object anyway) are not "others". */
static int is_ours(PSID sid, PSID user)
{
    return EqualSid(sid, user) || IsWellKnownSid(sid, WinLocalSystemSid) ||
           IsWellKnownSid(sid, WinBuiltinAdministratorsSid);
}

int shx_os_others_may_write(shx_os_map *m)
{
    PACL dacl = NULL;
    PSECURITY_DESCRIPTOR sd = NULL;
    if (GetSecurityInfo((HANDLE)m->mapping, SE_KERNEL_OBJECT, DACL_SECURITY_INFORMATION, NULL, NULL, &dacl, NULL,
                        &sd) != ERROR_SUCCESS)
        return -1;
    token_user_buf buf;
    const char *failed = NULL;
    PSID user = current_user(&buf, &failed);
    int result = user == NULL ? -1 : dacl == NULL ? 1 : 0; /* no DACL at all: everyone has every right */
    for (DWORD i = 0; result == 0 && i < dacl->AceCount; i++) {
        ACE_HEADER *ace;
        if (!GetAce(dacl, i, (void **)&ace)) {
            result = -1;
            break;
        }
        /* Denials are not subtracted: what is allowed to others at all is
         * what counts, which can only err towards "may". */
        if (ace->AceType != ACCESS_ALLOWED_ACE_TYPE)
            continue;
        ACCESS_ALLOWED_ACE *allowed = (ACCESS_ALLOWED_ACE *)ace;
        if ((allowed->Mask & WRITE_RIGHTS) != 0 && !is_ours((PSID)&allowed->SidStart, user))
            result = 1;
    }
    LocalFree(sd);
    return result;
}

/* Windows keeps no list of named mappings that a process may read, and needs
 * no sweep: the kernel frees a mapping with its last handle, names included. */
int shx_os_list(shx_os_info_fn fn, void *ctx, shx_error *err)
{
    (void)fn;
    (void)ctx;
    shx_fail(err, SHX_E_OS, 0, 0, NULL);
    err->os_error = ENOSYS;
    err->op = "listing blocks";
    err->detail = "Windows keeps no list of named file mappings: there is nothing to list or sweep, since the "
                  "kernel frees a block and its name with its last handle";
    return SHX_E_OS;
}

int shx_os_sweep(shx_os_info_fn fn, void *ctx, shx_error *err)
{
    (void)fn;
    (void)ctx;
    (void)err;
    return SHX_OK; /* nothing is ever left behind */
}

/* ---- the writer lock: a named mutex ------------------------------------- */

int shx_os_lock_init(shx_os_map *m, void *area, shx_error *err)
{
    (void)m;
    (void)area;
    (void)err;
    return SHX_OK; /* created with the block, in shx_os_attach */
}

/* Which thread of this process holds which block's writer lock.  Windows
 * mutexes are recursive and every handle of a name is the same mutex, so a
 * thread that holds it through one handle would take it again through
 * another: kept per name, not per handle, this refuses that (EDEADLK), as
 * POSIX does. */
typedef struct held_lock {
    char name[sizeof(((shx_os_map *)0)->os_name)];
    DWORD thread;
} held_lock;
static SRWLOCK held_guard = SRWLOCK_INIT;
static held_lock *held;
static size_t held_count, held_size;

static int held_index(const char *name, DWORD thread)
{
    for (size_t i = 0; i < held_count; i++) {
        if (held[i].thread == thread && strcmp(held[i].name, name) == 0)
            return (int)i;
    }
    return -1;
}

static int remember_held(const shx_os_map *m)
{
    int ok = 1;
    AcquireSRWLockExclusive(&held_guard);
    if (held_count == held_size) {
        size_t size = held_size ? 2 * held_size : 8;
        held_lock *grown = (held_lock *)realloc(held, size * sizeof *grown);
        if (grown == NULL) {
            ok = 0;
        } else {
            held = grown;
            held_size = size;
        }
    }
    if (ok) {
        memcpy(held[held_count].name, m->os_name, sizeof held[held_count].name);
        held[held_count++].thread = GetCurrentThreadId();
    }
    ReleaseSRWLockExclusive(&held_guard);
    return ok;
}

/* Takes m's name out of the calling thread's held locks; 0 if it was not there. */
static int forget_held(const shx_os_map *m)
{
    AcquireSRWLockExclusive(&held_guard);
    int i = held_index(m->os_name, GetCurrentThreadId());
    if (i >= 0)
        held[i] = held[--held_count];
    ReleaseSRWLockExclusive(&held_guard);
    return i >= 0;
}

/* The mutex came back abandoned: a thread of ours that held it (if one did)
 * has ended, and its entry must not make a later thread of the same id look
 * like a holder. */
static void forget_abandoned(const shx_os_map *m)
{
    AcquireSRWLockExclusive(&held_guard);
    for (size_t i = 0; i < held_count;) {
        if (strcmp(held[i].name, m->os_name) == 0)
            held[i] = held[--held_count];
        else
            i++;
    }
    ReleaseSRWLockExclusive(&held_guard);
}

static int held_here(const shx_os_map *m)
{
    AcquireSRWLockShared(&held_guard);
    int i = held_index(m->os_name, GetCurrentThreadId());
    ReleaseSRWLockShared(&held_guard);
    return i >= 0;
}

int shx_os_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err)
{
    (void)area;
    *owner_died = 0;
    if (held_here(m))
        return fail_errno(err, EDEADLK, "WaitForSingleObject");
    DWORD ms = timeout_ns < 0 ? INFINITE : (DWORD)((timeout_ns + 999999) / 1000000);
    DWORD w = WaitForSingleObject((HANDLE)m->mutex, ms);
    if (w == WAIT_TIMEOUT)
        return shx_fail(err, SHX_E_TIMEOUT, (uint64_t)timeout_ns, 0, NULL);
    if (w == WAIT_ABANDONED) {
        *owner_died = 1;
        forget_abandoned(m);
    } else if (w != WAIT_OBJECT_0) {
        return shx_fail_os(err, "WaitForSingleObject");
    }
    if (!remember_held(m)) {
        ReleaseMutex((HANDLE)m->mutex);
        return fail_errno(err, ENOMEM, "writer lock bookkeeping");
    }
    return SHX_OK;
}

int shx_os_unlock(shx_os_map *m, void *area, shx_error *err)
{
    (void)area;
    if (!forget_held(m))
        return fail_errno(err, EPERM, "ReleaseMutex");
    if (!ReleaseMutex((HANDLE)m->mutex))
        return shx_fail_os(err, "ReleaseMutex");
    return SHX_OK;
}

/* ---- change notification: a named semaphore beside the mapping ---------- */

/* Windows has no cross-process futex (WaitOnAddress is per process).  A
 * waiter sleeps on the block's semaphore; set() releases one token per
 * registered waiter.  A waiter that timed out leaves its token behind, which
 * only makes a later waiter wake once for nothing and look again. */
int shx_os_wait_word(shx_os_map *m, void *addr, uint32_t expected, int64_t timeout_ns)
{
    volatile uint32_t *word = (volatile uint32_t *)addr;
    if (*word != expected)
        return SHX_OK;
    DWORD ms = (DWORD)((timeout_ns + 999999) / 1000000);
    DWORD w = WaitForSingleObject((HANDLE)m->wake, ms);
    if (w == WAIT_TIMEOUT)
        return *word != expected ? SHX_OK : SHX_E_TIMEOUT;
    return SHX_OK;
}

int shx_os_wake_word(shx_os_map *m, void *addr, uint32_t waiters)
{
    (void)addr;
    (void)ReleaseSemaphore((HANDLE)m->wake, waiters > (uint32_t)LONG_MAX ? LONG_MAX : (LONG)waiters, NULL);
    return -1; /* a semaphore does not say who took its tokens */
}

int shx_os_bell_init(shx_os_bell *bell, shx_error *err)
{
    bell->event = CreateEventW(NULL, FALSE, FALSE, NULL);
    return bell->event != NULL ? SHX_OK : shx_fail_os(err, "CreateEventW");
}

void shx_os_bell_free(shx_os_bell *bell)
{
    if (bell->event != NULL)
        CloseHandle((HANDLE)bell->event);
    bell->event = NULL;
}

/* The event keeps a ring until a wait takes it: nothing to count. */
uint32_t shx_os_bell_rings(shx_os_bell *bell)
{
    (void)bell;
    return 0;
}

void shx_os_bell_ring(shx_os_bell *bell) { (void)SetEvent((HANDLE)bell->event); }

/* The blocks' wake semaphores and the bell's event in one
 * WaitForMultipleObjects, which takes one token of the first that is
 * signalled; tokens left in the others wake a later wait once for nothing. */
int shx_os_wait_any(shx_os_map *const *maps, void *const *words, const uint32_t *expected, size_t n, shx_os_bell *bell,
                    uint32_t rung, int64_t timeout_ns)
{
    (void)rung;
    if (n > SHX_OS_WAIT_ANY_MAX) {
        errno = EINVAL;
        return SHX_E_OS;
    }
    HANDLE handles[SHX_OS_WAIT_ANY_MAX + 1];
    for (size_t i = 0; i < n; i++) {
        if (*(volatile uint32_t *)words[i] != expected[i])
            return SHX_OK;
        handles[i] = (HANDLE)maps[i]->wake;
    }
    handles[n] = (HANDLE)bell->event;
    DWORD ms = (DWORD)((timeout_ns + 999999) / 1000000);
    DWORD w = WaitForMultipleObjects((DWORD)(n + 1), handles, FALSE, ms);
    if (w == WAIT_FAILED)
        return SHX_E_OS;
    if (w != WAIT_TIMEOUT)
        return SHX_OK;
    for (size_t i = 0; i < n; i++)
        if (*(volatile uint32_t *)words[i] != expected[i])
            return SHX_OK;
    return SHX_E_TIMEOUT;
}

void shx_os_pause_briefly(void) { Sleep(1); }

void shx_os_yield(void) { (void)SwitchToThread(); }

int shx_os_cpu_count(void)
{
    static int count;
    if (count == 0) {
        SYSTEM_INFO info;
        GetSystemInfo(&info);
        count = info.dwNumberOfProcessors > 0 ? (int)info.dwNumberOfProcessors : 1;
    }
    return count;
}

int shx_os_cpus_oversubscribed(void) { return 0; }

int shx_os_wait_any_supported(void) { return 1; }

size_t shx_os_cache_size(int level)
{
    DWORD bytes = 0;
    if (GetLogicalProcessorInformation(NULL, &bytes) || GetLastError() != ERROR_INSUFFICIENT_BUFFER || bytes == 0)
        return 0;
    SYSTEM_LOGICAL_PROCESSOR_INFORMATION *info = (SYSTEM_LOGICAL_PROCESSOR_INFORMATION *)malloc(bytes);
    size_t size = 0;
    if (info != NULL && GetLogicalProcessorInformation(info, &bytes)) {
        for (DWORD i = 0; i < bytes / sizeof *info; i++) {
            const CACHE_DESCRIPTOR *c = &info[i].Cache;
            if (info[i].Relationship == RelationCache && c->Level == level && c->Type != CacheInstruction) {
                size = c->Size;
                break;
            }
        }
    }
    free(info);
    return size;
}

uint64_t shx_os_monotonic_ns(void)
{
    static LARGE_INTEGER freq;
    LARGE_INTEGER now;
    if (freq.QuadPart == 0)
        QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&now);
    return (uint64_t)((double)now.QuadPart * 1e9 / (double)freq.QuadPart);
}
