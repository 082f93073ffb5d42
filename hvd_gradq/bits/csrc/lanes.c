/* Fused kernel for the shared-scale uniform quantizer of UniformCompressor
 * (hvd_gradq/codecs/uniform.py + hvd_gradq/packing.py lanes), one pass:
 *   clamp to [-s, s] -> stochastic rounding onto 2**bits levels with a 16-bit dither ->
 *   residual = x - level (error feedback) -> code packed into its lane of an int64 word
 *   (or of a float64 word holding the same integer, for op=Average).
 * Arithmetic mirrors the torch reference operation by operation in float32 (-ffp-contract=off).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Loops the compiler vectorises, built for AVX-512, AVX2 and plain x86-64; the loader picks one
 * for the CPU at run time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define VECTOR_CLONES_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES_AVX2
#define VECTOR_CLONES
#endif

#include "dither.h"

/* max |x + addend| over n elements (addend may be NULL); NaN if any sum is NaN, inf if infinite.
 * One read pass and no temporary: the compressor's non-finite check and scale statistic. */
float hvdgq_abs_max(const float *x, const float *addend, int64_t n);

/* |v| as its bit pattern with the sign cleared: for such patterns unsigned order is float order,
 * and every NaN is above +inf (0x7f800000), so an integer max (which vectorises) finds both. */
VECTOR_CLONES static uint32_t abs_bits_max(const float *x, const float *addend, int64_t n) {
    uint32_t mx = 0;
    if (addend) {
        for (int64_t i = 0; i < n; i++) {
            const float v = x[i] + addend[i];
            uint32_t u;
            memcpy(&u, &v, 4);
            u &= 0x7fffffffu;
            mx = u > mx ? u : mx;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, x + i, 4);
            u &= 0x7fffffffu;
            mx = u > mx ? u : mx;
        }
    }
    return mx;
}

float hvdgq_abs_max(const float *x, const float *addend, int64_t n) {
    const uint32_t mx = abs_bits_max(x, addend, n);
    if (mx > 0x7f800000u) return NAN;
    float out;
    memcpy(&out, &mx, 4);
    return out;
}

/* Quantizes v = x + residual (residual may be NULL: v = x) and, if residual_out is given, writes
 * v - level there: error feedback without a temporary copy of x + residual. residual_out may be
 * residual itself (element i is read before it is written). */
void hvdgq_quantize_lanes(const float *x, int64_t n, float scale, float to_unit, float step, int bits,
                          uint64_t key, int lane_bits, int lanes, int as_double,
                          void *out_words, const float *residual, float *residual_out) {
    const int top = (1 << bits) - 1;
    const int64_t words = (n + lanes - 1) / lanes;
    int64_t i = 0;
    uint64_t rnd = 0;
    for (int64_t w = 0; w < words; w++) {
        int64_t word = 0;
        for (int j = 0; j < lanes && i < n; j++, i++) {
            if ((i & 3) == 0) rnd = splitmix64(key, (uint64_t)i >> 2);
            const float v = residual ? x[i] + residual[i] : x[i];
            float c = v < -scale ? -scale : (v > scale ? scale : v);
            float t = (c + scale) * to_unit;
            const float u = dither_u16(rnd, (int)(i & 3));
            t = t + u;
            int k = (int)t; /* t >= 0: truncation is floor */
            if (k > top) k = top;
            if (residual_out) {
                const float level = (float)k * step - scale;
                residual_out[i] = v - level;
            }
            word |= (int64_t)k << (lane_bits * j);
        }
        if (as_double) {
            const double d = (double)word;
            memcpy((char *)out_words + 8 * w, &d, 8);
        } else {
            memcpy((char *)out_words + 8 * w, &word, 8);
        }
    }
}

/* Reduced word w as exact int64: an int64 word times `multiplier`, or a float64 word times it
 * rounded to the integer it must be. Returns -1 if that float is not within 0.25 of an integer
 * (the payload was altered), else 0. */
static inline int read_word(const void *in_words, int64_t w, int as_double, double multiplier, int64_t *out) {
    if (as_double) {
        double d;
        memcpy(&d, (const char *)in_words + 8 * w, 8);
        const double scaled = d * multiplier;
        const double r = __builtin_round(scaled);
        if (!(__builtin_fabs(scaled - r) <= 0.25)) return -1;
        *out = (int64_t)r;
    } else {
        memcpy(out, (const char *)in_words + 8 * w, 8);
        *out *= (int64_t)multiplier;
    }
    return 0;
}

/* Inverse after the allreduce: reduced words (int64, or float64 times `multiplier` = N after
 * Average) -> per-element code sums -> mean level  sum * (step / count) - scale.
 * Returns 0, or -1 if a float64 word is not within 0.25 of an integer (the payload was altered). */
int hvdgq_dequantize_lanes(const void *in_words, int64_t n, int as_double, double multiplier, int lane_bits,
                           int lanes, float per_code, float scale, float *out) {
    const uint64_t mask = (lane_bits >= 64) ? ~0ull : ((1ull << lane_bits) - 1ull);
    const int64_t words = (n + lanes - 1) / lanes;
    int64_t i = 0;
    for (int64_t w = 0; w < words; w++) {
        int64_t word;
        if (read_word(in_words, w, as_double, multiplier, &word)) return -1;
        for (int j = 0; j < lanes && i < n; j++, i++) {
            const uint64_t sum = ((uint64_t)word >> (lane_bits * j)) & mask;
            out[i] = (float)sum * per_code - scale;
        }
    }
    return 0;
}

/* Blockwise variant for the rotated lanes (hvd_gradq/codecs/rotated.py): element i of the rotated
 * vector y belongs to block i / block and is quantized against that block's clip scale
 * scale[b] (levels k * step[b] - scale[b], to_unit[b] = 1 / step[b]), with nearest rounding
 * (`nearest` = 1: t + 0.5) or the 16-bit dither of hvdgq_quantize_lanes (`nearest` = 0).
 * err_out (may be NULL) receives y - level in the rotated domain. */

/* Nearest-rounding codes of one run of elements of a block (constant scale), and their errors. */
VECTOR_CLONES_AVX2 static void block_codes_nearest(const float *y, int64_t len, float s, float to_unit, float step,
                                              int top, uint8_t *codes, float *err) {
    if (err) {
        for (int64_t i = 0; i < len; i++) {
            const float v = y[i];
            const float c = v < -s ? -s : (v > s ? s : v);
            int k = (int)((c + s) * to_unit + 0.5f);
            k = k > top ? top : k;
            codes[i] = (uint8_t)k;
            err[i] = v - ((float)k * step - s);
        }
    } else {
        for (int64_t i = 0; i < len; i++) {
            const float v = y[i];
            const float c = v < -s ? -s : (v > s ? s : v);
            int k = (int)((c + s) * to_unit + 0.5f);
            codes[i] = (uint8_t)(k > top ? top : k);
        }
    }
}

/* The same with the 16-bit dither of element `first + i`. */
static void block_codes_dither(const float *y, int64_t len, int64_t first, float s, float to_unit, float step,
                               int top, uint64_t key, uint8_t *codes, float *err) {
    uint64_t rnd = 0;
    for (int64_t i = 0; i < len; i++) {
        const int64_t g = first + i;
        if ((g & 3) == 0 || i == 0) rnd = splitmix64(key, (uint64_t)g >> 2);
        const float v = y[i];
        const float c = v < -s ? -s : (v > s ? s : v);
        float t = (c + s) * to_unit;
        t = t + dither_u16(rnd, (int)(g & 3));
        int k = (int)t;
        if (k > top) k = top;
        codes[i] = (uint8_t)k;
        if (err) err[i] = v - ((float)k * step - s);
    }
}

/* Codes (and errors, err may be NULL) of the run y[0 .. len) of one block whose first element is
 * element `first` of the layer: nearest rounding, or the 16-bit dither of key `key`. */
static inline void block_codes(const float *y, int64_t len, int64_t first, float s, float to_unit, float step,
                               int top, int nearest, uint64_t key, uint8_t *codes, float *err) {
    if (nearest)
        block_codes_nearest(y, len, s, to_unit, step, top, codes, err);
    else
        block_codes_dither(y, len, first, s, to_unit, step, top, key, codes, err);
}

/* Codes of elements [start, end) of y, block by block, into codes[0 .. end - start); err_out
 * (may be NULL) gets y - level at the same positions. */
static void span_codes(const float *y, int64_t start, int64_t end, int64_t block, const float *scale,
                       const float *to_unit, const float *step, int top, int nearest, uint64_t key, uint8_t *codes,
                       float *err_out) {
    for (int64_t i = start; i < end;) {
        const int64_t b = i / block;
        const int64_t stop = (b + 1) * block < end ? (b + 1) * block : end;
        block_codes(y + i, stop - i, i, scale[b], to_unit[b], step[b], top, nearest, key, codes + (i - start),
                    err_out ? err_out + i : NULL);
        i = stop;
    }
}

/* `cnt` codes into words of `lanes` lanes of `lane_bits` bits (int64, or the same integer as float64). */
static void pack_words(const uint8_t *codes, int64_t cnt, int lane_bits, int lanes, int as_double, char *out) {
    const int64_t words = (cnt + lanes - 1) / lanes;
    for (int64_t w = 0; w < words; w++) {
        const uint8_t *c = codes + w * lanes;
        const int len = cnt - w * lanes < lanes ? (int)(cnt - w * lanes) : lanes;
        uint64_t word = 0;
        for (int j = 0; j < len; j++) word |= (uint64_t)c[j] << (lane_bits * j);
        if (as_double) {
            const double d = (double)(int64_t)word;
            memcpy(out + 8 * w, &d, 8);
        } else {
            memcpy(out + 8 * w, &word, 8);
        }
    }
}

void hvdgq_quantize_blocks(const float *y, int64_t n, int64_t block, const float *scale, const float *to_unit,
                           const float *step, int bits, int nearest, uint64_t key, int lane_bits, int lanes,
                           int as_double, void *out_words, float *err_out) {
    /* Chunks of whole words: the codes of a chunk's block runs go to a small buffer (the loop the
     * compiler vectorises), then into the words. */
    const int top = (1 << bits) - 1;
    const int64_t chunk = (int64_t)lanes * 256;
    uint8_t codes[63 * 256];
    for (int64_t start = 0; start < n; start += chunk) {
        const int64_t end = start + chunk < n ? start + chunk : n;
        span_codes(y, start, end, block, scale, to_unit, step, top, nearest, key, codes, err_out);
        pack_words(codes, end - start, lane_bits, lanes, as_double, (char *)out_words + 8 * (start / lanes));
    }
}

/* Per-block affine map of a run: out[i] = out[i] * per_code - scale (two float32 operations). */
VECTOR_CLONES static void block_levels(float *out, int64_t len, float per_code, float scale) {
    for (int64_t i = 0; i < len; i++) out[i] = out[i] * per_code - scale;
}

/* Inverse of hvdgq_quantize_blocks after the allreduce: out[i] = sum * per_code[b] - scale[b]
 * (per_code = step / count: the mean over the contributing ranks). Returns -1 on a float word
 * that is not an integer, as hvdgq_dequantize_lanes does. */
int hvdgq_dequantize_blocks(const void *in_words, int64_t n, int as_double, double multiplier, int lane_bits,
                            int lanes, int64_t block, const float *per_code, const float *scale, float *out) {
    const uint64_t mask = (lane_bits >= 64) ? ~0ull : ((1ull << lane_bits) - 1ull);
    const int64_t words = (n + lanes - 1) / lanes;
    int64_t i = 0;
    for (int64_t w = 0; w < words; w++) {
        int64_t word;
        if (read_word(in_words, w, as_double, multiplier, &word)) return -1;
        const int len = n - i < lanes ? (int)(n - i) : lanes;
        for (int j = 0; j < len; j++) out[i + j] = (float)(((uint64_t)word >> (lane_bits * j)) & mask);
        i += len;
    }
    for (int64_t k = 0; k < n;) {
        const int64_t b = k / block;
        const int64_t stop = (b + 1) * block < n ? (b + 1) * block : n;
        block_levels(out + k, stop - k, per_code[b], scale[b]);
        k = stop;
    }
    return 0;
}

/* ---- the gathered rotated code (hvd_gradq/codecs/rotated.py RotatedCodec) ---------------------- */
int hvdgq_isa(void);
void hvdgq_unrotate_block(float *v, int64_t block, int64_t first, uint64_t key, float norm, float *out, int64_t keep,
                          int accumulate, int isa);
void hvdgq_rotate_block(const float *x, const float *addend, int64_t len, float *v, int64_t block, int64_t first,
                        uint64_t key, float norm, double *energy, int isa);

/* `cnt` (a multiple of 8, or the stream's last codes) codes into an LSB-first stream of `bits`
 * bits per code (code i at bit bits * i), as hvd_gradq/bits/bitstream.py pack_bits. */
#define PACK_CASE(B)                                                                                 \
    case B:                                                                                          \
        for (int64_t g = 0; g < groups; g++) {                                                       \
            uint64_t word = 0;                                                                       \
            for (int j = 0; j < 8; j++) word |= (uint64_t)codes[8 * g + j] << ((B) * j);             \
            memcpy(out + g * (B), &word, (B)); /* little-endian: the low B bytes */                  \
        }                                                                                            \
        break;

static int use_pdep(void);
static int64_t pack_stream_fast(const uint8_t *codes, int64_t cnt, int bits, uint8_t *out, const uint8_t *end);

/* `end`: the end of the whole output stream (a fast path writes 8 bytes per group). */
static void pack_stream(const uint8_t *codes, int64_t cnt, int bits, uint8_t *out, const uint8_t *end) {
    if (use_pdep()) {
        const int64_t done = pack_stream_fast(codes, cnt, bits, out, end);
        codes += done;
        out += done / 8 * bits;
        cnt -= done;
    }
    const int64_t groups = cnt / 8;
    switch (bits) {
        PACK_CASE(1) PACK_CASE(2) PACK_CASE(3) PACK_CASE(4)
        PACK_CASE(5) PACK_CASE(6) PACK_CASE(7) PACK_CASE(8)
        default: break;
    }
    if (cnt % 8) {
        uint64_t word = 0;
        for (int64_t j = 0; j < cnt % 8; j++) word |= (uint64_t)codes[8 * groups + j] << (bits * j);
        const int64_t tail = ((cnt % 8) * bits + 7) / 8;
        memcpy(out + groups * bits, &word, (size_t)tail);
    }
}

/* Codes of the rotated y (n elements, whole blocks) against per-block scales, as
 * hvdgq_quantize_blocks, written as a bit stream of `bits` bits per code; err_out (may be NULL)
 * gets y - level. */
void hvdgq_quantize_blocks_bits(const float *y, int64_t n, int64_t block, const float *scale, const float *to_unit,
                                const float *step, int bits, int nearest, uint64_t key, uint8_t *out, float *err_out) {
    const int top = (1 << bits) - 1;
    enum { CHUNK = 8 * 2048 };
    uint8_t codes[CHUNK];
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int64_t end = start + CHUNK < n ? start + CHUNK : n;
        span_codes(y, start, end, block, scale, to_unit, step, top, nearest, key, codes, err_out);
        pack_stream(codes, end - start, bits, out + start / 8 * bits, out + (n * bits + 7) / 8);
    }
}

/* Levels k * step - scale of `cnt` (a multiple of 8) codes of an LSB-first stream; `bits` is a
 * compile-time constant in each copy, so the group's bytes load as one word. */
#define UNPACK_CASE(B)                                                                               \
    case B:                                                                                          \
        for (int64_t g = 0; g < cnt / 8; g++) {                                                      \
            uint64_t word = 0;                                                                       \
            memcpy(&word, src + g * (B), (B));                                                       \
            for (int j = 0; j < 8; j++) out[8 * g + j] = (float)((word >> ((B) * j)) & ((1u << (B)) - 1u)) * st - s; \
        }                                                                                            \
        break;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
/* 8 codes at a time: pdep spreads a group's `bits`-bit codes into the 8 bytes of a word, AVX2
 * widens them to floats, then k * st - s (a multiply and a subtract, as the scalar loop). Reads
 * 8 bytes per group: only for groups that end at least 8 bytes before `end`. Returns the number
 * of codes done. */
__attribute__((target("bmi2,avx2"))) static int64_t unpack_levels_pdep(const uint8_t *src, const uint8_t *end,
                                                                       int64_t cnt, int bits, float st, float s,
                                                                       float *out) {
    const uint64_t spread = 0x0101010101010101ull * ((1ull << bits) - 1ull);
    const __m256 vst = _mm256_set1_ps(st), vs = _mm256_set1_ps(s);
    int64_t g = 0;
    for (; g < cnt / 8 && src + g * bits + 8 <= end; g++) {
        uint64_t word;
        memcpy(&word, src + g * bits, 8);
        const uint64_t bytes = _pdep_u64(word, spread);
        const __m256i k = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes));
        _mm256_storeu_ps(out + 8 * g, _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(k), vst), vs));
    }
    return 8 * g;
}

__attribute__((target("bmi2"))) static int64_t pack_lanes_bmi2(const uint8_t *codes, int64_t take, int lane_bits,
                                                                int j, uint64_t *word) {
    const uint64_t spread = 0x0101010101010101ull * ((1ull << lane_bits) - 1ull);
    uint64_t w = *word;
    int64_t k = 0;
    for (; k + 8 <= take; k += 8) {
        uint64_t bytes;
        memcpy(&bytes, codes + k, 8);
        w |= _pext_u64(bytes, spread) << (lane_bits * (j + k));
    }
    *word = w;
    return k;
}

/* Groups of 8 codes into `bits` bytes each with pext; writes 8 bytes per group, so only groups
 * whose 8 bytes end by `end`. Returns the number of codes done. */
__attribute__((target("bmi2"))) static int64_t pack_stream_bmi2(const uint8_t *codes, int64_t cnt, int bits,
                                                                uint8_t *out, const uint8_t *end) {
    const uint64_t spread = 0x0101010101010101ull * ((1ull << bits) - 1ull);
    int64_t g = 0;
    for (; g < cnt / 8 && out + g * bits + 8 <= end; g++) {
        uint64_t bytes;
        memcpy(&bytes, codes + 8 * g, 8);
        const uint64_t packed = _pext_u64(bytes, spread);
        memcpy(out + g * bits, &packed, 8);
    }
    return 8 * g;
}

__attribute__((target("bmi2,avx2"))) static int lanes_to_float_avx2(uint64_t word, int lane_bits, int cnt,
                                                                      float *dst) {
    const uint64_t spread = 0x0101010101010101ull * ((1ull << lane_bits) - 1ull);
    int k = 0;
    for (; k + 8 <= cnt; k += 8) {
        const uint64_t bytes = _pdep_u64(word >> (lane_bits * k), spread);
        _mm256_storeu_ps(dst + k, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes))));
    }
    return k;
}
#endif

static int use_pdep(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    static int ok = -1;
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx2");
    }
    return ok && hvdgq_isa() >= 1;
#else
    return 0;
#endif
}

/* The first `cnt` lanes of `lane_bits` (<= 8) bits of `word`, 8 at a time, as floats into dst
 * (pdep + AVX2; without them, returns 0 and the caller's loop does them). Returns lanes done. */
static int lanes_to_float_pdep(uint64_t word, int lane_bits, int cnt, float *dst) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    return lanes_to_float_avx2(word, lane_bits, cnt, dst);
#else
    (void)word; (void)lane_bits; (void)cnt; (void)dst;
    return 0;
#endif
}

static void unpack_levels(const uint8_t *src, const uint8_t *end, int64_t cnt, int bits, float st, float s,
                          float *out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (use_pdep()) {
        const int64_t done = unpack_levels_pdep(src, end, cnt, bits, st, s, out);
        src += done / 8 * bits;
        out += done;
        cnt -= done;
    }
#else
    (void)end;
#endif
    if (bits == 1 || bits == 2 || bits == 4) {
        /* a byte holds 8 / bits whole codes: look its levels up (each level is the same
         * k * st - s as below), 256 entries made per call */
        const int per = 8 / bits;
        float lv[16];
        for (int k = 0; k < (1 << bits); k++) lv[k] = (float)k * st - s;
        float table[256 * 8];
        for (int v = 0; v < 256; v++)
            for (int j = 0; j < per; j++) table[v * per + j] = lv[(v >> (bits * j)) & ((1 << bits) - 1)];
        const int64_t nbytes = cnt / per;
        for (int64_t i = 0; i < nbytes; i++) memcpy(out + i * per, table + src[i] * per, (size_t)per * sizeof(float));
        return;
    }
    switch (bits) {
        UNPACK_CASE(1) UNPACK_CASE(2) UNPACK_CASE(3) UNPACK_CASE(4)
        UNPACK_CASE(5) UNPACK_CASE(6) UNPACK_CASE(7) UNPACK_CASE(8)
        default: break;
    }
}

/* Decode of a rotated stream (m codes, whole blocks): per block, levels k * step[b] - scale[b],
 * the inverse rotation, and the first `numel` elements written (or added, `accumulate`) to out. */
int hvdgq_decode_rotated(const uint8_t *in, int64_t m, int64_t block, const float *scale, const float *step,
                         int bits, uint64_t key, float norm, float *out, int64_t numel, int accumulate) {
    float *v = (float *)malloc((size_t)block * sizeof(float));
    if (!v) return -1;
    const int isa = hvdgq_isa();
    for (int64_t b0 = 0; b0 < m && b0 < numel; b0 += block) {
        const int64_t b = b0 / block;
        const float st = step[b], s = scale[b];
        /* block * bits is a multiple of 8 bits (block >= 8): the block starts on a byte */
        const uint8_t *src = in + b0 / 8 * bits;
        unpack_levels(src, in + m / 8 * bits, block, bits, st, s, v);
        const int64_t keep = numel - b0 < block ? numel - b0 : block;
        hvdgq_unrotate_block(v, block, b0, key, norm, out + b0, keep, accumulate, isa);
    }
    free(v);
    return 0;
}

/* ---- rotated lanes, fused: one pass per block while it sits in the L1 cache ---------------------- */

/* Codes pushed one by one into words of `lanes` lanes (the order hvdgq_quantize_blocks packs). */
typedef struct {
    char *out;
    int64_t w;
    uint64_t word;
    int j, lanes, lane_bits, as_double, pext;
} lane_packer;

/* codes[0 .. take) (bytes, each < 2**lane_bits <= 256) into *word from lane j on, 8 at a time
 * with pext; returns how many were packed (the caller packs the rest). */
static int64_t pack_stream_fast(const uint8_t *codes, int64_t cnt, int bits, uint8_t *out, const uint8_t *end) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    return pack_stream_bmi2(codes, cnt, bits, out, end);
#else
    (void)codes; (void)cnt; (void)bits; (void)out; (void)end;
    return 0;
#endif
}

static int64_t pack_lanes_pext(const uint8_t *codes, int64_t take, int lane_bits, int j, uint64_t *word) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    return pack_lanes_bmi2(codes, take, lane_bits, j, word);
#else
    (void)codes; (void)take; (void)lane_bits; (void)j; (void)word;
    return 0;
#endif
}

static inline void packer_flush(lane_packer *p) {
    if (p->as_double) {
        const double d = (double)(int64_t)p->word;
        memcpy(p->out + 8 * p->w, &d, 8);
    } else {
        memcpy(p->out + 8 * p->w, &p->word, 8);
    }
    p->w++;
    p->word = 0;
    p->j = 0;
}

static void packer_push(lane_packer *p, const uint8_t *codes, int64_t cnt) {
    /* locals, not p's fields, in the loop: stores through p->out may alias them */
    uint64_t word = p->word;
    int j = p->j;
    const int lanes = p->lanes, lane_bits = p->lane_bits;
    int64_t i = 0;
    while (i < cnt) {
        const int64_t take = cnt - i < lanes - j ? cnt - i : lanes - j;
        int64_t k = p->pext ? pack_lanes_pext(codes + i, take, lane_bits, j, &word) : 0;
        for (; k < take; k++) word |= (uint64_t)codes[i + k] << (lane_bits * (j + k));
        i += take;
        j += (int)take;
        if (j == lanes) {
            p->word = word;
            packer_flush(p);
            word = 0;
            j = 0;
        }
    }
    p->word = word;
    p->j = j;
}

/* The rotated lanes' encode of a layer of n elements, m = n rounded up to whole blocks:
 * per block, rotate x (+ addend) (skipped with `rotated`: x already holds the m rotated values),
 * take its energy (energy may be NULL), quantize against the block's scale as
 * hvdgq_quantize_blocks, pack into words, and, with resid_out, rotate the block's error back:
 * resid_out[0 .. n) = the coding error in the gradient's domain (what error feedback keeps).
 * Returns -1 if a block buffer could not be allocated. */
int hvdgq_encode_rotated_lanes(const float *x, const float *addend, int rotated, int64_t n, int64_t m, int64_t block,
                               uint64_t key, float norm, const float *scale, const float *to_unit, const float *step,
                               int bits, int nearest, uint64_t dither_key, int lane_bits, int lanes, int as_double,
                               void *out_words, double *energy, float *resid_out) {
    float *v = (float *)malloc((size_t)block * 2 * sizeof(float));
    uint8_t *codes = (uint8_t *)malloc((size_t)block);
    if (!v || !codes) {
        free(v);
        free(codes);
        return -1;
    }
    float *err = v + block;
    const int isa = hvdgq_isa();
    const int top = (1 << bits) - 1;
    lane_packer p = {(char *)out_words, 0, 0, 0, lanes, lane_bits, as_double, lane_bits <= 8 && use_pdep()};
    for (int64_t b0 = 0; b0 < m; b0 += block) {
        const int64_t b = b0 / block;
        const int64_t len = n - b0 < 0 ? 0 : (n - b0 < block ? n - b0 : block);
        const float *y;
        if (rotated) {
            y = x + b0;
        } else {
            hvdgq_rotate_block(x + b0, addend ? addend + b0 : NULL, len, v, block, b0, key, norm,
                               energy ? energy + b : NULL, isa);
            y = v;
        }
        block_codes(y, block, b0, scale[b], to_unit[b], step[b], top, nearest, dither_key, codes,
                    resid_out ? err : NULL);
        packer_push(&p, codes, block);
        if (resid_out && len > 0) hvdgq_unrotate_block(err, block, b0, key, norm, resid_out + b0, len, 0, isa);
    }
    if (p.j) packer_flush(&p);
    free(v);
    free(codes);
    return 0;
}

/* The rotated lanes' decode: reduced words (as hvdgq_dequantize_blocks reads them) -> per block
 * the levels sum * per_code[b] - scale[b], the inverse rotation, and out[0 .. numel). Returns -1
 * on a float word that is not an integer, -2 if a buffer could not be allocated. */
int hvdgq_decode_rotated_lanes(const void *in_words, int64_t m, int as_double, double multiplier, int lane_bits,
                               int lanes, int64_t block, const float *per_code, const float *scale, uint64_t key,
                               float norm, float *out, int64_t numel) {
    float *v = (float *)malloc((size_t)block * sizeof(float));
    if (!v) return -2;
    const int isa = hvdgq_isa();
    const uint64_t mask = (lane_bits >= 64) ? ~0ull : ((1ull << lane_bits) - 1ull);
    const int pdep = lane_bits <= 8 && use_pdep();
    for (int64_t b0 = 0; b0 < m && b0 < numel; b0 += block) {
        for (int64_t idx = b0; idx < b0 + block;) {
            const int64_t w = idx / lanes;
            const int j = (int)(idx % lanes);
            const int cnt = b0 + block - idx < lanes - j ? (int)(b0 + block - idx) : lanes - j;
            int64_t iw;
            if (read_word(in_words, w, as_double, multiplier, &iw)) {
                free(v);
                return -1;
            }
            const uint64_t word = (uint64_t)iw >> (lane_bits * j);
            float *dst = v + (idx - b0);
            int k = pdep ? lanes_to_float_pdep(word, lane_bits, cnt, dst) : 0;
            for (; k < cnt; k++) dst[k] = (float)((word >> (lane_bits * k)) & mask);
            idx += cnt;
        }
        block_levels(v, block, per_code[b0 / block], scale[b0 / block]);
        const int64_t keep = numel - b0 < block ? numel - b0 : block;
        hvdgq_unrotate_block(v, block, b0, key, norm, out + b0, keep, 0, isa);
    }
    free(v);
    return 0;
}

/* The gathered rotated code's encode after the rotation: y (m rotated values, whole blocks) ->
 * per block the codes against scale[b] (nonzero) as a bit stream of `bits` bits per code, and,
 * with resid_out, the block's coding error rotated back into resid_out[0 .. numel) (a block whose
 * wire scale is 0 decodes to zeros: its error is y itself). Returns -1 if no block buffer. */
int hvdgq_encode_rotated_bits(const float *y, int64_t m, int64_t block, uint64_t key, float norm, const float *scale,
                              const float *to_unit, const float *step, const float *wire_scale, int bits, int nearest,
                              uint64_t dither_key, uint8_t *out, float *resid_out, int64_t numel) {
    float *err = (float *)malloc((size_t)block * sizeof(float));
    uint8_t *codes = (uint8_t *)malloc((size_t)block);
    if (!err || !codes) {
        free(err);
        free(codes);
        return -1;
    }
    const int isa = hvdgq_isa();
    const int top = (1 << bits) - 1;
    for (int64_t b0 = 0; b0 < m; b0 += block) {
        const int64_t b = b0 / block;
        float *e = resid_out ? err : NULL;
        block_codes(y + b0, block, b0, scale[b], to_unit[b], step[b], top, nearest, dither_key, codes, e);
        pack_stream(codes, block, bits, out + b0 / 8 * bits, out + m / 8 * bits);
        if (resid_out && b0 < numel) {
            if (!(wire_scale[b] > 0.0f)) memcpy(err, y + b0, (size_t)block * sizeof(float));
            const int64_t keep = numel - b0 < block ? numel - b0 : block;
            hvdgq_unrotate_block(err, block, b0, key, norm, resid_out + b0, keep, 0, isa);
        }
    }
    free(err);
    free(codes);
    return 0;
}
