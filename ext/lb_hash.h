/* lb_hash.h - seeded hashing of flows and backends.
 *
 * Users and their seeds:
 *  - backend selection (lb_maglev_pick, the Maglev permutation): seed from
 *    the config, so every balancer with the same config maps a flow to the
 *    same backend (ECMP across gateways is safe);
 *  - rawsock's L2 neighbour table (lb_l2.c): a fixed seed, its keys being
 *    our own next hops.
 * The flow table does not use it: it has its own keyed hash (ft_hash in
 * lb_flow.c) with a random seed per start, against hash flooding.
 * The algorithm is mirrored bit for bit by lbcore/reference/hash.py. */
#ifndef LB_HASH_H
#define LB_HASH_H
#include <stdint.h>
#include <stddef.h>
#include "lb_types.h"

/* Hash n bytes with a 64-bit seed. */
uint64_t lb_hash_bytes(const void *data, size_t n, uint64_t seed);

/* Hash a whole 40-byte flow key (static inline in the .c is exported too). */
uint64_t lb_hash_flow(const struct lb_flow_key *k, uint64_t seed);

#endif
