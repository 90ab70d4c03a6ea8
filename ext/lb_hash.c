/* lb_hash.c - the seeded 64-bit hash of flow keys and backend identities.
 *
 * Design: a multiply-mix hash of the wyhash / rapidhash family. The one
 * primitive is mix(a, b) = lo64(a*b) ^ hi64(a*b) of the full 128-bit product:
 * one MULX/MUL on x86-64, and every output bit depends on every input bit of
 * both factors (the high half carries all the cross terms). The input is read
 * as little-endian 64-bit words, two per 16-byte block:
 *
 *     k0 = mix(seed ^ K0, K1)                  seed-derived word key
 *     h  = mix(seed ^ K2, K3) ^ n              seed-derived chain state
 *     for each 16-byte block (a, b):  h = mix(a ^ k0, b ^ h)
 *     tail (1..15 bytes, zero-padded to 16): one more block
 *     return mix(h ^ K1, k0 ^ K2)
 *
 * A 40-byte flow key is three blocks, so six multiplies of which five are on
 * the dependency chain (~25 cycles latency; in a batch of independent keys
 * the CPU overlaps them and the cost is the multiply throughput, a few ns).
 * lb_hash_flow is the same algorithm unrolled for exactly 40 bytes; the test
 * suite checks lb_hash_flow(k) == lb_hash_bytes(k, 40) and both against the
 * pure-Python lbcore/reference/hash.py, bit for bit.
 *
 * Why it would resist hash flooding under a secret random seed (no user keys
 * it so today: selection takes the config's seed and the flow table has its
 * own keyed hash, ft_hash in lb_flow.c; this is why a seed is a safe way to
 * key it should one need to):
 *  - The classic weakness of multiply-mix hashes is a "blinding" zero
 *    factor: if an attacker can make a ^ secret == 0, the product is 0 and
 *    the rest of the input (and the seed) is lost, which yields collisions
 *    that hold for every seed. Here both factors of every multiply are
 *    xor-ed with seed-derived values (k0 for the first, the chain state h
 *    for the second), not with public constants, so forcing a zero factor
 *    means guessing 64 secret bits.
 *  - Collisions of the mix itself depend on the unknown k0 and h, so a set of
 *    keys that collide (or share bucket bits) under one seed is, as far as
 *    anyone outside can tell, unrelated under another: precomputed flooding
 *    sets do not carry over between starts.
 *  - The hash values never leave the process; an attacker only sees timing,
 *    which with 64 random bits of seed per start leaves no practical way to
 *    learn the key. It is not a cryptographic PRF (SipHash is, at ~3x the
 *    cost), so a table keyed by it should also bound its probe length and
 *    memory, making the worst case of a successful attack bounded work.
 * The selection seed (Maglev pick) comes from the config on purpose, so that
 * every gateway agrees; there the threat is only steering one's own flows.
 */
#include <string.h>
#include "lb_hash.h"
#include "lb_bytes.h"

/* Odd 64-bit constants with balanced bits (golden ratio, the splitmix64 and
 * xxHash64 multipliers): they only separate the roles of the seed. */
#define LB_HASH_K0 0x9e3779b97f4a7c15ull
#define LB_HASH_K1 0xbf58476d1ce4e5b9ull
#define LB_HASH_K2 0x94d049bb133111ebull
#define LB_HASH_K3 0xc2b2ae3d27d4eb4full

_Static_assert(sizeof(struct lb_flow_key) == 40, "lb_flow_key must be 40 bytes");

static inline uint64_t
lb_hash_mix(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

/* little-endian 64-bit word, whatever the host order */
static inline uint64_t
lb_hash_le64(const uint8_t *p)
{
    uint64_t v = lb_load64(p);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

uint64_t
lb_hash_bytes(const void *data, size_t n, uint64_t seed)
{
    const uint8_t *p = data;
    uint64_t k0 = lb_hash_mix(seed ^ LB_HASH_K0, LB_HASH_K1);
    uint64_t h = lb_hash_mix(seed ^ LB_HASH_K2, LB_HASH_K3) ^ (uint64_t)n;
    size_t left = n;

    while (left >= 16) {
        h = lb_hash_mix(lb_hash_le64(p) ^ k0, lb_hash_le64(p + 8) ^ h);
        p += 16;
        left -= 16;
    }
    if (left > 0) {
        uint8_t t[16] = {0};
        memcpy(t, p, left);
        h = lb_hash_mix(lb_hash_le64(t) ^ k0, lb_hash_le64(t + 8) ^ h);
    }
    return lb_hash_mix(h ^ LB_HASH_K1, k0 ^ LB_HASH_K2);
}

/* lb_hash_bytes(k, 40, seed), unrolled: two full blocks and an 8-byte tail
 * (whose upper word is the zero padding). */
uint64_t
lb_hash_flow(const struct lb_flow_key *k, uint64_t seed)
{
    const uint8_t *p = (const uint8_t *)k;
    uint64_t k0 = lb_hash_mix(seed ^ LB_HASH_K0, LB_HASH_K1);
    uint64_t h = lb_hash_mix(seed ^ LB_HASH_K2, LB_HASH_K3) ^ 40u;

    h = lb_hash_mix(lb_hash_le64(p) ^ k0, lb_hash_le64(p + 8) ^ h);
    h = lb_hash_mix(lb_hash_le64(p + 16) ^ k0, lb_hash_le64(p + 24) ^ h);
    h = lb_hash_mix(lb_hash_le64(p + 32) ^ k0, h);
    return lb_hash_mix(h ^ LB_HASH_K1, k0 ^ LB_HASH_K2);
}
