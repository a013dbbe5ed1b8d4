/* The queue's protocol, driven without Python, with real processes (fork). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "queue.h"

static char qprefix[64];

static const char *qname(const char *what)
{
    static char buf[128];
    snprintf(buf, sizeof buf, "%s-%s", qprefix, what);
    return buf;
}

typedef struct {
    unsigned char buf[1 << 17];
} qdst;

static void *to_qdst(void *ctx, uint32_t type, size_t nbytes)
{
    (void)type;
    return nbytes <= sizeof(((qdst *)ctx)->buf) ? ((qdst *)ctx)->buf : NULL;
}

static int put_bytes(shx_block *b, const void *p, size_t n, int64_t timeout_ns)
{
    shx_iov iov = {p, n};
    shx_error err;
    return shx_queue_put(b, SHX_TYPE_BYTES, &iov, 1, timeout_ns, NULL, &err);
}

static int get_bytes(shx_block *b, qdst *d, size_t *n, int64_t timeout_ns)
{
    uint32_t type;
    shx_error err;
    return shx_queue_get(b, to_qdst, d, timeout_ns, NULL, &type, n, &err);
}

/* test_core.c's: a child's exit code, or 128 + the signal that ended it. */
int wait_child(pid_t pid);

/* A message whose bytes say who sent it and its number, and check themselves. */
typedef struct {
    uint32_t producer, number, length, sum;
} stamp;

static size_t make_message(unsigned char *out, uint32_t producer, uint32_t number)
{
    stamp s = {producer, number, (uint32_t)(sizeof(stamp) + (number * 7919u + producer * 31u) % 3000u), 0};
    for (uint32_t i = sizeof s; i < s.length; i++) {
        out[i] = (unsigned char)(i * 131u + number + producer);
        s.sum += out[i];
    }
    memcpy(out, &s, sizeof s);
    return s.length;
}

static int message_whole(const unsigned char *in, size_t n, stamp *s)
{
    if (n < sizeof *s)
        return 0;
    memcpy(s, in, sizeof *s);
    uint32_t sum = 0;
    for (size_t i = sizeof *s; i < n; i++)
        sum += in[i];
    return s->length == n && s->sum == sum;
}

static void test_queue_basics(void)
{
    shx_block q = {0};
    shx_error err;
    qdst d;
    size_t n;
    CHECK(shx_block_open(&q, qname("basic"), SHX_KIND_QUEUE, 100, 0, 0600, &err) == SHX_OK && q.capacity == 112,
          "a queue's capacity is rounded up to whole records (100 -> %llu)", (unsigned long long)q.capacity);
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_E_EMPTY && shx_queue_count(&q) == 0, "a new queue is empty");
    CHECK(put_bytes(&q, "0123456789", 97, 0) == SHX_E_TOOBIG && shx_queue_count(&q) == 0,
          "a message larger than the ring is refused, nothing written");
    CHECK(put_bytes(&q, "hello", 5, 0) == SHX_OK && put_bytes(&q, "", 0, 0) == SHX_OK &&
              put_bytes(&q, "world!", 6, 0) == SHX_OK && shx_queue_count(&q) == 3 && shx_queue_used(&q) == 80,
          "three messages: counted 3, 80 bytes of records");
    CHECK(put_bytes(&q, "x", 1, 0) == SHX_OK && put_bytes(&q, "y", 1, 0) == SHX_E_FULL &&
              put_bytes(&q, "y", 1, 20000000) == SHX_E_FULL && shx_queue_count(&q) == 4,
          "the ring fills to its last byte; then full at once, and after a timeout");
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_OK && n == 5 && memcmp(d.buf, "hello", 5) == 0, "first in, first out");
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_OK && n == 0, "an empty message");
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_OK && n == 6 && get_bytes(&q, &d, &n, 0) == SHX_OK && n == 1 &&
              d.buf[0] == 'x',
          "the rest, in order");
    unsigned char prev[40];
    size_t prev_len = 0;
    int wrapped = put_bytes(&q, prev, 0, 0) == SHX_OK;
    for (int i = 0; i < 1000 && wrapped; i++) {
        unsigned char msg[40];
        for (int k = 0; k < 40; k++)
            msg[k] = (unsigned char)(i + k);
        size_t len = (size_t)(i % 41);
        /* Two in flight, of sizes that do not divide the ring. */
        wrapped = put_bytes(&q, msg, len, 0) == SHX_OK && get_bytes(&q, &d, &n, 0) == SHX_OK && n == prev_len &&
                  memcmp(d.buf, prev, n) == 0;
        memcpy(prev, msg, sizeof msg);
        prev_len = len;
    }
    CHECK(shx_queue_count(&q) == 1, "one left");
    shx_block v = {0};
    CHECK(shx_block_open(&v, qname("basic"), SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_E_KIND,
          "a queue is not opened as a value");
    shx_block_close(&q, 0, &err);
}

/* Producers and consumers in processes of their own: every message arrives
 * once, whole, and each producer's in its order. */
static void test_queue_many_processes(void)
{
    enum { PRODUCERS = 3, CONSUMERS = 3, EACH = 20000 };
    shx_block q = {0};
    shx_error err;
    CHECK(shx_block_open(&q, qname("mpmc"), SHX_KIND_QUEUE, 64 << 10, 0, 0600, &err) == SHX_OK, "a 64 KiB queue");
    /* Shared tallies: how often each message arrived, and faults seen. */
    size_t tally_size = sizeof(uint32_t) * PRODUCERS * EACH + 64;
    uint32_t *tally = mmap(NULL, tally_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (tally == MAP_FAILED)
        return;
    uint32_t *faults = tally + PRODUCERS * EACH;
    pid_t pids[PRODUCERS + CONSUMERS];
    for (int c = 0; c < CONSUMERS; c++) {
        if ((pids[c] = fork()) == 0) {
            static qdst d;
            uint32_t last[PRODUCERS];
            memset(last, 0xff, sizeof last);
            for (;;) {
                size_t n;
                stamp s;
                int rc = get_bytes(&q, &d, &n, 2000000000);
                if (rc != SHX_OK)
                    _exit(rc == SHX_E_EMPTY ? 0 : 3);
                if (n == 0)
                    _exit(0); /* the end */
                if (!message_whole(d.buf, n, &s) || s.producer >= PRODUCERS || s.number >= EACH ||
                    (last[s.producer] != UINT32_MAX && s.number <= last[s.producer])) {
                    __atomic_add_fetch(faults, 1, __ATOMIC_RELAXED);
                    continue;
                }
                last[s.producer] = s.number;
                __atomic_add_fetch(&tally[s.producer * EACH + s.number], 1, __ATOMIC_RELAXED);
            }
        }
    }
    for (int p = 0; p < PRODUCERS; p++) {
        if ((pids[CONSUMERS + p] = fork()) == 0) {
            static unsigned char msg[4096];
            for (uint32_t i = 0; i < EACH; i++) {
                size_t len = make_message(msg, (uint32_t)p, i);
                if (put_bytes(&q, msg, len, -1) != SHX_OK)
                    _exit(4);
            }
            _exit(0);
        }
    }
    int bad = 0;
    for (int p = 0; p < PRODUCERS; p++)
        bad += wait_child(pids[CONSUMERS + p]) != 0;
    for (int c = 0; c < CONSUMERS; c++)
        put_bytes(&q, "", 0, -1);
    for (int c = 0; c < CONSUMERS; c++)
        bad += wait_child(pids[c]) != 0;
    int once = 1;
    for (int i = 0; i < PRODUCERS * EACH; i++)
        once &= tally[i] == 1;
    CHECK(bad == 0 && *faults == 0 && once,
          "%d producers x %d consumers, %d messages: each arrived once, whole, in its producer's order", PRODUCERS,
          CONSUMERS, PRODUCERS * EACH);
    munmap(tally, tally_size);
    shx_block_close(&q, 0, &err);
}

/* A producer killed while it holds the lock, half way through a record: its
 * record never appears, the lock is handed on, the count stays right. */
static void test_queue_producer_death(void)
{
    shx_block q = {0};
    shx_error err;
    qdst d;
    size_t n;
    shx_block_open(&q, qname("pdeath"), SHX_KIND_QUEUE, 4096, 0, 0600, &err);
    put_bytes(&q, "before", 6, 0);
    int pipefd[2];
    if (pipe(pipefd) != 0)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        int died;
        shx_block_lock(&q, -1, &died, NULL, &err);
        shx_queue_ctl *ctl = (shx_queue_ctl *)(void *)((unsigned char *)q.hdr + SHX_QUEUE_CTL_OFFSET);
        uint64_t tail = atomic_load(&ctl->tail);
        /* A record head and half a message past the tail, as a dying producer leaves them. */
        uint64_t fake[2] = {1000, SHX_TYPE_BYTES};
        memcpy(q.data + tail % q.capacity, fake, sizeof fake);
        memset(q.data + (tail + 16) % q.capacity, 'X', 200);
        if (write(pipefd[1], "l", 1) != 1)
            _exit(1);
        for (;;)
            pause();
    }
    char c;
    if (read(pipefd[0], &c, 1) != 1)
        return;
    uint64_t t0 = shx_os_monotonic_ns();
    CHECK(put_bytes(&q, "blocked", 7, 0) == SHX_E_FULL && shx_os_monotonic_ns() - t0 < 2000000000ULL,
          "a put that only tries gives up behind a lock holder that never lets go, after a grace");
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_OK && n == 6 && memcmp(d.buf, "before", 6) == 0 &&
              get_bytes(&q, &d, &n, 0) == SHX_E_EMPTY,
          "consumers take what was committed, and see nothing of the half-written record");
    kill(pid, SIGKILL);
    wait_child(pid);
    close(pipefd[0]);
    close(pipefd[1]);
    CHECK(put_bytes(&q, "after", 5, 1000000000) == SHX_OK && shx_queue_count(&q) == 1 &&
              get_bytes(&q, &d, &n, 0) == SHX_OK && n == 5 && memcmp(d.buf, "after", 5) == 0,
          "after the holder's death the next producer takes the lock and the queue works on");

    /* Killed between moving the tail and the version: the count is repaired. */
    pid = fork();
    if (pid == 0) {
        int died;
        shx_block_lock(&q, -1, &died, NULL, &err);
        shx_queue_ctl *ctl = (shx_queue_ctl *)(void *)((unsigned char *)q.hdr + SHX_QUEUE_CTL_OFFSET);
        uint64_t tail = atomic_load(&ctl->tail);
        struct {
            uint64_t nbytes;
            uint32_t type, seq;
        } r = {3, SHX_TYPE_BYTES, (uint32_t)shx_value_version(&q)};
        memcpy(q.data + tail % q.capacity, &r, sizeof r);
        memcpy(q.data + (tail + 16) % q.capacity, "odd", 3);
        atomic_store(&ctl->tail, tail + 32);
        raise(SIGKILL);
    }
    wait_child(pid);
    CHECK(put_bytes(&q, "next", 4, 1000000000) == SHX_OK && shx_queue_count(&q) == 2,
          "a producer killed between tail and count: its message counts once the lock is handed on (%llu)",
          (unsigned long long)shx_queue_count(&q));
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_OK && n == 3 && memcmp(d.buf, "odd", 3) == 0 &&
              get_bytes(&q, &d, &n, 0) == SHX_OK && n == 4 && shx_queue_count(&q) == 0,
          "and it is delivered, before the next");
    shx_block_close(&q, 0, &err);
}

/* Bytes another process wrote: every get fails cleanly or returns a message. */
static void test_queue_hostile(void)
{
    shx_block q = {0};
    shx_error err;
    qdst d;
    size_t n;
    shx_block_open(&q, qname("hostile"), SHX_KIND_QUEUE, 256, 0, 0600, &err);
    shx_queue_ctl *ctl = (shx_queue_ctl *)(void *)((unsigned char *)q.hdr + SHX_QUEUE_CTL_OFFSET);
    put_bytes(&q, "abc", 3, 0);
    uint64_t *len = (uint64_t *)(void *)(q.data + atomic_load(&ctl->head) % q.capacity);
    *len = UINT64_MAX - 3;
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_E_BADVALUE, "a record length past the ring is corruption");
    *len = 200;
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_E_BADVALUE, "a record longer than what was committed is corruption");
    *len = 3;
    uint32_t *type = (uint32_t *)(void *)(len + 1);
    *type = 99;
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_E_BADVALUE, "an unknown message type is corruption");
    *type = SHX_TYPE_ASCII;
    memcpy(q.data + (atomic_load(&ctl->head) + 16) % q.capacity, "a\xff", 2);
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_E_BADVALUE && get_bytes(&q, &d, &n, 0) == SHX_E_EMPTY,
          "text that is not what its type says is reported, and taken (it cannot wedge the queue)");
    atomic_store(&ctl->tail, atomic_load(&ctl->head) + 100000);
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_E_BADVALUE && put_bytes(&q, "x", 1, 0) == SHX_E_BADVALUE,
          "a tail beyond the ring is corruption, to consumers and producers");
    atomic_store(&ctl->tail, atomic_load(&ctl->head) + 7);
    CHECK(get_bytes(&q, &d, &n, 0) == SHX_E_BADVALUE && shx_queue_count(&q) == 0,
          "a tail between records is corruption; count says 0");
    atomic_store(&ctl->tail, atomic_load(&ctl->head));
    CHECK(put_bytes(&q, "ok", 2, 0) == SHX_OK && get_bytes(&q, &d, &n, 0) == SHX_OK && n == 2,
          "repaired by hand, the queue works");
    shx_block_close(&q, 0, &err);
}

/* Sleeping on both sides, woken across processes. */
static void test_queue_blocking(void)
{
    shx_block q = {0};
    shx_error err;
    qdst d;
    size_t n;
    shx_block_open(&q, qname("block"), SHX_KIND_QUEUE, 64, 0, 0600, &err);
    atomic_store(&q.spin_off, 1); /* sleep at once: the wake-up is what is tested */
    pid_t pid = fork();
    if (pid == 0) {
        usleep(100000);
        put_bytes(&q, "late", 4, 0);
        _exit(0);
    }
    uint64_t t0 = shx_os_monotonic_ns();
    int rc = get_bytes(&q, &d, &n, 5000000000LL);
    uint64_t took = shx_os_monotonic_ns() - t0;
    wait_child(pid);
    CHECK(rc == SHX_OK && n == 4 && took > 50000000 && took < 3000000000ULL,
          "a consumer sleeps on an empty queue until a message comes (%.0f ms)", took / 1e6);
    CHECK(put_bytes(&q, "0123456789012345", 16, 0) == SHX_OK && put_bytes(&q, "0123456789", 10, 0) == SHX_OK &&
              put_bytes(&q, "x", 1, 0) == SHX_E_FULL,
          "filled");
    pid = fork();
    if (pid == 0) {
        usleep(100000);
        _exit(get_bytes(&q, &d, &n, 0) == SHX_OK ? 0 : 1);
    }
    t0 = shx_os_monotonic_ns();
    rc = put_bytes(&q, "x", 1, 5000000000LL);
    took = shx_os_monotonic_ns() - t0;
    CHECK(wait_child(pid) == 0 && rc == SHX_OK && took > 50000000 && took < 3000000000ULL,
          "a producer sleeps on a full queue until a consumer makes room (%.0f ms)", took / 1e6);

    /* A watcher (one thread for many waits) sleeps for room too: on a full
     * queue and a value at once, woken by a take in another process. */
    CHECK(put_bytes(&q, "x", 1, 0) == SHX_E_FULL, "full again");
    shx_block v = {0};
    shx_block_open(&v, qname("block-value"), SHX_KIND_VALUE, 64, 0, 0600, &err);
    shx_os_bell bell;
    CHECK(shx_os_bell_init(&bell, &err) == SHX_OK, "a bell");
    shx_block *both[2] = {&v, &q};
    const unsigned char room[2] = {0, 1};
    uint64_t seen[2] = {shx_value_version(&v), shx_queue_taken(&q)};
    t0 = shx_os_monotonic_ns();
    rc = shx_wait_any(both, room, seen, 2, &bell, shx_os_bell_rings(&bell), 100000000LL, &err);
    took = shx_os_monotonic_ns() - t0;
    CHECK(rc == SHX_E_TIMEOUT && took >= 90000000, "nothing taken: the wait for room times out (%.0f ms)", took / 1e6);
    pid = fork();
    if (pid == 0) {
        usleep(100000);
        _exit(get_bytes(&q, &d, &n, 0) == SHX_OK ? 0 : 1);
    }
    t0 = shx_os_monotonic_ns();
    rc = shx_wait_any(both, room, seen, 2, &bell, shx_os_bell_rings(&bell), 5000000000LL, &err);
    took = shx_os_monotonic_ns() - t0;
    CHECK(wait_child(pid) == 0 && rc == SHX_OK && shx_queue_taken(&q) != seen[1] && took > 50000000 &&
              took < 3000000000ULL,
          "a take in another process ends a watcher's wait for room (%.0f ms)", took / 1e6);
    CHECK((uint32_t)atomic_load(&shx_queue_ctl_of(&q)->room.waiters) == 0, "and it counts itself no longer");
    const unsigned char not_a_queue[2] = {1, 0};
    CHECK(shx_wait_any(both, not_a_queue, seen, 2, &bell, 0, 0, &err) == SHX_E_KIND, "room is asked only of queues");
    shx_os_bell_free(&bell);
    shx_block_close(&v, 0, &err);
    shx_block_close(&q, 0, &err);
}

static int peek_bytes(shx_block *b, shx_queue_spot *spot, qdst *d, size_t *n, int64_t timeout_ns)
{
    uint32_t type;
    shx_error err;
    return shx_queue_peek(b, spot, to_qdst, d, timeout_ns, NULL, &type, n, &err);
}

/* A bridge's consumer: copy without taking, take only once handed on. */
static void test_queue_peek_and_drop(void)
{
    shx_block q = {0};
    shx_error err;
    qdst d;
    size_t n;
    CHECK(shx_block_open(&q, qname("peek"), SHX_KIND_QUEUE, 96, 0, 0600, &err) == SHX_OK, "open %s", qname("peek"));
    shx_queue_spot spot = {SHX_QUEUE_AT_HEAD, 0};
    CHECK(peek_bytes(&q, &spot, &d, &n, 0) == SHX_E_EMPTY, "nothing to peek in an empty queue");
    CHECK(peek_bytes(&q, &spot, &d, &n, 20000000) == SHX_E_EMPTY, "a peek waits, then gives up");
    put_bytes(&q, "one", 3, 0);
    put_bytes(&q, "two!", 4, 0);
    CHECK(peek_bytes(&q, &spot, &d, &n, 0) == SHX_OK && n == 3 && memcmp(d.buf, "one", 3) == 0 && spot.at == 0 &&
              spot.next == 32 && shx_queue_count(&q) == 2,
          "the oldest is copied and left: at 0, next at 32 (at %llu, next %llu)", (unsigned long long)spot.at,
          (unsigned long long)spot.next);
    uint64_t first = spot.at;
    spot.at = spot.next;
    CHECK(peek_bytes(&q, &spot, &d, &n, 0) == SHX_OK && n == 4 && memcmp(d.buf, "two!", 4) == 0 && spot.next == 64,
          "the next one, by its position");
    uint64_t end = spot.next;
    spot.at = end;
    CHECK(peek_bytes(&q, &spot, &d, &n, 0) == SHX_E_EMPTY, "nothing past the tail");
    CHECK(shx_queue_drop(&q, first, end + 16, &err) == SHX_E_RANGE && shx_queue_drop(&q, first, 8, &err) == SHX_E_RANGE,
          "a drop past the tail or into a record is refused");
    CHECK(shx_queue_drop(&q, first, end, &err) == SHX_OK && shx_queue_count(&q) == 0 && shx_queue_used(&q) == 0,
          "both taken at once");
    CHECK(shx_queue_drop(&q, first, end, &err) == SHX_E_MOVED && err.a == end,
          "a second drop of them: moved on to %llu", (unsigned long long)err.a);
    /* Another process takes what we peeked: the peek at that position is gone. */
    put_bytes(&q, "three", 5, 0);
    spot.at = SHX_QUEUE_AT_HEAD;
    CHECK(peek_bytes(&q, &spot, &d, &n, 0) == SHX_OK, "peeked three");
    pid_t pid = fork();
    if (pid == 0) {
        qdst cd;
        size_t cn;
        _exit(get_bytes(&q, &cd, &cn, 0) == SHX_OK && cn == 5 ? 0 : 1);
    }
    CHECK(wait_child(pid) == 0, "a consumer in another process took it");
    uint64_t at = spot.at;
    CHECK(peek_bytes(&q, &spot, &d, &n, 0) == SHX_E_MOVED, "the peek at its position finds it gone");
    CHECK(shx_queue_drop(&q, at, at + 32, &err) == SHX_E_MOVED, "and nothing to drop");
    /* Records wrapped around the ring's end peek whole. */
    int whole = 1;
    for (int i = 0; i < 200 && whole; i++) {
        unsigned char msg[40];
        for (int k = 0; k < 40; k++)
            msg[k] = (unsigned char)(i * 3 + k);
        size_t len = (size_t)(i % 41);
        spot.at = SHX_QUEUE_AT_HEAD;
        whole = put_bytes(&q, msg, len, 0) == SHX_OK && peek_bytes(&q, &spot, &d, &n, 0) == SHX_OK && n == len &&
                memcmp(d.buf, msg, n) == 0 && shx_queue_drop(&q, spot.at, spot.next, &err) == SHX_OK;
    }
    CHECK(whole && shx_queue_count(&q) == 0, "200 messages of every size, around the ring: peeked whole, dropped");
    /* A message waited for at a position past the oldest comes from another process. */
    put_bytes(&q, "a", 1, 0);
    spot.at = SHX_QUEUE_AT_HEAD;
    peek_bytes(&q, &spot, &d, &n, 0);
    pid = fork();
    if (pid == 0) {
        usleep(50000);
        _exit(put_bytes(&q, "later", 5, 0) == SHX_OK ? 0 : 1);
    }
    spot.at = spot.next;
    CHECK(peek_bytes(&q, &spot, &d, &n, 5000000000) == SHX_OK && n == 5 && memcmp(d.buf, "later", 5) == 0,
          "a peek past the oldest waits for the next message");
    CHECK(wait_child(pid) == 0, "its producer");
    shx_block_close(&q, 0, &err);
}

/* The value's conditional set: a bridge must not overwrite a local value
 * it has not passed on. */
static void test_value_set_if(void)
{
    shx_block v = {0};
    shx_error err;
    uint64_t written = 0;
    CHECK(shx_block_open(&v, qname("setif"), SHX_KIND_VALUE, 64, 0, 0600, &err) == SHX_OK, "open");
    CHECK(shx_value_set_if(&v, SHX_TYPE_BYTES, "a", 1, 0, &written, NULL, &err) == SHX_OK && written == 1 &&
              shx_value_version(&v) == 1,
          "set while the version is the expected one: version 1");
    CHECK(shx_value_set_if(&v, SHX_TYPE_BYTES, "b", 1, 0, &written, NULL, &err) == SHX_E_MOVED && err.a == 1 &&
              err.b == 0 && shx_value_version(&v) == 1,
          "refused once another set came: found 1, expected 0, nothing written");
    pid_t pid = fork();
    if (pid == 0)
        _exit(shx_value_set(&v, SHX_TYPE_BYTES, "c", 1, NULL, &err) == SHX_OK ? 0 : 1);
    CHECK(wait_child(pid) == 0, "a set in another process");
    CHECK(shx_value_set_if(&v, SHX_TYPE_BYTES, "d", 1, 1, &written, NULL, &err) == SHX_E_MOVED && err.a == 2,
          "which a set_if expecting 1 sees");
    CHECK(shx_value_set_if(&v, SHX_TYPE_BYTES, "e", 1, 2, &written, NULL, &err) == SHX_OK && written == 3,
          "and one expecting 2 writes version 3");
    int owner_died = 0;
    CHECK(shx_block_lock(&v, 0, &owner_died, NULL, &err) == SHX_OK && shx_block_unlock(&v, &err) == SHX_OK,
          "the writer lock is free after a refused set_if");
    shx_block_close(&v, 0, &err);
}

void run_queue_tests(int *passed_out, int *failed_out)
{
    snprintf(qprefix, sizeof qprefix, "shmemext-qtest-%d", (int)getpid());
    test_queue_basics();
    test_queue_many_processes();
    test_queue_producer_death();
    test_queue_hostile();
    test_queue_blocking();
    test_queue_peek_and_drop();
    test_value_set_if();
    *passed_out += passed;
    *failed_out += failed;
}
