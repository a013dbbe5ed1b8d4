/* The copy loops: into a block past the cache or through it, and out of a
 * value cell with the check that what was copied is a well-formed value of
 * its type, made on the very bytes stored (core.h, segment.h). */
#include "core.h"

#include <string.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_STREAMING_STORES 1
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_COPY 1 /* built for any x86-64, chosen at run time where the CPU has AVX2 */
#endif

#ifdef HAVE_STREAMING_STORES
/* Copies 64 bytes to a 16-byte aligned dst past the cache. */
static void stream_line(unsigned char *dst, const unsigned char *src)
{
    __m128i a = _mm_loadu_si128((const __m128i *)src);
    __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
    __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
    _mm_stream_si128((__m128i *)dst, a);
    _mm_stream_si128((__m128i *)(dst + 16), b);
    _mm_stream_si128((__m128i *)(dst + 32), c);
    _mm_stream_si128((__m128i *)(dst + 48), d);
}
#endif

/* Where a set() into a value slot starts streaming: above twice the L2 cache
 * of a core.  A cell alternates between two slots, so a set's destination
 * spans twice the value: past that, ordinary stores first read lines that the
 * next set will have evicted anyway.  On a 512 KiB-L2 EPYC, sets of 2 to 6
 * MiB took 1.2-2.1x the copy floor without streaming and 0.7-1.35x with it
 * (benchmarks/bench_floor.py); at 1 MiB streaming lost.  Where the OS does
 * not say, the threshold of every other copy. */
size_t shx_copy_stream_set_min(void)
{
    static _Atomic size_t cached;
    size_t n = atomic_load_explicit(&cached, memory_order_relaxed);
    if (n == 0) {
        size_t l2 = shx_os_cache_size(2);
        n = l2 > 0 && l2 < SHX_STREAM_COPY_MIN / 2 ? 2 * l2 + 1 : SHX_STREAM_COPY_MIN;
        atomic_store_explicit(&cached, n, memory_order_relaxed);
    }
    return n;
}

static void copy_cached(unsigned char *dst, const unsigned char *src, size_t n);

static void copy_streaming(unsigned char *dst, const unsigned char *src, size_t n, size_t stream_min)
{
    (void)stream_min; /* where there are no streaming stores */
#ifdef HAVE_STREAMING_STORES
    if (n >= stream_min) {
        /* From a line boundary on: each line is then written whole by its
         * four stores, which the write-combining buffers send out at once. */
        size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
        memcpy(dst, src, head);
        size_t i = head;
        for (; i + 64 <= n; i += 64)
            stream_line(dst + i, src + i);
        memcpy(dst + i, src + i, n - i);
        /* Streaming stores are weakly ordered: all of them before what publishes them. */
        _mm_sfence();
        return;
    }
#endif
    copy_cached(dst, src, n);
}

/* A copy of n bytes is long enough to let other threads run meanwhile:
 * begins that if so, and says whether it did (for end_long_copy). */
static int begin_long_copy(const shx_hooks *hooks, size_t n)
{
    if (hooks == NULL || hooks->blocking_begin == NULL || n < hooks->large_copy)
        return 0;
    hooks->blocking_begin(hooks->ctx);
    return 1;
}

static void end_long_copy(const shx_hooks *hooks, int began)
{
    if (began)
        hooks->blocking_end(hooks->ctx);
}

/* Whether [a, a+n) and [b, b+n) share a byte: a segment written from a view
 * of itself.  (Two mappings of one block at different addresses alias too,
 * and no address test can see that.) */
static int overlaps(const void *a, const void *b, size_t n)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + n && y < x + n;
}

void shx_copy_bytes(void *dst, const void *src, size_t n, const shx_hooks *hooks, size_t stream_min)
{
    int began = begin_long_copy(hooks, n);
    if (overlaps(dst, src, n))
        memmove(dst, src, n);
    else
        copy_streaming((unsigned char *)dst, (const unsigned char *)src, n, stream_min);
    end_long_copy(hooks, began);
}

/* ---- well-formed values ---------------------------------------------------- */

/* Every PEP 393 invariant we check is a property of the OR of the value's
 * 64-bit words: ASCII has no bit 7 in any byte, Latin-1 has one, UCS-2 has a
 * unit above 0xFF (a high-byte bit), UCS-4 a unit above 0xFFFF (a bit >= 16)
 * and none above 0x10FFFF (exact only when the OR is below 0x110000; else a
 * second, exact pass decides).  Words start at the value's first byte, so
 * each lane of a word is one unit. */
#define HIGH_BIT_OF_BYTES  UINT64_C(0x8080808080808080)
#define HIGH_BYTE_OF_UCS2  UINT64_C(0xFF00FF00FF00FF00)
#define ABOVE_UNICODE_UCS4 UINT64_C(0xFFE00000FFE00000) /* bits that no code point has */

static uint64_t or_words(const unsigned char *p, size_t n)
{
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, p + i, n - i);
        acc |= w;
    }
    return acc;
}

/* Once any of these bits is set the verdict is known: the rest need not be scanned. */
static uint64_t decisive_bits(uint32_t type)
{
    switch (type) {
    case SHX_TYPE_ASCII:
    case SHX_TYPE_LATIN1: return HIGH_BIT_OF_BYTES;
    case SHX_TYPE_UCS2: return HIGH_BYTE_OF_UCS2;
    case SHX_TYPE_UCS4: return ABOVE_UNICODE_UCS4;
    default: return 0;
    }
}

static uint32_t max_ucs4(const unsigned char *p, size_t units)
{
    uint32_t m = 0;
    for (size_t i = 0; i < units; i++) {
        uint32_t u;
        memcpy(&u, p + 4 * i, 4);
        m = u > m ? u : m;
    }
    return m;
}

static int well_formed(uint32_t type, const unsigned char *p, size_t nbytes, uint64_t acc)
{
    switch (type) {
    case SHX_TYPE_EMPTY: return nbytes == 0;
    case SHX_TYPE_BYTES: return 1;
    case SHX_TYPE_ASCII: return (acc & HIGH_BIT_OF_BYTES) == 0;
    case SHX_TYPE_LATIN1: return (acc & HIGH_BIT_OF_BYTES) != 0;
    case SHX_TYPE_UCS2: return nbytes % 2 == 0 && (acc & HIGH_BYTE_OF_UCS2) != 0;
    case SHX_TYPE_UCS4: {
        uint32_t lanes = (uint32_t)(acc | (acc >> 32));
        if (nbytes % 4 != 0 || lanes <= 0xFFFF)
            return 0;
        return lanes < 0x110000 || max_ucs4(p, nbytes / 4) <= 0x10FFFF;
    }
    default: return 0;
    }
}

int shx_value_check(uint32_t type, const void *data, size_t nbytes, shx_error *err)
{
    const unsigned char *p = (const unsigned char *)data;
    if (!well_formed(type, p, nbytes, or_words(p, nbytes)))
        return shx_fail(err, SHX_E_BADVALUE, nbytes, type, "is not a well-formed value of its type");
    return SHX_OK;
}

/* Copies n bytes and returns the OR of the words copied.  Each word is
 * checked in the register it is copied through, so the check sees exactly the
 * copy (never the shared original, which may change under us), and in one pass
 * it costs about nothing beyond the copy: eight independent lanes keep the
 * loop as wide as the vector unit, which the compiler uses. */
static uint64_t copy_or(unsigned char *dst, const unsigned char *src, size_t n)
{
    uint64_t lane[8] = {0};
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int k = 0; k < 8; k++) {
            uint64_t w;
            memcpy(&w, src + i + 8 * k, 8);
            memcpy(dst + i + 8 * k, &w, 8);
            lane[k] |= w;
        }
    }
    uint64_t acc = lane[0] | lane[1] | lane[2] | lane[3] | lane[4] | lane[5] | lane[6] | lane[7];
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, src + i, 8);
        memcpy(dst + i, &w, 8);
        acc |= w;
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, src + i, n - i);
        memcpy(dst + i, &w, n - i);
        acc |= w;
    }
    return acc;
}

#ifdef HAVE_AVX2_COPY
/* 32 bytes whose first k (0 to 32) are all ones: masks[32 - k .. 64 - k). */
static const unsigned char ones_then_zeros[64] = {255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
                                                  255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
                                                  255, 255, 255, 255, 255, 255, 255, 255, 255, 255};

__attribute__((target("avx2"))) static __m256i first_bytes(__m256i v, size_t k)
{
    return _mm256_and_si256(v, _mm256_loadu_si256((const __m256i *)(ones_then_zeros + 32 - k)));
}

/* copy_or 32 bytes at a time.  A copy is bound by its stores: with 16-byte
 * registers (all that baseline x86-64 has) a checked copy of a value held in
 * L1 or L2 took 1.4-2.6x as long as the C library's AVX2 memcpy of the same
 * bytes.  The stores are aligned: a str's characters start 16 bytes past a
 * 32-byte boundary about half the time (where the allocator put the object),
 * and then every other 32-byte store splits a cache line, which cost
 * 1.2-1.6x the aligned loop at 16-256 KiB.  The unaligned first and last 32
 * bytes overlap what the aligned loop stores, and another process may
 * rewrite the source between two loads of a byte: so each byte is ORed from
 * the load whose store is its last, and from no other (the overlapped part
 * of the other load is masked off), and the check sees exactly the result. */
__attribute__((target("avx2"))) static uint64_t copy_or_avx2(unsigned char *dst, const unsigned char *src, size_t n)
{
    if (n < 64)
        return copy_or(dst, src, n);
    size_t i = (32 - ((uintptr_t)dst & 31)) & 31;
    __m256i head = _mm256_loadu_si256((const __m256i *)src);
    _mm256_storeu_si256((__m256i *)dst, head);
    __m256i a = first_bytes(head, i), b = _mm256_setzero_si256(), last = _mm256_setzero_si256();
    for (; i + 96 <= n; i += 64) { /* leaves 32 to 95 bytes: at least one chunk below */
        __m256i x = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i y = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        _mm256_store_si256((__m256i *)(dst + i), x);
        _mm256_store_si256((__m256i *)(dst + i + 32), y);
        a = _mm256_or_si256(a, x);
        b = _mm256_or_si256(b, y);
    }
    for (; i + 32 <= n; i += 32) { /* the last chunk is ORed once the tail says how much of it stays */
        b = _mm256_or_si256(b, last);
        last = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm256_store_si256((__m256i *)(dst + i), last);
    }
    size_t rest = n - i;
    if (rest > 0) { /* the last 32 bytes, stored over the last chunk's final 32 - rest */
        __m256i tail = _mm256_loadu_si256((const __m256i *)(src + n - 32));
        _mm256_storeu_si256((__m256i *)(dst + n - 32), tail);
        last = _mm256_or_si256(first_bytes(last, rest), tail);
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_or_si256(_mm256_or_si256(a, b), last));
    return lanes[0] | lanes[1] | lanes[2] | lanes[3];
}

#endif

/* Between these sizes, on an AMD CPU with AVX2, a copy through the cache
 * goes by 32-byte aligned stores, not the C library's copy, whose cost on a
 * Zen 4 EPYC swung with the source's alignment and placement: sets of
 * 16-256 KiB took 1.0-1.4x the copy floor with it and 0.85-1.05x with
 * aligned stores.  On an Intel Xeon (AVX-512, 2 MiB of L2 per core) it went
 * the other way: there the C library copies with rep movsb, which fills
 * whole lines without reading them first, and aligned stores made sets of
 * 3-4 MiB cost 1.4-1.5x the floor against 1.01-1.13x, sets of 4 KiB
 * 1.25-1.43x against 0.97-1.17x and gets of 4-8 KiB 0.95x against 0.80x
 * (benchmarks/bench_floor.py).  Below 4 KiB the C library's copy was as fast
 * or faster on both; past the upper bound it chooses its own stores (past the
 * cache, from sizes it derives from the machine). */
#define AVX2_COPY_MIN 4096
#define AVX2_COPY_MAX SHX_STREAM_COPY_MIN

#ifdef HAVE_AVX2_COPY
static int aligned_copy_wins(void)
{
    /* Both read what the runtime found at load time: no cache needed. */
    return __builtin_cpu_supports("avx2") && __builtin_cpu_is("amd");
}
#endif

static void copy_cached(unsigned char *dst, const unsigned char *src, size_t n)
{
#ifdef HAVE_AVX2_COPY
    if (n >= AVX2_COPY_MIN && n < AVX2_COPY_MAX && aligned_copy_wins()) {
        (void)copy_or_avx2(dst, src, n);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* Copies into a result just allocated for get(): memory just mapped, whose
 * lines the kernel zeroed through the cache an instant before, or a result
 * just freed, still cached.  Past AVX2_COPY_MAX copy_cached leaves the stores
 * to the C library, whose copy of these lost to the text check's aligned
 * stores on both x86-64s measured: bytes gets of 16 MiB took 1.04-1.25x the
 * copy floor on a Zen 4 EPYC where str gets took 0.88-0.99x, and of 16-64
 * MiB 0.97-0.99x on an Intel Xeon where str gets took 0.82-0.88x
 * (benchmarks/bench_floor.py).  By these stores, on the EPYC, bytes gets of
 * 16 and 64 MiB took 0.91-0.97x. */
static void copy_to_result(unsigned char *dst, const unsigned char *src, size_t n)
{
#ifdef HAVE_AVX2_COPY
    if (n >= AVX2_COPY_MAX && __builtin_cpu_supports("avx2")) {
        (void)copy_or_avx2(dst, src, n);
        return;
    }
#endif
    copy_cached(dst, src, n);
}

/* Below this a value is copied in the time a choice of copy takes. */
#define SMALL_CHECKED_COPY 1024

/* Once the verdict is known the rest is copied without looking. */
#define CHECK_CHUNK 16384

/* Copies a value out of the block and tells whether the copy is well formed. */
int shx_copy_checked(unsigned char *dst, const unsigned char *src, size_t n, uint32_t type, const shx_hooks *hooks)
{
    if (n < SMALL_CHECKED_COPY) /* one pass, no choice to make: most values are small */
        return well_formed(type, dst, n, copy_or(dst, src, n));
    int began = begin_long_copy(hooks, n);
    uint64_t acc = 0, decisive = decisive_bits(type);
    uint64_t (*copy_chunk)(unsigned char *, const unsigned char *, size_t) = copy_or;
#ifdef HAVE_AVX2_COPY
    if (__builtin_cpu_supports("avx2"))
        copy_chunk = copy_or_avx2;
#endif
    /* No streaming stores here: dst is an object just made, which for a large
     * value is memory just mapped, whose pages the kernel zeroes through the
     * cache as the copy first touches them; ordinary stores then hit those
     * lines and streaming ones must evict them.  At 64 MiB, streaming cost
     * 1.15-1.2x the copy floor and ordinary stores 1.0x, and at 4-16 MiB
     * both were within 1.1x (benchmarks/bench_floor.py).  Bytes copied
     * unchecked go by copy_to_result, whose stores are ordinary too. */
    size_t done = 0;
    if (decisive == 0) {
        copy_to_result(dst, src, n);
        done = n;
    }
    while (done < n) {
        if (acc & decisive) {
            copy_to_result(dst + done, src + done, n - done);
            break;
        }
        size_t k = n - done < CHECK_CHUNK ? n - done : CHECK_CHUNK;
        acc |= copy_chunk(dst + done, src + done, k);
        done += k;
    }
    int ok = well_formed(type, dst, n, acc);
    end_long_copy(hooks, began);
    return ok;
}
