/* lb_bytes.h - unaligned, byte-order-aware loads and stores.
 * Every multi-byte access to packet memory goes through here (memcpy lets the
 * compiler emit one unaligned move; no aliasing or alignment UB). */
#ifndef LB_BYTES_H
#define LB_BYTES_H
#include <stdint.h>
#include <string.h>

static inline uint16_t lb_load16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t lb_load32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t lb_load64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void lb_store16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void lb_store32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* host-order value of a big-endian field */
static inline uint16_t lb_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t lb_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
#endif
