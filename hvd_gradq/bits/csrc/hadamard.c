/* The randomized Hadamard transform of hvd_gradq/bits/rotation.py, blockwise and in place:
 *   rotate:   y = norm * H(D x)     unrotate: x = D (norm * H(y))
 * H is the Walsh-Hadamard butterfly over blocks of `block` (a power of two) elements, D the signs
 * (bit i % 64 of SplitMix64(key, i / 64): set = -1), norm = 1/sqrt(block) as float32. The
 * butterflies run stage by stage in the order of the torch reference, in float32
 * (-ffp-contract=off), so both give the same bits. */
#include <stdint.h>

static inline uint64_t sign_word(uint64_t key, uint64_t counter) {
    uint64_t z = key + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void apply_signs(float *x, int64_t n, uint64_t key) {
    for (int64_t w = 0; w * 64 < n; w++) {
        const uint64_t bits = sign_word(key, (uint64_t)w);
        const int64_t end = (w + 1) * 64 < n ? (w + 1) * 64 : n;
        for (int64_t i = w * 64; i < end; i++) {
            if ((bits >> (i & 63)) & 1ull) x[i] = -x[i];
        }
    }
}

static void butterflies(float *x, int64_t n, int64_t block, float norm) {
    for (int64_t b = 0; b < n; b += block) {
        float *v = x + b;
        for (int64_t h = 1; h < block; h <<= 1) {
            for (int64_t i = 0; i < block; i += 2 * h) {
                for (int64_t j = i; j < i + h; j++) {
                    const float a = v[j], c = v[j + h];
                    v[j] = a + c;
                    v[j + h] = a - c;
                }
            }
        }
        for (int64_t j = 0; j < block; j++) v[j] *= norm;
    }
}

/* x: n floats, n a multiple of block. */
void hvdgq_rotate(float *x, int64_t n, int64_t block, uint64_t key, float norm) {
    apply_signs(x, n, key);
    butterflies(x, n, block, norm);
}

void hvdgq_unrotate(float *x, int64_t n, int64_t block, uint64_t key, float norm) {
    butterflies(x, n, block, norm);
    apply_signs(x, n, key);
}
