/* lb_l2.c - rawsock mode's L2 table and miss ring, see lb_l2.h. */
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/virtio_net.h>

#include "lb_hash.h"
#include "lb_l2.h"
#include "lb_rawsock.h"

#define L2_ETH_HLEN 14u
#define L2_VNET_LEN ((uint32_t)sizeof(struct virtio_net_hdr))

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
    l2->routes[i].order = i;
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
    if (x->plen != y->plen)
        return (int)y->plen - (int)x->plen;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Longest prefix first; of two routes of one prefix length the one given
 * first wins (the control side gives them in the kernel's order, the better
 * metric first). */
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

int lb_l2_route_any(const struct lb_l2 *l2, uint8_t n_links, uint8_t family,
                    const uint8_t *dst16, uint8_t *link, uint8_t *nh16)
{
    memcpy(nh16, dst16, 16);
    if (!l2)
        return 0;
    for (uint32_t i = 0; i < l2->n_routes; i++) {
        const struct lb_l2_route *c = &l2->routes[i];
        if (c->link < n_links && c->family == family && prefix_match(dst16, c->prefix, c->plen)) {
            if (c->has_gw)
                memcpy(nh16, c->gw, 16);
            *link = c->link;
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
    struct lb_rawsock *rs = calloc(1, sizeof(struct lb_rawsock));

    if (!rs)
        return NULL;
    rs->hold = calloc(1, sizeof(*rs->hold));   /* once: the hold path never allocates */
    if (!rs->hold) {
        free(rs);
        return NULL;
    }
    return rs;
}

void lb_rawsock_free(struct lb_rawsock *rs)
{
    if (!rs)
        return;
    lb_l2_free(rs->l2);
    free(rs->hold);
    free(rs);
}

/* ---- frames waiting for a neighbour ----------------------------------- */

static void hold_lock(uint32_t *l)
{
    while (__atomic_exchange_n(l, 1u, __ATOMIC_ACQUIRE)) {
        uint32_t spins = 0;
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            if (++spins >= 128u) {
                sched_yield();   /* a releasing holder may be in sendto() */
                spins = 0;
            }
    }
}

static void hold_unlock(uint32_t *l)
{
    __atomic_store_n(l, 0u, __ATOMIC_RELEASE);
}

void lb_l2_hold(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_l2 *l2,
                uint8_t link, uint8_t family, const uint8_t *dst16, const uint8_t *vframe,
                uint32_t vlen, uint32_t iplen, int passed, uint32_t now)
{
    struct lb_l2_hold *h = rs->hold;
    struct lb_l2_holdq *q = NULL, *free_q = NULL;
    uint8_t nh[16];

    /* the pipeline counted it as sent (or passed); it is not (yet): the VIP
     * and backend counters keep it, the flow did see the packet */
    if (passed) {
        w->stats.passed--;
    } else {
        w->stats.tx--;
        w->stats.tx_bytes -= iplen;
    }
    if (!lb_l2_nexthop(l2, link, family, dst16, nh)) {
        w->stats.drops[LB_DROP_NO_NEIGH]++;     /* no route: nothing to wait for */
        return;
    }
    lb_rawsock_record_miss(rs, link, family, nh);
    if (!h || vlen > LB_L2_HOLD_BYTES || vlen < L2_VNET_LEN + L2_ETH_HLEN) {
        w->stats.drops[LB_DROP_NO_NEIGH]++;
        return;
    }
    hold_lock(&h->lock);
    for (uint32_t i = 0; i < LB_L2_HOLD_NEIGH && !q; i++) {
        struct lb_l2_holdq *c = &h->q[i];
        if (!c->n) {
            if (!free_q)
                free_q = c;
        } else if (c->link == link && c->family == family && memcmp(c->addr, nh, 16) == 0) {
            q = c;
        }
    }
    if (!q && free_q) {
        q = free_q;
        memcpy(q->addr, nh, 16);
        q->family = family;
        q->link = link;
    }
    if (!q || q->n >= LB_L2_HOLD_PER) {
        hold_unlock(&h->lock);
        w->stats.drops[LB_DROP_HOLD_OVERFLOW]++;
        return;
    }
    struct lb_l2_held *f = &q->f[q->n++];
    memcpy(f->data, vframe, vlen);
    f->data[0] &= VIRTIO_NET_HDR_F_NEEDS_CSUM;  /* DATA_VALID means nothing on transmit */
    f->len = vlen;
    f->iplen = iplen;
    f->passed = passed != 0;
    f->since = now;
    __atomic_add_fetch(&h->n_held, 1u, __ATOMIC_RELEASE);
    hold_unlock(&h->lock);
}

void lb_l2_release(struct lb_worker *w, struct lb_rawsock *rs, struct lb_raw_sock *socks,
                   uint32_t n_socks, uint32_t now)
{
    struct lb_l2_hold *h = rs->hold;
    uint32_t gone = 0;

    if (!h || !__atomic_load_n(&h->n_held, __ATOMIC_ACQUIRE))
        return;
    if (__atomic_exchange_n(&h->lock, 1u, __ATOMIC_ACQUIRE))
        return;                                   /* another worker is at it */
    lb_dp_enter(w);                               /* the L2 table stays valid until leave */
    const struct lb_l2 *l2 = lb_rawsock_l2(rs);
    for (uint32_t i = 0; i < LB_L2_HOLD_NEIGH; i++) {
        struct lb_l2_holdq *q = &h->q[i];
        if (!q->n)
            continue;
        const uint8_t *mac = lb_l2_mac(l2, q->link, q->family, q->addr);
        uint32_t keep = 0;
        for (uint32_t j = 0; j < q->n; j++) {
            struct lb_l2_held *f = &q->f[j];
            if (mac && q->link < LB_RAW_LINKS && l2) {
                uint8_t *eth = f->data + L2_VNET_LEN;
                int fd = socks[n_socks == 2 ? q->link : 0].fd;
                memcpy(eth, mac, 6);
                memcpy(eth + 6, l2->src_mac[q->link], 6);
                if (send(fd, f->data, f->len, MSG_DONTWAIT) == (ssize_t)f->len) {
                    if (f->passed) {
                        w->stats.passed++;
                    } else {
                        w->stats.tx++;
                        w->stats.tx_bytes += f->iplen;
                    }
                } else {
                    w->stats.tx_errors++;
                }
                gone++;
            } else if ((int32_t)(now - f->since) > (int32_t)LB_L2_HOLD_MS) {
                w->stats.drops[LB_DROP_HOLD_TIMEOUT]++;
                gone++;
            } else {
                if (keep != j)
                    q->f[keep] = *f;
                keep++;
            }
        }
        q->n = (uint8_t)keep;
    }
    if (gone)
        __atomic_sub_fetch(&h->n_held, gone, __ATOMIC_RELEASE);
    hold_unlock(&h->lock);
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

