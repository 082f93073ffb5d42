/* The dither of every kernel (hvd_gradq/bits/dither.py's counter_uniform in torch): element i takes
 * 16 bits of SplitMix64(key + (i/4 + 1) * golden), 4 elements per 64-bit output, as
 * u = (k + 1/2) / 2^16. One definition for all kernel files, so that they cannot drift apart. */
#ifndef HVDGQ_DITHER_H
#define HVDGQ_DITHER_H

#include <stdint.h>

static inline uint64_t splitmix64(uint64_t key, uint64_t counter) {
    uint64_t z = key + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The uniform draw in (0, 1) of part j (0..3) of one SplitMix64 output. */
static inline float dither_u16(uint64_t rnd, int j) {
    return ((float)((uint32_t)(rnd >> (16 * j)) & 0xFFFFu) + 0.5f) * (1.0f / 65536.0f);
}

#endif
