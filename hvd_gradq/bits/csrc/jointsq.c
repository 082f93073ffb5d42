/* Kernels for JointSQ's selection and payload (hvd_gradq/codecs/jointsq.py, magnitude_order.py).
 *
 * The order of a layer's elements by magnitude is never sorted in full. An element's key is its
 * float32 bit pattern without the sign (monotone in |x|); the order is by key, descending, ties
 * by index, ascending. A histogram of the top 16 bits of the key (8 exponent + 8 mantissa bits:
 * bins 0.4% wide in |x|) with the float64 sum of the float32 squares per bin locates any rank;
 * only the bins at the class boundaries are gathered and sorted (in Python). The prefix of the
 * order up to a "cut" element (key c, index j) is then {e : key_e > c or (key_e == c and
 * idx_e <= j)}, a comparison per element: the passes below classify and emit with it.
 * Plain C, called through ctypes; the torch reference path is in the codec.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dither.h"

#define JSQ_BINS 65536

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JSQ_X86 1
#endif

int hvdgq_isa(void); /* hadamard.c: 0 generic, 1 avx2, 2 avx512 */

static inline uint32_t jsq_key(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u & 0x7FFFFFFFu;
}

/* counts[b], sums[b] += over the elements of bin b = key >> 15 (both arrays zeroed by the caller) */
void hvdgq_jsq_hist(const float *x, int64_t n, int64_t *counts, double *sums) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        const uint32_t b = jsq_key(v) >> 15;
        counts[b]++;
        sums[b] += (double)(v * v);
    }
}

/* Bit j of the result: key(x[j]) > c (gt) and == c (eq), for 64 elements; c < 2^31. */
#ifdef JSQ_X86
__attribute__((target("avx2"))) static uint64_t jsq_cmp64_avx2(const float *x, uint32_t c, uint64_t *eq) {
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i cv = _mm256_set1_epi32((int)c);
    uint64_t gt = 0, e = 0;
    for (int j = 0; j < 64; j += 8) {
        const __m256i k = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + j)), absmask);
        gt |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, cv))) << j;
        e |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, cv))) << j;
    }
    *eq = e;
    return gt;
}
#endif

static inline uint64_t jsq_cmp(const float *x, int len, uint32_t c, uint64_t *eq, int wide) {
#ifdef JSQ_X86
    if (wide && len == 64) return jsq_cmp64_avx2(x, c, eq);
#endif
    (void)wide;
    uint64_t gt = 0, e = 0;
    for (int j = 0; j < len; j++) {
        const uint32_t key = jsq_key(x[j]);
        gt |= (uint64_t)(key > c) << j;
        e |= (uint64_t)(key == c) << j;
    }
    *eq = e;
    return gt;
}

/* The indices (ascending) of the elements whose key lies in one of the ranges [lo[r], hi[r]]
 * (r < nr, keys < 2^31); at most cap written. */
int64_t hvdgq_jsq_gather(const float *x, int64_t n, const uint32_t *lo, const uint32_t *hi, int nr, int64_t *out,
                         int64_t cap) {
    const int wide = hvdgq_isa() >= 1;
    int64_t k = 0;
    for (int64_t base = 0; base < n; base += 64) {
        const int len = n - base < 64 ? (int)(n - base) : 64;
        uint64_t m = 0, eq;
        for (int r = 0; r < nr; r++) {
            const uint64_t above_lo = lo[r] == 0 ? ~0ull : jsq_cmp(x + base, len, lo[r] - 1, &eq, wide);
            const uint64_t above_hi = jsq_cmp(x + base, len, hi[r], &eq, wide);
            m |= above_lo & ~above_hi;
        }
        if (len < 64) m &= (1ull << len) - 1;
        while (m) {
            if (k < cap) out[k] = base + __builtin_ctzll(m);
            k++;
            m &= m - 1;
        }
    }
    return k;
}

static inline int jsq_in(uint32_t key, int64_t i, uint32_t ck, int64_t ci) {
    return key > ck || (key == ck && i <= ci);
}

/* Members of the prefix up to the cut (ck, ci) among x[base .. base + len), len <= 64, as a bit
 * mask: a branch-free compare per element (the rare key == ck case fixed up after), so that the
 * passes below walk the members' bits instead of branching on every element. */
static inline uint64_t jsq_mask(const float *x, int64_t base, int len, uint32_t ck, int64_t ci, int wide) {
    if (ck > 0x7FFFFFFFu) return 0; /* the empty prefix */
    uint64_t eq;
    uint64_t gt = jsq_cmp(x + base, len, ck, &eq, wide);
    while (eq) { /* ties with the cut's key: in the prefix up to the cut's index */
        const int j = __builtin_ctzll(eq);
        eq &= eq - 1;
        if (base + j <= ci) gt |= 1ull << j;
    }
    return gt;
}

/* Over the prefix up to the cut (ck, ci): the number of its elements and the largest gap between
 * consecutive indices, the first counted from 0 (the delta coding of the positions). */
int64_t hvdgq_jsq_max_gap(const float *x, int64_t n, uint32_t ck, int64_t ci, int64_t *count) {
    const int wide = hvdgq_isa() >= 1;
    int64_t last = 0, gap = 0, k = 0;
    for (int64_t base = 0; base < n; base += 64) {
        const int len = n - base < 64 ? (int)(n - base) : 64;
        uint64_t m = jsq_mask(x, base, len, ck, ci, wide);
        k += __builtin_popcountll(m);
        while (m) {
            const int64_t i = base + __builtin_ctzll(m);
            m &= m - 1;
            const int64_t d = i - last;
            gap = d > gap ? d : gap;
            last = i;
        }
    }
    *count = k;
    return gap;
}

/* LSB-first bit writer: code i of a stream at bit offset width * i (bitstream.pack_bits). */
typedef struct {
    uint8_t *out;
    uint64_t acc;
    int fill;
} jsq_writer;

static inline void jsq_put(jsq_writer *w, uint64_t code, int width) {
    w->acc |= code << w->fill;
    w->fill += width;
    while (w->fill >= 8) {
        *w->out++ = (uint8_t)w->acc;
        w->acc >>= 8;
        w->fill -= 8;
    }
}

static inline void jsq_flush(jsq_writer *w) {
    if (w->fill > 0) *w->out++ = (uint8_t)w->acc;
    w->acc = 0;
    w->fill = 0;
}

/* The payload of JointSQ's classes (8, 4, 2 bits; the rest not sent) from three cuts, in one pass:
 *   positions: mode 0 a bitmap of n bits; mode 1 the gaps (w bits each) as ceil(w / 8) byte
 *     planes, plane p holding bits 8p.. of every gap with min(8, w - 8p) bits per gap;
 *   classes: 2 bits per sent element (0 = 8 bits, 1 = 4, 2 = 2), in index order;
 *   values: per class, sign + magnitude codes against the class's scale with stochastic rounding,
 *     the j-th element of class c dithered by 16 bits of SplitMix64(dkey[c], j / 4) (the dither
 *     of DitherSource.uniform, one key per non-empty class).
 * outs: positions, classes, v8, v4, v2 (sized by the caller). Returns the elements written. */
int64_t hvdgq_jsq_emit(const float *x, int64_t n, const uint32_t *ck, const int64_t *ci, int mode, int w,
                       const float *scales, const uint64_t *dkey, int64_t k_total, uint8_t *positions,
                       uint8_t *classes, uint8_t *v8, uint8_t *v4, uint8_t *v2) {
    static const int widths[3] = {8, 4, 2};
    jsq_writer cls = {classes, 0, 0};
    jsq_writer val[3] = {{v8, 0, 0}, {v4, 0, 0}, {v2, 0, 0}};
    int64_t cnt[3] = {0, 0, 0};
    uint64_t rnd[3] = {0, 0, 0};
    const int planes = mode == 1 ? (w + 7) / 8 : 0;
    jsq_writer pw[4];
    int64_t plane_bytes = 0;
    if (mode == 1) { /* plane p starts after the previous planes: ceil(k * width_p / 8) bytes each */
        for (int p = 0; p < planes; p++) {
            const int wp = w - 8 * p < 8 ? w - 8 * p : 8;
            pw[p].out = positions + plane_bytes;
            pw[p].acc = 0;
            pw[p].fill = 0;
            plane_bytes += (k_total * wp + 7) / 8;
        }
    } else {
        memset(positions, 0, (size_t)((n + 7) / 8));
    }
    const int wide = hvdgq_isa() >= 1;
    int64_t last = 0, k = 0;
    for (int64_t base = 0; base < n; base += 64) {
      const int len = n - base < 64 ? (int)(n - base) : 64;
      uint64_t m = jsq_mask(x, base, len, ck[2], ci[2], wide); /* every sent element */
      while (m) {
        const int64_t i = base + __builtin_ctzll(m);
        m &= m - 1;
        const float v = x[i];
        const uint32_t key = jsq_key(v);
        const int c = jsq_in(key, i, ck[0], ci[0]) ? 0 : jsq_in(key, i, ck[1], ci[1]) ? 1 : 2;
        if (mode == 1) {
            const uint64_t gap = (uint64_t)(i - last);
            for (int p = 0; p < planes; p++) {
                const int wp = w - 8 * p < 8 ? w - 8 * p : 8;
                jsq_put(&pw[p], (gap >> (8 * p)) & ((1u << wp) - 1u), wp);
            }
        } else {
            positions[i >> 3] |= (uint8_t)(1u << (i & 7));
        }
        last = i;
        jsq_put(&cls, (uint64_t)c, 2);
        const int width = widths[c];
        const int m = 1 << (width - 1);
        const int64_t j = cnt[c]++;
        if ((j & 3) == 0) rnd[c] = splitmix64(dkey[c], (uint64_t)(j >> 2));
        const float u = dither_u16(rnd[c], (int)(j & 3));
        float r = scales[c] > 0.0f ? fabsf(v) / scales[c] : 0.0f;
        r = r > 1.0f ? 1.0f : r;
        float t = floorf(r * (float)(m - 1) + u);
        t = t > (float)(m - 1) ? (float)(m - 1) : t;
        const uint64_t code = ((uint64_t)(int)t << 1) | (uint64_t)(signbit(v) ? 1 : 0);
        jsq_put(&val[c], code, width);
        k++;
      }
    }
    for (int p = 0; p < planes; p++) jsq_flush(&pw[p]);
    jsq_flush(&cls);
    for (int c = 0; c < 3; c++) jsq_flush(&val[c]);
    return k;
}
