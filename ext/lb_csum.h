/* lb_csum.h - Internet checksum helpers, incremental update per RFC 1624. */
#ifndef LB_CSUM_H
#define LB_CSUM_H
#include <stdint.h>
#include <stddef.h>

/* Fold a 32-bit one's-complement accumulator to 16 bits. */
static inline uint16_t lb_csum_fold(uint32_t sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* One's-complement sum of n bytes (network order words), added to sum. */
uint32_t lb_csum_partial(const uint8_t *p, size_t n, uint32_t sum);
#endif
