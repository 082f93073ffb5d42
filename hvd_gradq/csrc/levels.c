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

/* The dither: element i takes 16 bits of SplitMix64(key + (i/4 + 1) * golden), as
 * hvd_gradq/codecs/random.py's counter_uniform does in torch. */
static inline uint64_t splitmix64(uint64_t key, uint64_t counter) {
    uint64_t z = key + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define INLINE static inline __attribute__((always_inline))

/* Interval index for r: largest idx in [0, m-2] with levels[idx] <= r. `table[t]` holds that
 * index for r = t / tsize, a lower bound for every r in bin t, so a short forward scan finishes. */
INLINE int find_interval(const float *levels, int m, const int16_t *table, int tsize, float r) {
    int idx = table[(int)(r * (float)tsize)];
    while (idx < m - 2 && levels[idx + 1] <= r) idx++;
    return idx;
}

INLINE uint64_t quantize_one(float xi, float inv, const float *levels, int m, int uniform,
                             const int16_t *table, int tsize, uint32_t d) {
    float r = fabsf(xi) * inv;
    if (r > 1.0f) r = 1.0f;
    const float u = ((float)d + 0.5f) * (1.0f / 65536.0f);
    int k;
    if (uniform) {
        float t = r * (float)(m - 1);
        t = t + u;
        k = (int)t; /* t >= 0: truncation is floor */
        if (k > m - 1) k = m - 1;
    } else {
        const int idx = find_interval(levels, m, table, tsize, r);
        const float lo = levels[idx];
        const float width = levels[idx + 1] - lo;
        k = idx + ((r - lo) > u * width);
    }
    uint32_t xbits;
    memcpy(&xbits, &xi, sizeof xbits); /* the sign bit, read without a (mispredicted) branch */
    return ((uint64_t)k << 1) | (uint64_t)(xbits >> 31);
}

INLINE void encode_bits(const float *x, int64_t n, int64_t bucket, const float *inv_norms,
                        const float *levels, int m, int uniform, const int16_t *table, int tsize,
                        uint64_t key, const int bits, uint8_t *out) {
    int64_t groups = n / 8, i = 0, b = 0, next = bucket; /* bucket b covers [next - bucket, next) */
    float inv = n ? inv_norms[0] : 0.0f;
    uint64_t rnd = 0;
#define Q(J) do {                                                                               \
        if (i == next) { inv = inv_norms[++b]; next += bucket; }                               \
        if ((i & 3) == 0) rnd = splitmix64(key, (uint64_t)i >> 2);                              \
        const uint32_t d = (uint32_t)(rnd >> (16 * (i & 3))) & 0xFFFFu;                          \
        word |= quantize_one(x[i], inv, levels, m, uniform, table, tsize, d) << (bits * (J));    \
    } while (0)
    for (int64_t g = 0; g < groups; g++) {
        uint64_t word = 0;
        for (int j = 0; j < 8; j++, i++) Q(j);
        memcpy(out + g * bits, &word, (size_t)bits); /* little-endian: low bytes first */
    }
    if (i < n) {
        uint64_t word = 0;
        for (int j = 0; i < n; j++, i++) Q(j);
        memcpy(out + groups * bits, &word, (size_t)((n % 8) * bits + 7) / 8);
    }
#undef Q
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
