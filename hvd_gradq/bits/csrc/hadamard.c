/* The randomized Hadamard transform of hvd_gradq/bits/rotation.py, blockwise:
 *   rotate:   y = norm * H(D x)     unrotate: x = D (norm * H(y))
 * H is the Walsh-Hadamard butterfly over blocks of `block` (a power of two) elements, D the signs
 * (bit i % 64 of SplitMix64(key, i / 64): set = -1), norm = 1/sqrt(block) as float32.
 *
 * Every output of every butterfly stage is the same float32 a + c or a - c of the torch reference,
 * stages in the same order (h = 1, 2, 4, ...; -ffp-contract=off), so all paths give the same bits;
 * only the grouping of the work differs. A block is transformed whole while it sits in the L1
 * cache: the stages h < 16 inside one vector register (AVX-512: a 16-float register holds a whole
 * group; AVX2: h < 8 in an 8-float register), the stages h >= 16 (or 8) as contiguous vector
 * loops. The instruction set is chosen when the library is first called, from what the CPU
 * reports (`hvdgq_isa`), not when it was compiled: one library runs everywhere; `hvdgq_set_isa`
 * forces a narrower path (tests compare every path with the torch reference). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HVDGQ_X86 1
#include <immintrin.h>
#endif

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int isa_forced = -1;

/* The widest path this CPU runs (2: AVX-512F, 1: AVX2, 0: portable C). */
int hvdgq_isa(void) {
    if (isa_forced >= 0) return isa_forced;
#ifdef HVDGQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2")) return ISA_AVX2;
#endif
    return ISA_GENERIC;
}

/* Use at most `isa` (tests; -1: back to what the CPU reports). Returns the path now in use. */
int hvdgq_set_isa(int isa) {
    isa_forced = -1;
    const int best = hvdgq_isa();
    isa_forced = (isa < 0 || isa > best) ? -1 : isa;
    return hvdgq_isa();
}

static inline uint64_t sign_word(uint64_t key, uint64_t counter) {
    uint64_t z = key + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* x[i] = -x[i] where the sign bit of global element `first + i` is set. */
static void apply_signs(float *x, int64_t n, int64_t first, uint64_t key) {
    uint32_t *u = (uint32_t *)x;
    int64_t i = 0;
    while (i < n) {
        const int64_t g = first + i;
        const uint64_t bits = sign_word(key, (uint64_t)(g >> 6)) >> (g & 63);
        const int64_t len = n - i < 64 - (g & 63) ? n - i : 64 - (g & 63);
        uint32_t *v = u + i;
        for (int64_t k = 0; k < len; k++) v[k] ^= (uint32_t)((bits >> k) & 1ull) << 31;
        i += len;
    }
}

/* Stages h = from, 2 from, ..., block / 2 of one block: contiguous runs of h pairs. */
static void stages_from(float *v, int64_t block, int64_t from) {
    for (int64_t h = from; h < block; h <<= 1) {
        for (int64_t i = 0; i < block; i += 2 * h) {
            float *restrict lo = v + i;
            float *restrict hi = v + i + h;
            for (int64_t j = 0; j < h; j++) {
                const float a = lo[j], c = hi[j];
                lo[j] = a + c;
                hi[j] = a - c;
            }
        }
    }
}

#ifdef HVDGQ_X86
/* out[j] = x[j] + x[j ^ h] where bit h of j is clear, x[j ^ h] - x[j] where it is set: one stage. */
__attribute__((target("avx512f"))) static inline __m512 stage512(__m512 x, __m512 s, __mmask16 upper) {
    return _mm512_mask_sub_ps(_mm512_add_ps(x, s), upper, s, x);
}

__attribute__((target("avx512f"))) static void small_stages_avx512(float *v, int64_t block) {
    for (int64_t i = 0; i < block; i += 16) {
        __m512 x = _mm512_loadu_ps(v + i);
        x = stage512(x, _mm512_permute_ps(x, 0xB1), 0xAAAA);             /* h = 1 */
        x = stage512(x, _mm512_permute_ps(x, 0x4E), 0xCCCC);             /* h = 2 */
        x = stage512(x, _mm512_shuffle_f32x4(x, x, 0xB1), 0xF0F0);       /* h = 4 */
        x = stage512(x, _mm512_shuffle_f32x4(x, x, 0x4E), 0xFF00);       /* h = 8 */
        _mm512_storeu_ps(v + i, x);
    }
}

/* Stages h = from .. block / 2 (from >= 16): three at a time in registers (eight vectors a stride
 * h apart hold every input of stages h, 2h and 4h), then the one or two left. */
__attribute__((target("avx512f"))) static void stages_from_avx512(float *v, int64_t block, int64_t from) {
    int64_t h = from;
    for (; 8 * h <= block; h *= 8) {
        for (int64_t i = 0; i < block; i += 8 * h) {
            for (int64_t j = i; j < i + h; j += 16) {
                __m512 r[8], t[8];
                for (int k = 0; k < 8; k++) r[k] = _mm512_loadu_ps(v + j + k * h);
                for (int k = 0; k < 8; k += 2) { t[k] = _mm512_add_ps(r[k], r[k + 1]); t[k + 1] = _mm512_sub_ps(r[k], r[k + 1]); }
                for (int k = 0; k < 8; k += 4)
                    for (int q = 0; q < 2; q++) {
                        r[k + q] = _mm512_add_ps(t[k + q], t[k + q + 2]);
                        r[k + q + 2] = _mm512_sub_ps(t[k + q], t[k + q + 2]);
                    }
                for (int q = 0; q < 4; q++) { t[q] = _mm512_add_ps(r[q], r[q + 4]); t[q + 4] = _mm512_sub_ps(r[q], r[q + 4]); }
                for (int k = 0; k < 8; k++) _mm512_storeu_ps(v + j + k * h, t[k]);
            }
        }
    }
    if (4 * h <= block) {
        for (int64_t i = 0; i < block; i += 4 * h) {
            for (int64_t j = i; j < i + h; j += 16) {
                const __m512 a = _mm512_loadu_ps(v + j), b = _mm512_loadu_ps(v + j + h);
                const __m512 c = _mm512_loadu_ps(v + j + 2 * h), d = _mm512_loadu_ps(v + j + 3 * h);
                const __m512 s0 = _mm512_add_ps(a, b), s1 = _mm512_sub_ps(a, b);
                const __m512 s2 = _mm512_add_ps(c, d), s3 = _mm512_sub_ps(c, d);
                _mm512_storeu_ps(v + j, _mm512_add_ps(s0, s2));
                _mm512_storeu_ps(v + j + h, _mm512_add_ps(s1, s3));
                _mm512_storeu_ps(v + j + 2 * h, _mm512_sub_ps(s0, s2));
                _mm512_storeu_ps(v + j + 3 * h, _mm512_sub_ps(s1, s3));
            }
        }
        h *= 4;
    }
    for (; h < block; h <<= 1) {
        for (int64_t i = 0; i < block; i += 2 * h) {
            for (int64_t j = i; j < i + h; j += 16) {
                const __m512 a = _mm512_loadu_ps(v + j), c = _mm512_loadu_ps(v + j + h);
                _mm512_storeu_ps(v + j, _mm512_add_ps(a, c));
                _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, c));
            }
        }
    }
}

/* The 16 sign bits of elements g .. g + 15 (g a multiple of 16) as a lane mask. */
static inline uint16_t sign_mask16(uint64_t key, int64_t g) {
    return (uint16_t)(sign_word(key, (uint64_t)(g >> 6)) >> (g & 63));
}

/* A whole rotation of one block (block >= 16) in three kinds of passes: load (x + addend, zero
 * past len), signs and the stages h < 16; the stages h >= 16; the norm and the energy. */
__attribute__((target("avx512f"))) static void rotate_block_avx512(const float *x, const float *addend, int64_t len,
                                                                    float *v, int64_t block, int64_t first,
                                                                    uint64_t key, float norm, double *energy) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (int64_t i = 0; i < block; i += 16) {
        const int64_t left = len - i;
        const __mmask16 in = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1u));
        __m512 y = _mm512_maskz_loadu_ps(in, x + i);
        if (addend) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(in, addend + i));
        y = _mm512_castsi512_ps(_mm512_mask_xor_epi32(_mm512_castps_si512(y), sign_mask16(key, first + i),
                                                      _mm512_castps_si512(y), sign));
        y = stage512(y, _mm512_permute_ps(y, 0xB1), 0xAAAA);
        y = stage512(y, _mm512_permute_ps(y, 0x4E), 0xCCCC);
        y = stage512(y, _mm512_shuffle_f32x4(y, y, 0xB1), 0xF0F0);
        y = stage512(y, _mm512_shuffle_f32x4(y, y, 0x4E), 0xFF00);
        _mm512_storeu_ps(v + i, y);
    }
    stages_from_avx512(v, block, 16);
    const __m512 nv = _mm512_set1_ps(norm);
    __m512d e0 = _mm512_setzero_pd(), e1 = _mm512_setzero_pd();
    for (int64_t i = 0; i < block; i += 16) {
        const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(v + i), nv);
        _mm512_storeu_ps(v + i, y);
        if (energy) {
            const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(y));
            const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1)));
            e0 = _mm512_add_pd(e0, _mm512_mul_pd(lo, lo));
            e1 = _mm512_add_pd(e1, _mm512_mul_pd(hi, hi));
        }
    }
    if (energy) {
        double part[16];
        _mm512_storeu_pd(part, e0);
        _mm512_storeu_pd(part + 8, e1);
        double sum = 0.0;
        for (int k = 0; k < 16; k++) sum += part[k];
        *energy = sum;
    }
}

/* The inverse of one block: the stages h < 16 and h >= 16 in place in v, then norm and signs
 * into out (may be v), its first `keep` elements only. */
__attribute__((target("avx512f"))) static void unrotate_block_avx512(float *v, int64_t block, int64_t first,
                                                                      uint64_t key, float norm, float *out,
                                                                      int64_t keep, int accumulate) {
    small_stages_avx512(v, block);
    stages_from_avx512(v, block, 16);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512 nv = _mm512_set1_ps(norm);
    for (int64_t i = 0; i < block && i < keep; i += 16) {
        const int64_t left = keep - i;
        const __mmask16 m = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
        const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(v + i), nv);
        __m512 x = _mm512_castsi512_ps(_mm512_mask_xor_epi32(_mm512_castps_si512(y), sign_mask16(key, first + i),
                                                              _mm512_castps_si512(y), sign));
        if (accumulate) x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, out + i), x);
        _mm512_mask_storeu_ps(out + i, m, x);
    }
}

__attribute__((target("avx2"))) static void small_stages_avx2(float *v, int64_t block) {
    for (int64_t i = 0; i < block; i += 8) {
        __m256 x = _mm256_loadu_ps(v + i);
        __m256 s = _mm256_permute_ps(x, 0xB1);                                     /* h = 1 */
        x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xAA);
        s = _mm256_permute_ps(x, 0x4E);                                            /* h = 2 */
        x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xCC);
        s = _mm256_permute2f128_ps(x, x, 0x01);                                    /* h = 4 */
        x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xF0);
        _mm256_storeu_ps(v + i, x);
    }
}

__attribute__((target("avx2"))) static void stages_from_avx2(float *v, int64_t block, int64_t from) {
    for (int64_t h = from; h < block; h <<= 1) {
        for (int64_t i = 0; i < block; i += 2 * h) {
            for (int64_t j = i; j < i + h; j += 8) {
                const __m256 a = _mm256_loadu_ps(v + j), c = _mm256_loadu_ps(v + j + h);
                _mm256_storeu_ps(v + j, _mm256_add_ps(a, c));
                _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, c));
            }
        }
    }
}
#endif

/* All stages of one block, then the norm; `energy` (may be NULL) gets the block's sum of squares
 * (float64, eight interleaved partial sums added in a fixed order). */
static void transform_block(float *v, int64_t block, float norm, int isa, double *energy) {
#ifdef HVDGQ_X86
    if (isa == ISA_AVX512 && block >= 16) {
        small_stages_avx512(v, block);
        stages_from_avx512(v, block, 16);
    } else if (isa >= ISA_AVX2 && block >= 8) {
        small_stages_avx2(v, block);
        stages_from_avx2(v, block, 8);
    } else {
        stages_from(v, block, 1);
    }
#else
    (void)isa;
    stages_from(v, block, 1);
#endif
    if (energy) {
        double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = 0; j < block; j += 8) {
            for (int k = 0; k < 8; k++) {
                const float y = v[j + k] * norm;
                v[j + k] = y;
                part[k] += (double)y * (double)y;
            }
        }
        *energy = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    } else {
        for (int64_t j = 0; j < block; j++) v[j] *= norm;
    }
}

/* One block of the rotation: x[0 .. len) (+ addend) zero-padded -> v (block floats); `first` the
 * block's first element in the layer; energy (may be NULL) its sum of squares. */
void hvdgq_rotate_block(const float *x, const float *addend, int64_t len, float *v, int64_t block, int64_t first,
                        uint64_t key, float norm, double *energy, int isa) {
#ifdef HVDGQ_X86
    if (isa == ISA_AVX512 && block >= 16 && (v == x || v + block <= x || x + len <= v)) {
        rotate_block_avx512(x, addend, len, v, block, first, key, norm, energy);
        return;
    }
#endif
    if (addend) {
        for (int64_t j = 0; j < len; j++) v[j] = x[j] + addend[j];
    } else if (v != x) {
        memcpy(v, x, (size_t)len * sizeof(float));
    }
    if (len < block) memset(v + len, 0, (size_t)(block - len) * sizeof(float));
    apply_signs(v, block, first, key);
    transform_block(v, block, norm, isa, energy);
}

/* y (m floats, m a multiple of block, block >= 8) = rotation of x (+ addend, may be NULL), x of
 * n <= m elements zero-padded; energy (may be NULL) gets m / block sums of squares. y may be x. */
void hvdgq_rotate_into(const float *x, const float *addend, int64_t n, float *y, int64_t m, int64_t block,
                       uint64_t key, float norm, double *energy) {
    const int isa = hvdgq_isa();
    for (int64_t b = 0; b < m; b += block) {
        const int64_t len = n - b < 0 ? 0 : (n - b < block ? n - b : block);
        hvdgq_rotate_block(x + b, addend ? addend + b : NULL, len, y + b, block, b, key, norm,
                           energy ? energy + b / block : NULL, isa);
    }
}

/* In place, x: n floats, n a multiple of block (block >= 8). */
void hvdgq_rotate(float *x, int64_t n, int64_t block, uint64_t key, float norm) {
    hvdgq_rotate_into(x, NULL, n, x, n, block, key, norm, NULL);
}

/* One block of the inverse: v (block floats, overwritten) -> out[0 .. keep) (= or += with
 * `accumulate`); `first` is the block's first element in the layer (for the signs). */
void hvdgq_unrotate_block(float *v, int64_t block, int64_t first, uint64_t key, float norm, float *out, int64_t keep,
                          int accumulate, int isa) {
#ifdef HVDGQ_X86
    if (isa == ISA_AVX512 && block >= 16) {
        unrotate_block_avx512(v, block, first, key, norm, out, keep, accumulate);
        return;
    }
#endif
    transform_block(v, block, norm, isa, NULL);
    apply_signs(v, keep, first, key);
    if (accumulate) {
        for (int64_t j = 0; j < keep; j++) out[j] = out[j] + v[j];
    } else if (out != v) {
        memcpy(out, v, (size_t)keep * sizeof(float));
    }
}

/* x = D (norm * H(y)): y (m floats, m a multiple of block) is overwritten with intermediate
 * values, out (may be y) gets the first `numel` elements of x. */
void hvdgq_unrotate_into(float *y, int64_t m, int64_t block, uint64_t key, float norm, float *out, int64_t numel) {
    const int isa = hvdgq_isa();
    for (int64_t b = 0; b < m && b < numel; b += block) {
        const int64_t keep = numel - b < block ? numel - b : block;
        hvdgq_unrotate_block(y + b, block, b, key, norm, out + b, keep, 0, isa);
    }
}

/* In place: x = D (norm * H(x)), n a multiple of block. */
void hvdgq_unrotate(float *x, int64_t n, int64_t block, uint64_t key, float norm) {
    hvdgq_unrotate_into(x, n, block, key, norm, x, n);
}
