/* lb_l2.c - rawsock mode's L2 table and miss ring, see lb_l2.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lb_hash.h"
#include "lb_l2.h"

#define L2_HASH_SEED 0x6c62327261770001ull  /* fixed: the table is rebuilt, never attacked
                                             * (its keys are our own next hops) */

struct lb_l2 *lb_l2_new(uint32_t n_routes, uint32_t n_neigh)
{
    struct lb_l2 *l2;
    uint32_t slots = 8;

    if (n_routes > 65536 || n_neigh > (1u << 20))
        return NULL;
    while (slots < 2 * n_neigh)
        slots <<= 1;
    l2 = calloc(1, sizeof(*l2));
    if (!l2)
        return NULL;
    l2->routes = calloc(n_routes ? n_routes : 1, sizeof(*l2->routes));
    l2->slots = calloc(slots, sizeof(*l2->slots));
    if (!l2->routes || !l2->slots) {
        lb_l2_free(l2);
        return NULL;
    }
    l2->n_routes = n_routes;
    l2->mask = slots - 1;
    return l2;
}

void lb_l2_free(struct lb_l2 *l2)
{
    if (!l2)
        return;
    free(l2->routes);
    free(l2->slots);
    free(l2);
}

static int valid_family_plen(uint8_t family, uint8_t plen)
{
    return (family == LB_AF_INET && plen <= 32) || (family == LB_AF_INET6 && plen <= 128);
}

int lb_l2_set_route(struct lb_l2 *l2, uint32_t i, const struct lb_l2_route *r)
{
    if (i >= l2->n_routes || r->link >= LB_RAW_LINKS || !valid_family_plen(r->family, r->plen))
        return -EINVAL;
    l2->routes[i] = *r;
    return 0;
}

static inline uint32_t neigh_hash(uint8_t link, uint8_t family, const uint8_t *addr16)
{
    uint8_t key[18];

    memcpy(key, addr16, 16);
    key[16] = link;
    key[17] = family;
    return (uint32_t)lb_hash_bytes(key, sizeof(key), L2_HASH_SEED);
}

static inline int neigh_is(const struct lb_l2_neigh *n, uint8_t link, uint8_t family,
                           const uint8_t *addr16)
{
    return n->link == link && n->family == family && memcmp(n->addr, addr16, 16) == 0;
}

int lb_l2_add_neigh(struct lb_l2 *l2, uint8_t link, uint8_t family, const uint8_t *addr16,
                    const uint8_t *mac6)
{
    uint32_t i;

    if (link >= LB_RAW_LINKS || (family != LB_AF_INET && family != LB_AF_INET6))
        return -EINVAL;
    i = neigh_hash(link, family, addr16) & l2->mask;
    for (;;) {
        struct lb_l2_neigh *n = &l2->slots[i];
        if (!n->used) {
            if (2 * (l2->used + 1) > l2->mask + 1)
                return -ENOSPC;
            memcpy(n->addr, addr16, 16);
            n->family = family;
            n->link = link;
            n->used = 1;
            l2->used++;
            memcpy(n->mac, mac6, 6);
            return 0;
        }
        if (neigh_is(n, link, family, addr16)) {
            memcpy(n->mac, mac6, 6);
            return 0;
        }
        i = (i + 1) & l2->mask;
    }
}

static int route_cmp(const void *a, const void *b)
{
    const struct lb_l2_route *x = a, *y = b;
    return (int)y->plen - (int)x->plen;
}

void lb_l2_seal(struct lb_l2 *l2)
{
    qsort(l2->routes, l2->n_routes, sizeof(*l2->routes), route_cmp);
}

static inline int prefix_match(const uint8_t *a, const uint8_t *prefix, uint8_t plen)
{
    uint32_t full = plen / 8u, rem = plen % 8u;

    if (memcmp(a, prefix, full) != 0)
        return 0;
    if (rem) {
        uint8_t m = (uint8_t)(0xffu << (8u - rem));
        return (a[full] & m) == (prefix[full] & m);
    }
    return 1;
}

int lb_l2_nexthop(const struct lb_l2 *l2, uint8_t link, uint8_t family,
                  const uint8_t *dst16, uint8_t *nh16)
{
    memcpy(nh16, dst16, 16);
    if (!l2)
        return 0;
    for (uint32_t i = 0; i < l2->n_routes; i++) {
        const struct lb_l2_route *c = &l2->routes[i];
        if (c->link == link && c->family == family && prefix_match(dst16, c->prefix, c->plen)) {
            if (c->has_gw)
                memcpy(nh16, c->gw, 16);
            return 1;
        }
    }
    return 0;
}

const uint8_t *lb_l2_mac(const struct lb_l2 *l2, uint8_t link, uint8_t family,
                         const uint8_t *nh16)
{
    uint32_t i;

    if (!l2)
        return NULL;
    i = neigh_hash(link, family, nh16) & l2->mask;
    for (;;) {   /* terminates: the table is at most half full */
        const struct lb_l2_neigh *n = &l2->slots[i];
        if (!n->used)
            return NULL;
        if (neigh_is(n, link, family, nh16))
            return n->mac;
        i = (i + 1) & l2->mask;
    }
}

const uint8_t *lb_l2_lookup(const struct lb_l2 *l2, uint8_t link, uint8_t family,
                            const uint8_t *dst16, uint8_t *nh16)
{
    if (!lb_l2_nexthop(l2, link, family, dst16, nh16))
        return NULL;
    return lb_l2_mac(l2, link, family, nh16);
}

struct lb_rawsock *lb_rawsock_new(void)
{
    return calloc(1, sizeof(struct lb_rawsock));
}

void lb_rawsock_free(struct lb_rawsock *rs)
{
    if (!rs)
        return;
    lb_l2_free(rs->l2);
    free(rs);
}

struct lb_l2 *lb_rawsock_publish(struct lb_dataplane *dp, struct lb_rawsock *rs,
                                 struct lb_l2 *l2)
{
    struct lb_l2 *old = __atomic_exchange_n(&rs->l2, l2, __ATOMIC_SEQ_CST);

    /* the forwarding table's epoch: lb_dp_synchronize() then also waits for
     * every worker that may still hold the old L2 table (it loads rs->l2
     * after lb_dp_enter, like the forwarding table) */
    lb_dp_bump_epoch(dp);
    return old;
}

void lb_rawsock_record_miss(struct lb_rawsock *rs, uint8_t link, uint8_t family,
                            const uint8_t *nh16)
{
    uint32_t last = __atomic_load_n(&rs->miss_head, __ATOMIC_RELAXED);
    struct lb_raw_miss *m = &rs->miss[(last - 1) % LB_RAW_MISS];
    uint32_t h, seq;

    /* the same next hop as the last record: once is enough (a burst of
     * frames to one unresolved host must not flush the ring) */
    if (last && m->link == link && m->family == family && memcmp(m->addr, nh16, 16) == 0)
        return;
    h = __atomic_fetch_add(&rs->miss_head, 1, __ATOMIC_RELAXED);
    m = &rs->miss[h % LB_RAW_MISS];
    seq = __atomic_load_n(&m->seq, __ATOMIC_RELAXED);
    if (seq & 1u)
        return;   /* another worker is writing this slot: skip, it is only a hint */
    if (!__atomic_compare_exchange_n(&m->seq, &seq, seq + 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return;
    memcpy(m->addr, nh16, 16);
    m->family = family;
    m->link = link;
    __atomic_store_n(&m->seq, seq + 2, __ATOMIC_RELEASE);
}

uint32_t lb_rawsock_misses(struct lb_rawsock *rs, struct lb_raw_miss *out, uint32_t max)
{
    uint32_t n = 0;

    for (uint32_t i = 0; i < LB_RAW_MISS && n < max; i++) {
        struct lb_raw_miss *m = &rs->miss[i];
        struct lb_raw_miss copy;
        uint32_t s1 = __atomic_load_n(&m->seq, __ATOMIC_ACQUIRE), s2;
        if (s1 == 0 || (s1 & 1u))
            continue;
        memcpy(copy.addr, m->addr, 16);
        copy.family = m->family;
        copy.link = m->link;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        s2 = __atomic_load_n(&m->seq, __ATOMIC_RELAXED);
        if (s1 != s2)
            continue;
        copy.seq = s1;
        int dup = 0;
        for (uint32_t j = 0; j < n; j++)
            dup |= out[j].link == copy.link && out[j].family == copy.family
                   && memcmp(out[j].addr, copy.addr, 16) == 0;
        if (!dup)
            out[n++] = copy;
    }
    return n;
}

