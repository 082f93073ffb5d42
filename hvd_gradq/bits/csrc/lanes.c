/* Fused kernel for the shared-scale uniform quantizer of UniformCompressor
 * (hvd_gradq/codecs/uniform.py + hvd_gradq/packing.py lanes), one pass:
 *   clamp to [-s, s] -> stochastic rounding onto 2**bits levels with a 16-bit dither ->
 *   residual = x - level (error feedback) -> code packed into its lane of an int64 word
 *   (or of a float64 word holding the same integer, for op=Average).
 * Arithmetic mirrors the torch reference operation by operation in float32 (-ffp-contract=off).
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

/* max |x + addend| over n elements (addend may be NULL); NaN if any sum is NaN, inf if infinite.
 * One read pass and no temporary: the compressor's non-finite check and scale statistic. */
float hvdgq_abs_max(const float *x, const float *addend, int64_t n) {
    float mx = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        const float v = addend ? x[i] + addend[i] : x[i];
        const float a = v < 0 ? -v : v;
        mx = a > mx ? a : mx;
        nan |= (a != a);
    }
    return nan ? NAN : mx;
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
            const float u = ((float)((uint32_t)(rnd >> (16 * (i & 3))) & 0xFFFFu) + 0.5f) * (1.0f / 65536.0f);
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
        if (as_double) {
            double d;
            memcpy(&d, (const char *)in_words + 8 * w, 8);
            const double scaled = d * multiplier;
            const double r = __builtin_round(scaled);
            if (!(__builtin_fabs(scaled - r) <= 0.25)) return -1;
            word = (int64_t)r;
        } else {
            memcpy(&word, (const char *)in_words + 8 * w, 8);
            word *= (int64_t)multiplier;
        }
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
void hvdgq_quantize_blocks(const float *y, int64_t n, int64_t block, const float *scale, const float *to_unit,
                           const float *step, int bits, int nearest, uint64_t key, int lane_bits, int lanes,
                           int as_double, void *out_words, float *err_out) {
    const int top = (1 << bits) - 1;
    const int64_t words = (n + lanes - 1) / lanes;
    int64_t i = 0;
    uint64_t rnd = 0;
    for (int64_t w = 0; w < words; w++) {
        int64_t word = 0;
        for (int j = 0; j < lanes && i < n; j++, i++) {
            const int64_t b = i / block;
            const float s = scale[b];
            const float v = y[i];
            const float c = v < -s ? -s : (v > s ? s : v);
            float t = (c + s) * to_unit[b];
            if (nearest) {
                t = t + 0.5f;
            } else {
                if ((i & 3) == 0) rnd = splitmix64(key, (uint64_t)i >> 2);
                t = t + ((float)((uint32_t)(rnd >> (16 * (i & 3))) & 0xFFFFu) + 0.5f) * (1.0f / 65536.0f);
            }
            int k = (int)t;
            if (k > top) k = top;
            if (err_out) err_out[i] = v - ((float)k * step[b] - s);
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
        if (as_double) {
            double d;
            memcpy(&d, (const char *)in_words + 8 * w, 8);
            const double scaled = d * multiplier;
            const double r = __builtin_round(scaled);
            if (!(__builtin_fabs(scaled - r) <= 0.25)) return -1;
            word = (int64_t)r;
        } else {
            memcpy(&word, (const char *)in_words + 8 * w, 8);
            word *= (int64_t)multiplier;
        }
        for (int j = 0; j < lanes && i < n; j++, i++) {
            const int64_t b = i / block;
            const uint64_t sum = ((uint64_t)word >> (lane_bits * j)) & mask;
            out[i] = (float)sum * per_code[b] - scale[b];
        }
    }
    return 0;
}
