/* Text in and out of value cells as UTF-8, for callers without Python (the
 * C API): a str is stored as PEP 393 code units, so UTF-8 is converted here. */
#include "queue.h"
#include "segment.h"

#include <stdlib.h>
#include <string.h>

/* Decodes one strict UTF-8 sequence at s[*i] (no overlongs, no surrogates,
 * nothing past U+10FFFF); returns the code point or -1. */
static int32_t decode_one(const unsigned char *s, size_t len, size_t *i)
{
    unsigned char c = s[*i];
    int32_t cp;
    size_t extra;
    int32_t min;
    if (c < 0x80) {
        *i += 1;
        return c;
    } else if ((c & 0xE0) == 0xC0) {
        cp = c & 0x1F, extra = 1, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        cp = c & 0x0F, extra = 2, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        cp = c & 0x07, extra = 3, min = 0x10000;
    } else {
        return -1;
    }
    if (len - *i <= extra)
        return -1;
    for (size_t k = 1; k <= extra; k++) {
        unsigned char cc = s[*i + k];
        if ((cc & 0xC0) != 0x80)
            return -1;
        cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return -1;
    *i += extra + 1;
    return cp;
}

int shx_value_set_utf8(shx_block *b, const char *text, size_t len, const shx_hooks *hooks, shx_error *err)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t units = 0;
    int32_t max = 0;
    for (size_t i = 0; i < len; units++) {
        int32_t cp = decode_one(s, len, &i);
        if (cp < 0)
            return shx_fail(err, SHX_E_ENCODING, i, len, "is not valid UTF-8");
        max = cp > max ? cp : max;
    }
    if (max < 0x80) /* ASCII: the UTF-8 is the code units */
        return shx_value_set(b, SHX_TYPE_ASCII, text, len, hooks, err);

    uint32_t type = max < 0x100 ? SHX_TYPE_LATIN1 : max < 0x10000 ? SHX_TYPE_UCS2 : SHX_TYPE_UCS4;
    size_t width = type == SHX_TYPE_LATIN1 ? 1 : type == SHX_TYPE_UCS2 ? 2 : 4;
    if (units * width > b->capacity)
        return shx_fail(err, SHX_E_TOOBIG, units * width, b->capacity, NULL);
    unsigned char *out = (unsigned char *)malloc(units * width);
    if (out == NULL)
        return shx_fail(err, SHX_E_OS, 0, 0, "out of memory");
    size_t i = 0;
    for (size_t u = 0; u < units; u++) {
        uint32_t cp = (uint32_t)decode_one(s, len, &i);
        if (width == 1) {
            out[u] = (unsigned char)cp;
        } else if (width == 2) {
            uint16_t v = (uint16_t)cp;
            memcpy(out + 2 * u, &v, 2);
        } else {
            memcpy(out + 4 * u, &cp, 4);
        }
    }
    int rc = shx_value_set(b, type, out, units * width, hooks, err);
    free(out);
    return rc;
}

typedef struct {
    unsigned char *buf; /* the caller's */
    size_t cap;
    unsigned char *scratch;
    size_t needed; /* when the value did not fit buf */
    /* A queue's message leaves the queue once copied, so text must be known
     * to fit before: room for its longest UTF-8 is asked for. */
    int fit_before;
} utf8_dst;

/* The most UTF-8 bytes text of `type` in nbytes of code units can take. */
static size_t utf8_most(uint32_t type, size_t nbytes)
{
    size_t width = type == SHX_TYPE_LATIN1 ? 1 : type == SHX_TYPE_UCS2 ? 2 : 4;
    size_t per_unit = type == SHX_TYPE_LATIN1 ? 2 : type == SHX_TYPE_UCS2 ? 3 : 4;
    return nbytes / width * per_unit;
}

static int as_is(uint32_t type)
{
    return type == SHX_TYPE_BYTES || type == SHX_TYPE_ASCII || type == SHX_TYPE_EMPTY || type == SHX_TYPE_PICKLE ||
           type == SHX_TYPE_PICKLE_FRAMED;
}

static void *prepare_utf8(void *ctx, uint32_t type, size_t nbytes)
{
    utf8_dst *d = (utf8_dst *)ctx;
    free(d->scratch);
    d->scratch = NULL;
    if (!as_is(type) && d->fit_before && utf8_most(type, nbytes) > d->cap) {
        d->needed = utf8_most(type, nbytes);
        return NULL;
    }
    if (as_is(type)) {
        if (nbytes > d->cap) {
            d->needed = nbytes;
            return NULL;
        }
        d->needed = 0;
        /* An empty value needs no buffer: buf may be NULL with cap 0. */
        static unsigned char nothing;
        return d->buf != NULL ? (void *)d->buf : (void *)&nothing;
    }
    d->needed = 0;
    d->scratch = (unsigned char *)malloc(nbytes ? nbytes : 1);
    return d->scratch;
}

static size_t utf8_length(uint32_t cp) { return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4; }

static size_t encode_one(uint32_t cp, unsigned char *o)
{
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

static uint32_t unit_at(const unsigned char *p, size_t width, size_t u)
{
    if (width == 1)
        return p[u];
    if (width == 2) {
        uint16_t v;
        memcpy(&v, p + 2 * u, 2);
        return v;
    }
    uint32_t v;
    memcpy(&v, p + 4 * u, 4);
    return v;
}

/* What a get into prepare_utf8's destination ended with, made UTF-8 in buf. */
static int finish_utf8(utf8_dst *d, int rc, uint32_t type, size_t nbytes, size_t *len, shx_error *err)
{
    if (rc != SHX_OK) {
        free(d->scratch);
        if (d->needed != 0) {
            *len = d->needed;
            return shx_fail(err, SHX_E_BUFFER, d->needed, d->cap, NULL);
        }
        return rc;
    }
    if (d->scratch == NULL) { /* bytes or ASCII: already in buf */
        *len = nbytes;
        return SHX_OK;
    }
    size_t width = type == SHX_TYPE_LATIN1 ? 1 : type == SHX_TYPE_UCS2 ? 2 : 4;
    size_t units = nbytes / width, needed = 0;
    for (size_t u = 0; rc == SHX_OK && u < units; u++) {
        uint32_t cp = unit_at(d->scratch, width, u);
        if (cp >= 0xD800 && cp <= 0xDFFF)
            rc = shx_fail(err, SHX_E_ENCODING, u, units, "holds a lone surrogate, which UTF-8 cannot carry");
        needed += utf8_length(cp);
    }
    if (rc == SHX_OK) {
        *len = needed;
        if (needed > d->cap) {
            rc = shx_fail(err, SHX_E_BUFFER, needed, d->cap, NULL);
        } else {
            unsigned char *o = d->buf;
            for (size_t u = 0; u < units; u++)
                o += encode_one(unit_at(d->scratch, width, u), o);
        }
    }
    free(d->scratch);
    return rc;
}

int shx_value_get_utf8(shx_block *b, void *buf, size_t cap, size_t *len, int *is_text, uint64_t *version,
                       const shx_hooks *hooks, shx_error *err)
{
    utf8_dst d = {(unsigned char *)buf, cap, NULL, 0, 0};
    uint32_t type = SHX_TYPE_BYTES;
    size_t nbytes = 0;
    int rc = shx_value_get(b, prepare_utf8, &d, hooks, &type, &nbytes, version, err);
    if (rc == SHX_OK && is_text != NULL)
        *is_text = type != SHX_TYPE_BYTES;
    return finish_utf8(&d, rc, type, nbytes, len, err);
}

int shx_queue_get_utf8(shx_block *b, void *buf, size_t cap, size_t *len, int *is_text, int *is_pickle,
                       int64_t timeout_ns, const shx_hooks *hooks, shx_error *err)
{
    utf8_dst d = {(unsigned char *)buf, cap, NULL, 0, 1};
    uint32_t type = SHX_TYPE_BYTES;
    size_t nbytes = 0;
    int rc = shx_queue_get(b, prepare_utf8, &d, timeout_ns, hooks, &type, &nbytes, err);
    if (rc == SHX_OK) {
        if (is_text != NULL)
            *is_text = !as_is(type) || type == SHX_TYPE_ASCII;
        if (is_pickle != NULL)
            *is_pickle = type == SHX_TYPE_PICKLE || type == SHX_TYPE_PICKLE_FRAMED;
    }
    return finish_utf8(&d, rc, type, nbytes, len, err);
}
