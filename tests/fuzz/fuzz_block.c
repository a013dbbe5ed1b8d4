/* Hostile blocks: another process may write any bytes anywhere in a block,
 * header and writer lock included.  This harness plays that process: each
 * input is a list of operations that scribble on the shared bytes or use the
 * block through the core (get, set, a second attach, UTF-8 get, wait), and
 * every call must come back with a value that is well formed or an error:
 * no crash, no hang, no access outside the mapping (ASan sees those).
 *
 * Built with libFuzzer (make -C tests/fuzz fuzz) or with replay.c, which runs
 * saved inputs (the corpus, and any crash kept as a regression) without it.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "segment.h"

#define CAPACITY 256

static shx_block block;
static unsigned char *pristine; /* the header and slots as created */
static size_t mapped;           /* header + both slots: what a hostile process can reach */
static char name[64];

/* Bounds every lock wait: a scribbled lock word may look held forever. */
static int give_up(void *ctx)
{
    (void)ctx;
    return 1;
}

static const shx_hooks hooks = {NULL, NULL, NULL, 0, give_up};

static void cleanup(void)
{
    shx_error err;
    shx_block_close(&block, 0, &err);
}

static void setup(void)
{
    shx_error err;
    snprintf(name, sizeof name, "shmemext-fuzz-%d", (int)getpid());
    if (shx_block_open(&block, name, SHX_KIND_VALUE, CAPACITY, 0, 0600, &err) != SHX_OK) {
        char msg[256];
        shx_strerror(&err, msg, sizeof msg);
        fprintf(stderr, "cannot open %s: %s\n", name, msg);
        abort();
    }
    mapped = (size_t)((unsigned char *)block.data - (unsigned char *)block.hdr) + 2 * block.slot_stride;
    pristine = malloc(mapped);
    if (pristine == NULL)
        abort();
    memcpy(pristine, block.hdr, mapped);
    atexit(cleanup);
}

typedef struct {
    const uint8_t *p;
    size_t left;
} reader;

static int take(reader *r, void *out, size_t n)
{
    if (r->left < n)
        return 0;
    memcpy(out, r->p, n);
    r->p += n;
    r->left -= n;
    return 1;
}

/* What get() hands back must be a value CPython could have built. */
static unsigned char got[CAPACITY];

static void *to_got(void *ctx, uint32_t type, size_t nbytes)
{
    (void)ctx;
    (void)type;
    return nbytes <= sizeof got ? got : NULL;
}

/* The oracle: PEP 393's rules checked unit by unit, on purpose not the core's
 * word-wise check, so that a mistake there cannot agree with itself. */
static int canonical(uint32_t type, const unsigned char *p, size_t n)
{
    size_t width = type == SHX_TYPE_UCS4 ? 4 : type == SHX_TYPE_UCS2 ? 2 : 1;
    uint32_t max = 0;
    if (n % width != 0)
        return 0;
    for (size_t i = 0; i < n; i += width) {
        uint32_t u; /* code units are in the machine's byte order */
        if (width == 1) {
            u = p[i];
        } else if (width == 2) {
            uint16_t h;
            memcpy(&h, p + i, 2);
            u = h;
        } else {
            memcpy(&u, p + i, 4);
        }
        max = u > max ? u : max;
    }
    switch (type) {
    case SHX_TYPE_EMPTY: return n == 0;
    case SHX_TYPE_BYTES: return 1;
    case SHX_TYPE_ASCII: return max < 0x80;
    case SHX_TYPE_LATIN1: return max >= 0x80 && max <= 0xFF;
    case SHX_TYPE_UCS2: return max > 0xFF;
    case SHX_TYPE_UCS4: return max > 0xFFFF && max <= 0x10FFFF;
    default: return 0;
    }
}

static void check_get(shx_block *b)
{
    uint32_t type = 0;
    size_t n = 0;
    uint64_t version = 0;
    shx_error err;
    if (shx_value_get(b, to_got, NULL, &hooks, &type, &n, &version, &err) == SHX_OK) {
        if (n > CAPACITY || !canonical(type, got, n)) {
            fprintf(stderr, "get returned an ill-formed value: type %u, %zu bytes\n", type, n);
            abort();
        }
    } else {
        char msg[256];
        shx_strerror(&err, msg, sizeof msg);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (pristine == NULL)
        setup();
    memcpy(block.hdr, pristine, mapped);
    reader r = {data, size};
    uint8_t op;
    while (take(&r, &op, 1)) {
        shx_error err;
        switch (op % 8) {
        case 0:
        case 1: { /* scribble: up to 32 bytes at any offset of the shared bytes */
            uint16_t at;
            uint8_t len;
            unsigned char bytes[32];
            if (!take(&r, &at, 2) || !take(&r, &len, 1))
                return 0;
            len %= 33;
            if (!take(&r, bytes, len))
                return 0;
            /* Mostly the header's first page, where the protocol lives. */
            size_t offset = op % 8 == 0 ? at % 512 : at % mapped;
            if (offset + len > mapped)
                len = (uint8_t)(mapped - offset);
            memcpy((unsigned char *)block.hdr + offset, bytes, len);
            break;
        }
        case 2: check_get(&block); break;
        case 3: { /* set bytes or checked UTF-8 */
            uint8_t len, kind;
            unsigned char bytes[CAPACITY];
            if (!take(&r, &kind, 1) || !take(&r, &len, 1) || !take(&r, bytes, len))
                return 0;
            if (kind & 1)
                (void)shx_value_set_utf8(&block, (const char *)bytes, len, &hooks, &err);
            else
                (void)shx_value_set(&block, SHX_TYPE_BYTES, bytes, len, &hooks, &err);
            break;
        }
        case 4: { /* another handle attaches to the scribbled block, reads, detaches */
            shx_block other;
            memset(&other, 0, sizeof other);
            if (shx_block_open(&other, name, SHX_KIND_VALUE, 0, 0, 0600, &err) == SHX_OK) {
                check_get(&other);
                shx_block_close(&other, 0, &err);
            }
            break;
        }
        case 5: { /* UTF-8 out, into a buffer of any size up to the capacity */
            uint8_t cap;
            char buf[CAPACITY];
            size_t len = 0;
            int is_text = 0;
            if (!take(&r, &cap, 1))
                return 0;
            (void)shx_value_get_utf8(&block, buf, cap, &len, &is_text, NULL, &hooks, &err);
            break;
        }
        case 6: {
            uint64_t now;
            (void)shx_value_wait(&block, shx_value_version(&block), 0, &now, &err);
            break;
        }
        case 7: { /* a writer that takes the lock and lets go, as a crashing one would not */
            int owner_died = 0;
            if (shx_block_lock(&block, 0, &owner_died, &hooks, &err) == SHX_OK)
                (void)shx_block_unlock(&block, &err);
            break;
        }
        }
    }
    return 0;
}
