/* Fused kernels for the bucketed level-set codecs (hvd_gradq/codecs/levels.py).
 *
 * One pass per direction, instead of the ~15 tensor passes of the torch reference:
 *   encode: |x| * 1/norm -> stochastic rounding onto the level set with a 16-bit dither ->
 *           (k << 1 | sign) -> an LSB-first bit stream of `bits` bits per code;
 *   decode: bit stream -> levels[k] * norm, signed.
 * The arithmetic mirrors the torch reference operation by operation (float32, no contraction
 * into fused multiply-adds: built with -ffp-contract=off) and the dither is counter-based, so
 * both paths produce identical codes for the same key. Codes are handled 8 at a time (8 codes = `bits` bytes), with `bits` a
 * compile-time constant in each specialised copy. Plain C, called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dither.h"

#define INLINE static inline __attribute__((always_inline))

/* Interval index for r: largest idx in [0, m-2] with levels[idx] <= r. `table[t]` holds that
 * index for r = t / tsize, a lower bound for every r in bin t, so a short forward scan finishes. */
INLINE int find_interval(const float *levels, int m, const int16_t *table, int tsize, float r) {
    int idx = table[(int)(r * (float)tsize)];
    while (idx < m - 2 && levels[idx + 1] <= r) idx++;
    return idx;
}

#define BLOCK 256 /* elements per block: a multiple of 8 (one packed group) and of 4 (one draw) */

INLINE void encode_bits(const float *x, int64_t n, int64_t bucket, const float *inv_norms,
                        const float *levels, int m, int uniform, const int16_t *table, int tsize,
                        uint64_t key, const int bits, uint8_t *out) {
    /* Per block: the dither (SplitMix64, scalar), then the codes of each bucket span in a
     * branch-light loop the compiler vectorises for uniform levels, then the packing. */
    float u[BLOCK];
    uint8_t codes[BLOCK];
    int64_t b = 0, next = bucket; /* bucket b covers [next - bucket, next) */
    float inv = n ? inv_norms[0] : 0.0f;
    const float top = (float)(m - 1);
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t len = n - start < BLOCK ? n - start : BLOCK;
        for (int64_t q = 0; q < (len + 3) / 4; q++) {
            const uint64_t rnd = splitmix64(key, (uint64_t)(start >> 2) + (uint64_t)q);
            for (int j = 0; j < 4; j++)
                u[4 * q + j] = dither_u16(rnd, j);
        }
        for (int64_t i = start; i < start + len;) {
            if (i == next) { inv = inv_norms[++b]; next += bucket; }
            const int64_t end = start + len < next ? start + len : next;
            const float *xs = x + i;
            const float *us = u + (i - start);
            uint8_t *cs = codes + (i - start);
            const int64_t cnt = end - i;
            if (uniform) {
                for (int64_t t = 0; t < cnt; t++) {
                    const float xi = xs[t];
                    float r = fabsf(xi) * inv;
                    r = r > 1.0f ? 1.0f : r;
                    float v = r * top;
                    v = v + us[t];
                    int k = (int)v; /* v >= 0: truncation is floor */
                    k = k > m - 1 ? m - 1 : k;
                    uint32_t xbits;
                    memcpy(&xbits, &xi, sizeof xbits); /* the sign bit, without a branch */
                    cs[t] = (uint8_t)(((uint32_t)k << 1) | (xbits >> 31));
                }
            } else {
                for (int64_t t = 0; t < cnt; t++) {
                    const float xi = xs[t];
                    float r = fabsf(xi) * inv;
                    r = r > 1.0f ? 1.0f : r;
                    const int idx = find_interval(levels, m, table, tsize, r);
                    const float lo = levels[idx];
                    const float width = levels[idx + 1] - lo;
                    const int k = idx + ((r - lo) > us[t] * width);
                    uint32_t xbits;
                    memcpy(&xbits, &xi, sizeof xbits);
                    cs[t] = (uint8_t)(((uint32_t)k << 1) | (xbits >> 31));
                }
            }
            i = end;
        }
        uint8_t *dst = out + (start / 8) * bits;
        const int64_t groups = len / 8;
        for (int64_t g = 0; g < groups; g++) {
            uint64_t word = 0;
            for (int j = 0; j < 8; j++) word |= (uint64_t)codes[8 * g + j] << (bits * j);
            memcpy(dst + g * bits, &word, (size_t)bits); /* little-endian: low bytes first */
        }
        if (len % 8) {
            uint64_t word = 0;
            for (int j = 0; j < len % 8; j++) word |= (uint64_t)codes[8 * groups + j] << (bits * j);
            memcpy(dst + groups * bits, &word, (size_t)((len % 8) * bits + 7) / 8);
        }
    }
}

INLINE void decode_bits(const uint8_t *in, int64_t n, int64_t bucket, const float *norms,
                        const float *levels, const int bits, float *out) {
    const uint64_t mask = (1u << bits) - 1u;
    int64_t groups = n / 8, i = 0, b = 0, next = bucket;
    float norm = n ? norms[0] : 0.0f;
#define D(J) do {                                                                               \
        if (i == next) { norm = norms[++b]; next += bucket; }                                  \
        const uint64_t code = (word >> (bits * (J))) & mask;                                    \
        const float v = levels[code >> 1] * norm;                                               \
        uint32_t vbits;                                                                         \
        memcpy(&vbits, &v, sizeof vbits);                                                       \
        vbits ^= (uint32_t)(code & 1) << 31; /* negate by flipping the sign bit: no branch */   \
        memcpy(out + i, &vbits, sizeof vbits);                                                  \
    } while (0)
    for (int64_t g = 0; g < groups; g++) {
        uint64_t word = 0;
        memcpy(&word, in + g * bits, (size_t)bits);
        for (int j = 0; j < 8; j++, i++) D(j);
    }
    if (i < n) {
        uint64_t word = 0;
        memcpy(&word, in + groups * bits, (size_t)((n % 8) * bits + 7) / 8);
        for (int j = 0; i < n; j++, i++) D(j);
    }
#undef D
}

#define DISPATCH(CALL)                                                                       \
    switch (bits) {                                                                          \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break;                  \
    case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break;                  \
    case 7: CALL(7); break; default: CALL(8); break;                                         \
    }

void hvdgq_encode_levels(const float *x, int64_t n, int64_t bucket, const float *inv_norms,
                         const float *levels, int m, int uniform, const int16_t *table, int tsize,
                         uint64_t key, int bits, uint8_t *out) {
#define ENC(B) encode_bits(x, n, bucket, inv_norms, levels, m, uniform, table, tsize, key, B, out)
    DISPATCH(ENC)
#undef ENC
}

void hvdgq_decode_levels(const uint8_t *in, int64_t n, int64_t bucket, const float *norms,
                         const float *levels, int bits, float *out) {
#define DEC(B) decode_bits(in, n, bucket, norms, levels, B, out)
    DISPATCH(DEC)
#undef DEC
}

/* Per-bucket max |x| (the L-infinity norms); NaN anywhere in a bucket gives NaN. */
void hvdgq_bucket_absmax(const float *x, int64_t n, int64_t bucket, float *out) {
    for (int64_t start = 0, b = 0; start < n; start += bucket, b++) {
        const int64_t end = start + bucket < n ? start + bucket : n;
        float mx = 0.0f;
        int nan = 0;
        for (int64_t i = start; i < end; i++) {
            const float a = fabsf(x[i]);
            mx = a > mx ? a : mx;
            nan |= (a != a);
        }
        out[b] = nan ? NAN : mx;
    }
}
