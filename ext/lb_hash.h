/* lb_hash.h - seeded hashing of flows and backends.
 *
 * Two uses, two seeds (DESIGN.md "Selection and flow state"):
 *  - backend selection: seed from the config, so every balancer with the same
 *    config maps a flow to the same backend (ECMP across gateways is safe);
 *  - the flow table: a random seed per start, so outsiders cannot aim
 *    colliding keys at one bucket (hash flooding).
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
