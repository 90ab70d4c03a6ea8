/* lb_maglev.c - Maglev consistent hashing: build the lookup table (ring).
 *
 * Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
 * Balancer", NSDI 2016, section 3.4 "Consistent Hashing"
 * (https://www.usenix.org/conference/nsdi16/technical-sessions/presentation/eisenbud).
 *
 * Every backend i gets a preference list over the M slots of the ring (M
 * prime): permutation[i][j] = (offset_i + j * skip_i) mod M, with
 * offset_i = h1(identity_i) mod M and skip_i = h2(identity_i) mod (M-1) + 1.
 * Since M is prime and 1 <= skip < M, each list visits every slot once.
 * Populating goes in rounds: in each round every backend in turn takes the
 * first slot of its list that nobody holds yet, until all M slots are taken.
 * Every backend thus ends up with (almost) the same number of slots, and
 * when one backend leaves, the others' lists are unchanged, so most slots
 * keep their owner (minimal disruption). The pick of a flow is one hash and
 * one index: ring[slot(hash(5-tuple))] (lb_maglev_pick in lb_maglev.h).
 *
 * Choices made here (mirrored by lbcore/reference/maglev.py):
 *  - identity = family, 16 address bytes, port (network order): 19 bytes.
 *    h1/h2 are lb_hash_bytes with the caller's seed xor a named constant,
 *    never the backend's position in the caller's list, so every gateway
 *    with the same config builds the same ring whatever the order.
 *  - Backends are sorted by (identity, weight, index) before populating;
 *    the ring holds the caller's indexes. Duplicate identities are thus
 *    deterministic too.
 *  - Weights as in Linux ip_vs_mh.c: a backend of weight w takes w turns per
 *    round after dividing all weights by their gcd. To keep a huge weight
 *    from making a round longer than the ring, weights are then scaled down
 *    (right shift, rounded, never below 1) until the largest takes at most
 *    LB_MAGLEV_TURNS_MAX turns and one round at most M turns. Each full
 *    round gives backend i exactly turns_i slots, and only the last round is
 *    partial, so its slot count is within turns_i of M * turns_i / sum(turns).
 *    Weight 0 takes no slot (draining backends are passed with weight 0).
 *  - The populate loop is ip_vs_mh's: a bitmap of taken slots, no '%' in the
 *    inner loop. Control side only; one malloc per call for the state.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "lb_maglev.h"

/* xor-ed into the caller's seed for the two hashes of a backend identity */
#define LB_MAGLEV_SEED_OFFSET 0x6d61676c65762d6full   /* "maglev-o" */
#define LB_MAGLEV_SEED_SKIP   0x6d61676c65762d73ull   /* "maglev-s" */

/* Most turns a backend takes per round, after gcd reduction: 8 bits of
 * weight resolution (ip_vs_mh keeps a few top bits too). */
#define LB_MAGLEV_TURNS_MAX 256u

#define LB_MAGLEV_ID_LEN 19u   /* family, addr[16], port[2] */

/* Permutation state of one backend with positive weight. */
struct lb_maglev_perm {
    uint8_t  id[LB_MAGLEV_ID_LEN + 1];  /* identity; last byte zero */
    uint32_t weight;   /* caller's weight, then turns per round */
    uint32_t index;    /* caller's index: what the ring holds */
    uint32_t next;     /* next slot of this backend's preference list */
    uint32_t skip;
};

/* a * b mod m without overflow for m < 2^32 */
static inline uint32_t
lb_maglev_mulmod(uint32_t a, uint32_t b, uint32_t m)
{
    return (uint32_t)(((uint64_t)a * b) % m);
}

static uint32_t
lb_maglev_powmod(uint32_t b, uint32_t e, uint32_t m)
{
    uint32_t r = 1u % m;

    b %= m;
    while (e) {
        if (e & 1u)
            r = lb_maglev_mulmod(r, b, m);
        b = lb_maglev_mulmod(b, b, m);
        e >>= 1;
    }
    return r;
}

/* Miller-Rabin with bases 2, 7, 61: deterministic for n < 4,759,123,141
 * (Jaeschke 1993), hence for every uint32_t. */
int
lb_maglev_is_prime(uint32_t n)
{
    static const uint32_t bases[] = {2, 7, 61};
    uint32_t d, s = 0;
    size_t i;

    if (n < 2)
        return 0;
    if (n < 4)
        return 1;
    if ((n & 1u) == 0)
        return 0;
    d = n - 1;
    while ((d & 1u) == 0) {
        d >>= 1;
        s++;
    }
    for (i = 0; i < sizeof(bases) / sizeof(bases[0]); i++) {
        uint32_t a = bases[i] % n, x, r;

        if (a == 0)
            continue;   /* n is the base itself */
        x = lb_maglev_powmod(a, d, n);
        if (x == 1 || x == n - 1)
            continue;
        for (r = 1; r < s; r++) {
            x = lb_maglev_mulmod(x, x, n);
            if (x == n - 1)
                break;
        }
        if (r == s)
            return 0;
    }
    return 1;
}

static uint32_t
lb_maglev_gcd(uint32_t a, uint32_t b)
{
    while (b) {
        uint32_t t = a % b;

        a = b;
        b = t;
    }
    return a;
}

static int
lb_maglev_cmp(const void *pa, const void *pb)
{
    const struct lb_maglev_perm *a = pa, *b = pb;
    int c = memcmp(a->id, b->id, LB_MAGLEV_ID_LEN);

    if (c)
        return c;
    if (a->weight != b->weight)
        return a->weight < b->weight ? -1 : 1;
    return a->index < b->index ? -1 : (a->index > b->index);
}

/* turns of weight t (already divided by the gcd) at right shift s:
 * rounded to nearest, never below 1 */
static inline uint64_t
lb_maglev_turns(uint64_t t, unsigned s)
{
    uint64_t v = s ? (t + (1ull << (s - 1))) >> s : t;

    return v ? v : 1;
}

/* Weights -> turns per round, in place (see the file header). */
static void
lb_maglev_weights(struct lb_maglev_perm *perm, uint32_t n, uint32_t M)
{
    uint32_t i, g = 0;
    unsigned s;

    for (i = 0; i < n; i++)
        g = lb_maglev_gcd(perm[i].weight, g);
    for (i = 0; i < n; i++)
        perm[i].weight /= g;
    for (s = 0; s < 33; s++) {
        uint64_t max = 0, sum = 0;

        for (i = 0; i < n; i++) {
            uint64_t t = lb_maglev_turns(perm[i].weight, s);

            sum += t;
            if (t > max)
                max = t;
        }
        /* a round longer than M cannot be helped once every turn is 1 */
        if (max <= 1 || (max <= LB_MAGLEV_TURNS_MAX && sum <= M))
            break;
    }
    for (i = 0; i < n; i++)
        perm[i].weight = (uint32_t)lb_maglev_turns(perm[i].weight, s);
}

/* Offset and skip of each backend from the hashes of its identity. */
static void
lb_maglev_permutate(struct lb_maglev_perm *perm, uint32_t n, uint32_t M,
                    uint64_t seed)
{
    uint32_t i;

    for (i = 0; i < n; i++) {
        uint64_t h1 = lb_hash_bytes(perm[i].id, LB_MAGLEV_ID_LEN,
                                    seed ^ LB_MAGLEV_SEED_OFFSET);
        uint64_t h2 = lb_hash_bytes(perm[i].id, LB_MAGLEV_ID_LEN,
                                    seed ^ LB_MAGLEV_SEED_SKIP);

        perm[i].next = (uint32_t)(h1 % M);
        perm[i].skip = (uint32_t)(h2 % (M - 1)) + 1;
    }
}

int
lb_maglev_populate(uint16_t *ring, uint32_t M,
                   const struct lb_backend *backends, uint32_t n,
                   uint64_t seed)
{
    struct lb_maglev_perm *perm;
    uint64_t *taken;
    uint32_t i, npos = 0, filled = 0;
    size_t words, off;

    if (!ring || M < 2 || M > LB_RING_SIZE_MAX || !lb_maglev_is_prime(M)
        || n > LB_MAX_BACKENDS || (n && !backends))
        return -EINVAL;

    for (i = 0; i < n; i++)
        npos += backends[i].weight != 0;
    if (npos == 0 || npos == 1) {
        uint16_t v = (uint16_t)LB_RING_EMPTY;

        for (i = 0; i < n; i++)
            if (backends[i].weight)
                v = (uint16_t)i;
        for (i = 0; i < M; i++)
            ring[i] = v;
        return 0;
    }

    /* one block: the permutation states, then (8-byte aligned) the bitmap */
    words = ((size_t)M + 63) / 64;
    off = (sizeof(*perm) * npos + sizeof(*taken) - 1) & ~(sizeof(*taken) - 1);
    perm = malloc(off + sizeof(*taken) * words);
    if (!perm)
        return -ENOMEM;
    taken = (uint64_t *)(void *)((char *)perm + off);
    memset(taken, 0, sizeof(*taken) * words);

    npos = 0;
    for (i = 0; i < n; i++) {
        const struct lb_backend *b = &backends[i];
        struct lb_maglev_perm *p;

        if (!b->weight)
            continue;
        p = &perm[npos++];
        memset(p, 0, sizeof(*p));
        p->id[0] = b->family;
        memcpy(p->id + 1, b->addr, 16);
        memcpy(p->id + 17, &b->port, 2);   /* network order, as stored */
        p->weight = b->weight;
        p->index = i;
    }
    qsort(perm, npos, sizeof(*perm), lb_maglev_cmp);
    lb_maglev_weights(perm, npos, M);
    lb_maglev_permutate(perm, npos, M, seed);

    for (;;) {
        for (i = 0; i < npos; i++) {
            struct lb_maglev_perm *p = &perm[i];
            uint32_t t, c = p->next, skip = p->skip;

            for (t = 0; t < p->weight; t++) {
                while (taken[c >> 6] & (1ull << (c & 63))) {
                    c += skip;
                    if (c >= M)
                        c -= M;
                }
                taken[c >> 6] |= 1ull << (c & 63);
                ring[c] = (uint16_t)p->index;
                c += skip;
                if (c >= M)
                    c -= M;
                if (++filled == M)
                    goto out;
            }
            p->next = c;
        }
    }
out:
    free(perm);
    return 0;
}
