/* lb_csum.c - full Internet checksum (RFC 1071). The packet path itself only
 * uses the incremental helpers of lb_csum.h; this is for the control side and
 * the tests. */
#include "lb_csum.h"

uint32_t lb_csum_partial(const uint8_t *p, size_t n, uint32_t sum)
{
    /* 32-bit big-endian chunks into a 64-bit accumulator: a carry out of
     * bit 31 would need 2^32 chunks, so folding once at the end is exact. */
    uint64_t acc = sum;
    size_t i = 0;

    for (; i + 4 <= n; i += 4)
        acc += lb_be32(p + i);
    if (i + 2 <= n) {
        acc += lb_be16(p + i);
        i += 2;
    }
    if (i < n)
        acc += (uint32_t)p[i] << 8;
    acc = (acc & 0xffffffffu) + (acc >> 32);
    acc = (acc & 0xffffffffu) + (acc >> 32);
    /* Fold 32 -> 16 but keep it a valid 32-bit accumulator for chaining. */
    return lb_csum_fold((uint32_t)acc);
}
