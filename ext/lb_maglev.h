/* lb_maglev.h - Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4).
 * permutate + populate run on the control side when a table is built;
 * pick is the one-hash, one-index hot path. */
#ifndef LB_MAGLEV_H
#define LB_MAGLEV_H
#include <stdint.h>
#include "lb_types.h"
#include "lb_hash.h"

/* 1 if n is prime (n < 2^32), else 0. */
int lb_maglev_is_prime(uint32_t n);

/* Fill ring[0..M) from backends[0..n). Offsets and skips come from seeded
 * hashes of each backend's identity (family, address, port), never from its
 * position, so the same set in any order gives the same ring. Weight w takes
 * about w times the slots of weight 1; weight 0 takes none. With no backend
 * of positive weight every slot is LB_RING_EMPTY.
 * Returns 0, -EINVAL (M not prime, n > LB_MAX_BACKENDS) or -ENOMEM. */
int lb_maglev_populate(uint16_t *ring, uint32_t M,
                       const struct lb_backend *backends, uint32_t n,
                       uint64_t seed);

/* The ring slot of a flow hash: Lemire's multiply-shift range reduction of
 * the hash's low 32 bits (no division on the hot path). */
static inline uint32_t lb_maglev_slot(uint64_t hash, uint32_t M)
{
    return (uint32_t)(((uint64_t)(uint32_t)hash * (uint64_t)M) >> 32);
}

/* Backend index for a flow, or LB_RING_EMPTY. */
static inline uint16_t lb_maglev_pick(const struct lb_vip *vip,
                                      const struct lb_flow_key *k,
                                      uint64_t seed)
{
    return vip->ring[lb_maglev_slot(lb_hash_flow(k, seed), vip->ring_size)];
}
#endif
