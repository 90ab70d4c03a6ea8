/* lb_table.c - the forwarding table: VIPs, backends, Maglev rings, indexes.
 *
 * A table is built whole on the control side (lb_table_new, lb_table_set_vip
 * for each VIP, lb_table_seal), then published by one pointer store
 * (lb_dp_publish) and never written again: workers read it without locks.
 *
 * Two small open-addressing indexes are built at seal time:
 *   - VIP index: (dst address, dst port, protocol) -> VIP, for every packet;
 *   - backend index: (address, port, protocol) -> (VIP, backend), for the
 *     stateless reply path: a reply whose flow entry is gone (restart,
 *     eviction, ECMP move) is still SNATed to its VIP when the backend serves
 *     exactly one VIP on that port.
 * Both also hold one entry per address (port 0, protocol 0: no VIP or
 * backend has either), so "is this a VIP's / a backend's address at all"
 * costs one probe: for echo requests and closed ports of a VIP address, for
 * fragments, which have no ports to look up by, and for a backend's own
 * traffic (its entry also says which protocols its VIPs have).
 * Their keys come from the config, not from packets, so a plain (unseeded)
 * mix is enough: probe lengths are bounded by what the operator configured.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lb_bytes.h"
#include "lb_maglev.h"
#include "lb_proto.h"
#include "lb_table.h"

#define IDX_EMPTY 0xFFFFFFFFu
#define IDX_AMBIGUOUS 0xFFFFFFFEu
#define PROTO_BIT(p) ((p) == LB_IPPROTO_TCP ? 1u : (p) == LB_IPPROTO_UDP ? 2u : 0u)

struct idx_slot {
    uint8_t  addr[16];
    uint16_t port;       /* be */
    uint8_t  proto;
    uint8_t  family;
    uint8_t  used;
    uint8_t  protos;     /* an address entry of the backend index: PROTO_BIT of
                            the protocols of the VIPs it serves */
    uint8_t  pad[2];
    uint32_t vip;        /* VIP index, or IDX_AMBIGUOUS */
    uint32_t backend;    /* backend index within that VIP */
};

/* The public struct first, so a struct lb_table * is also a table_full *. */
struct table_full {
    struct lb_table pub;
    uint32_t vip_mask;          /* index sizes - 1 (powers of two) */
    uint32_t be_mask;
    struct idx_slot *vip_idx;
    struct idx_slot *be_idx;
};

static inline uint32_t idx_hash(const uint8_t *addr, uint16_t port, uint8_t proto)
{
    uint64_t a = lb_load64(addr), b = lb_load64(addr + 8);
    uint64_t h = (a ^ (b * 0x9E3779B97F4A7C15ull)) + ((uint64_t)port << 8 | proto);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 32;
    return (uint32_t)h;
}

static uint32_t pow2_at_least(uint32_t n)
{
    uint32_t p = 8;
    while (p < n)
        p <<= 1;
    return p;
}

struct lb_table *lb_table_new(uint32_t n_vips, uint64_t sel_seed)
{
    struct table_full *t;

    if (n_vips > LB_MAX_VIPS)
        return NULL;
    t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->pub.sel_seed = sel_seed;
    t->pub.n_vips = n_vips;
    if (n_vips) {
        t->pub.vips = calloc(n_vips, sizeof(struct lb_vip));
        if (!t->pub.vips) {
            free(t);
            return NULL;
        }
    }
    return &t->pub;
}

int lb_table_set_vip(struct lb_table *t, uint32_t i, const struct lb_vip *vip,
                     const struct lb_backend *backends, uint32_t n)
{
    struct lb_vip *v;
    uint32_t M = vip->ring_size;
    int rc;

    if (!t || i >= t->n_vips || n > LB_MAX_BACKENDS)
        return -EINVAL;
    if (vip->family != LB_AF_INET && vip->family != LB_AF_INET6)
        return -EINVAL;
    if (M < 2 || M > LB_RING_SIZE_MAX || !lb_maglev_is_prime(M))
        return -EINVAL;
    v = &t->vips[i];
    if (v->ring)
        return -EEXIST;
    memcpy(v->addr, vip->addr, 16);
    v->port = vip->port;
    v->proto = vip->proto;
    v->family = vip->family;
    v->stat_id = vip->stat_id;
    v->ring_size = M;
    v->closed_port = vip->closed_port;
    v->persistence = vip->persistence;
    v->limit_action = vip->limit_action;
    v->max_flows = vip->max_flows;
    v->client_rate = vip->client_rate;
    v->client_burst = vip->client_burst;
    v->new_flow_rate = vip->new_flow_rate;
    v->new_flow_burst = vip->new_flow_burst;
    v->persist_ms = vip->persist_ms;
    v->n_backends = n;
    v->ring = malloc((size_t)M * sizeof(uint16_t));
    v->backends = n ? malloc((size_t)n * sizeof(struct lb_backend)) : NULL;
    if (!v->ring || (n && !v->backends))
        return -ENOMEM;
    if (n)
        memcpy(v->backends, backends, (size_t)n * sizeof(struct lb_backend));
    rc = lb_maglev_populate(v->ring, M, v->backends, n, t->sel_seed);
    return rc;
}

static struct idx_slot *idx_find(const struct idx_slot *idx, uint32_t mask, uint8_t family,
                                 const uint8_t *addr, uint16_t port, uint8_t proto)
{
    uint32_t h = idx_hash(addr, port, proto) & mask;

    for (uint32_t probes = 0; probes <= mask; probes++) {
        struct idx_slot *s = (struct idx_slot *)&idx[h];
        if (!s->used)
            return s;
        if (s->port == port && s->proto == proto && s->family == family &&
            memcmp(s->addr, addr, 16) == 0)
            return s;
        h = (h + 1) & mask;
    }
    return NULL;   /* unreachable: indexes are at most half full */
}

int lb_table_seal(struct lb_table *pub)
{
    struct table_full *t = (struct table_full *)pub;
    uint64_t n_be = 0;

    if (!t || t->vip_idx)
        return -EINVAL;
    for (uint32_t i = 0; i < pub->n_vips; i++) {
        if (!pub->vips[i].ring)
            return -EINVAL;          /* a slot was never set */
        n_be += pub->vips[i].n_backends;
    }
    if (n_be > (1u << 24))
        return -E2BIG;
    /* room for the address entries too: at most one per VIP / backend */
    t->vip_mask = pow2_at_least(4 * pub->n_vips + 1) - 1;
    t->be_mask = pow2_at_least((uint32_t)(4 * n_be + 1)) - 1;
    t->vip_idx = calloc((size_t)t->vip_mask + 1, sizeof(struct idx_slot));
    t->be_idx = calloc((size_t)t->be_mask + 1, sizeof(struct idx_slot));
    if (!t->vip_idx || !t->be_idx)
        return -ENOMEM;

    for (uint32_t i = 0; i < pub->n_vips; i++) {
        const struct lb_vip *v = &pub->vips[i];
        struct idx_slot *s = idx_find(t->vip_idx, t->vip_mask, v->family, v->addr, v->port, v->proto);
        if (s->used)
            return -EEXIST;          /* duplicate VIP */
        memcpy(s->addr, v->addr, 16);
        s->port = v->port;
        s->proto = v->proto;
        s->family = v->family;
        s->used = 1;
        s->vip = i;
        s = idx_find(t->vip_idx, t->vip_mask, v->family, v->addr, 0, 0);
        if (!s->used) {              /* the address: its first VIP */
            memcpy(s->addr, v->addr, 16);
            s->family = v->family;
            s->used = 1;
            s->vip = i;
        }
    }
    for (uint32_t i = 0; i < pub->n_vips; i++) {
        const struct lb_vip *v = &pub->vips[i];
        for (uint32_t j = 0; j < v->n_backends; j++) {
            const struct lb_backend *b = &v->backends[j];
            struct idx_slot *s = idx_find(t->be_idx, t->be_mask, b->family, b->addr, 0, 0);
            if (!s->used) {
                memcpy(s->addr, b->addr, 16);
                s->family = b->family;
                s->used = 1;
                s->vip = i;
                s->backend = j;
            }
            s->protos |= (uint8_t)PROTO_BIT(v->proto);
            s = idx_find(t->be_idx, t->be_mask, b->family, b->addr, b->port, v->proto);
            if (s->used) {
                if (s->vip != i)
                    s->vip = IDX_AMBIGUOUS;   /* serves several VIPs */
                continue;
            }
            memcpy(s->addr, b->addr, 16);
            s->port = b->port;
            s->proto = v->proto;
            s->family = b->family;
            s->used = 1;
            s->vip = i;
            s->backend = j;
        }
    }
    return 0;
}

void lb_table_free(struct lb_table *pub)
{
    struct table_full *t = (struct table_full *)pub;

    if (!t)
        return;
    for (uint32_t i = 0; i < pub->n_vips; i++) {
        free(pub->vips[i].ring);
        free(pub->vips[i].backends);
    }
    free(pub->vips);
    free(t->vip_idx);
    free(t->be_idx);
    free(t);
}

const struct lb_vip *lb_table_find_vip(const struct lb_table *pub, const struct lb_flow_key *k)
{
    const struct table_full *t = (const struct table_full *)pub;
    const struct idx_slot *s;

    if (!t->vip_idx)
        return NULL;
    s = idx_find(t->vip_idx, t->vip_mask, k->family, k->dst, k->dport, k->proto);
    if (!s || !s->used)
        return NULL;
    return &pub->vips[s->vip];
}

const struct lb_backend *lb_table_find_backend(const struct lb_table *pub,
                                               const struct lb_flow_key *k,
                                               const struct lb_vip **vip_out)
{
    const struct table_full *t = (const struct table_full *)pub;
    const struct idx_slot *s;

    if (!t->be_idx)
        return NULL;
    s = idx_find(t->be_idx, t->be_mask, k->family, k->src, k->sport, k->proto);
    if (!s || !s->used || s->vip == IDX_AMBIGUOUS)
        return NULL;
    *vip_out = &pub->vips[s->vip];
    return &pub->vips[s->vip].backends[s->backend];
}

const struct lb_vip *lb_table_vip_addr(const struct lb_table *pub, uint8_t family,
                                       const uint8_t *addr)
{
    const struct table_full *t = (const struct table_full *)pub;
    const struct idx_slot *s;

    if (!t || !t->vip_idx)
        return NULL;
    s = idx_find(t->vip_idx, t->vip_mask, family, addr, 0, 0);
    return s && s->used ? &pub->vips[s->vip] : NULL;
}

int lb_table_backend_addr(const struct lb_table *pub, uint8_t family, const uint8_t *addr)
{
    const struct table_full *t = (const struct table_full *)pub;
    const struct idx_slot *s;

    if (!t || !t->be_idx)
        return 0;
    s = idx_find(t->be_idx, t->be_mask, family, addr, 0, 0);
    return s && s->used;
}

int lb_table_backend_proto(const struct lb_table *pub, uint8_t family, const uint8_t *addr,
                           uint8_t proto)
{
    const struct table_full *t = (const struct table_full *)pub;
    const struct idx_slot *s;

    if (!t || !t->be_idx || !PROTO_BIT(proto))
        return 0;
    s = idx_find(t->be_idx, t->be_mask, family, addr, 0, 0);
    return s && s->used && (s->protos & PROTO_BIT(proto));
}
