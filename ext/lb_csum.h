/* lb_csum.h - Internet checksum helpers (RFC 1071), incremental update per
 * RFC 1624.
 *
 * The incremental helpers work on 16-bit words loaded as they are stored
 * (lb_load16 of network-order bytes, no swap): a one's-complement sum commutes
 * with byte swapping (RFC 1071 section 2.B), so a checksum computed from
 * "native" words and stored back the same way is the right one, and the hot
 * path never swaps bytes.
 *
 * An update is  HC' = ~(~HC + ~m + m')  (RFC 1624 eqn. 3) summed over every
 * changed word m -> m'. For a field whose checksum is correct this gives
 * exactly what a full recomputation would (both lie in 0..0xfffe), so the C
 * core and the full-recomputation reference agree byte for byte.
 */
#ifndef LB_CSUM_H
#define LB_CSUM_H
#include <stdint.h>
#include <stddef.h>
#include "lb_bytes.h"

/* Fold a 32-bit one's-complement accumulator to 16 bits (end-around carry).
 * A nonzero accumulator folds to 1..0xffff, never 0. */
static inline uint16_t lb_csum_fold(uint32_t sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* One's-complement sum of n bytes read as big-endian 16-bit words (an odd
 * last byte is padded with a zero low byte), added to sum. The result is a
 * host-order value: the checksum to store is ~lb_csum_fold(result), written
 * big-endian. Not used on the per-packet path (which is incremental only). */
uint32_t lb_csum_partial(const uint8_t *p, size_t n, uint32_t sum);

/* Add the RFC 1624 difference of one stored 16-bit word from -> to. */
static inline uint32_t lb_csum_diff16(uint32_t acc, uint16_t from, uint16_t to)
{
    return acc + (uint16_t)~from + to;
}

/* Add the difference of replacing the n bytes at from (n even, n <= 32) by
 * the n bytes at to. Call before from is overwritten. */
static inline uint32_t lb_csum_diff(uint32_t acc, const uint8_t *from, const uint8_t *to,
                                    size_t n)
{
    for (size_t i = 0; i < n; i += 2)
        acc = lb_csum_diff16(acc, lb_load16(from + i), lb_load16(to + i));
    return acc;
}

/* A checksum field (as stored) after the changes summed in acc. */
static inline uint16_t lb_csum_update(uint16_t check, uint32_t acc)
{
    return (uint16_t)~lb_csum_fold((uint32_t)(uint16_t)~check + acc);
}

/* A CHECKSUM_PARTIAL seed (folded pseudo-header sum, not inverted) after the
 * changes in acc: fold(old + ~from + to), as the kernel's
 * inet_proto_csum_replace4(..., pseudohdr=true) does for CHECKSUM_PARTIAL. */
static inline uint16_t lb_csum_update_partial(uint16_t seed, uint32_t acc)
{
    return lb_csum_fold((uint32_t)seed + acc);
}
#endif
