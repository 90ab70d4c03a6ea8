/* lb_limit.c - new-flow admission and persistence, see lb_limit.h.
 *
 * Token buckets count milli-tokens: a rate of r per second adds r per
 * millisecond, a new flow costs 1000; the bucket holds burst * 1000 at most
 * and starts full. Time is the data plane's ms clock; an idle gap counts as
 * at most 10 s (enough to refill any bucket, no overflow).
 */
#include <stdlib.h>
#include <string.h>

#include "lb_consts.h"
#include "lb_hash.h"
#include "lb_limit.h"
#include "lb_lock.h"

#define CL_WAYS 4u

struct cl_ent {
    uint64_t tag;            /* keyed hash | 1; 0 = free */
    uint64_t tokens;         /* rate bucket, milli-tokens */
    uint32_t rate_last;      /* ms */
    uint32_t used;           /* ms, for LRU */
    uint32_t persist_last;   /* ms of the last persistent pick */
    uint16_t be_port;        /* be */
    uint8_t  has_be;
    uint8_t  pad;
    uint8_t  be[16];
};

struct cl_set {
    uint32_t lock;
    uint32_t pad;
    struct cl_ent e[CL_WAYS];
};

struct vip_bucket {
    uint32_t lock;
    uint32_t last;
    uint64_t tokens;
};

struct lb_limits {
    uint32_t nsets, mask;
    uint64_t seed;
    struct cl_set *sets;
    struct vip_bucket *vb;   /* [LB_MAX_STAT_IDS] */
    uint8_t *vb_init;        /* [LB_MAX_STAT_IDS]: bucket started (full) */
};

static void refill(uint64_t *tokens, uint32_t *last, uint32_t now, uint32_t rate,
                   uint32_t burst)
{
    uint32_t el = now - *last;
    uint64_t cap = (uint64_t)(burst ? burst : (rate ? rate : 1)) * 1000u;

    if (el > 10000u)
        el = 10000u;
    *last = now;
    *tokens += (uint64_t)el * rate;
    if (*tokens > cap)
        *tokens = cap;
}

struct lb_limits *lb_limit_new(uint32_t clients, uint64_t seed)
{
    struct lb_limits *l;
    uint32_t nsets = 1;

    if (clients < CL_WAYS || clients > (1u << 24))
        return NULL;
    while (nsets * CL_WAYS < clients)
        nsets <<= 1;
    l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    l->nsets = nsets;
    l->mask = nsets - 1;
    l->seed = seed;
    l->sets = calloc(nsets, sizeof(struct cl_set));
    l->vb = calloc(LB_MAX_STAT_IDS, sizeof(struct vip_bucket));
    l->vb_init = calloc(LB_MAX_STAT_IDS, 1);
    if (!l->sets || !l->vb || !l->vb_init) {
        lb_limit_free(l);
        return NULL;
    }
    return l;
}

void lb_limit_free(struct lb_limits *l)
{
    if (!l)
        return;
    free(l->sets);
    free(l->vb);
    free(l->vb_init);
    free(l);
}

size_t lb_limit_memory(const struct lb_limits *l)
{
    return sizeof(*l) + (size_t)l->nsets * sizeof(struct cl_set)
        + (size_t)LB_MAX_STAT_IDS * (sizeof(struct vip_bucket) + 1);
}

int lb_limit_vip_admit(struct lb_limits *l, const struct lb_vip *v, uint32_t now)
{
    struct vip_bucket *b;
    int ok;

    if (!l || !v->new_flow_rate || v->stat_id >= LB_MAX_STAT_IDS)
        return 1;
    b = &l->vb[v->stat_id];
    lb_spin_lock(&b->lock);
    if (!l->vb_init[v->stat_id]) {
        l->vb_init[v->stat_id] = 1;
        b->last = now;
        b->tokens = (uint64_t)(v->new_flow_burst ? v->new_flow_burst : v->new_flow_rate) * 1000u;
    }
    refill(&b->tokens, &b->last, now, v->new_flow_rate, v->new_flow_burst);
    ok = b->tokens >= 1000u;
    if (ok)
        b->tokens -= 1000u;
    lb_spin_unlock(&b->lock);
    return ok;
}

static uint64_t client_hash(const struct lb_limits *l, const struct lb_vip *v, const uint8_t *src)
{
    uint8_t k[20];

    memcpy(k, src, 16);
    memcpy(k + 16, &v->stat_id, 4);
    return lb_hash_bytes(k, sizeof(k), l->seed);
}

/* The entry of tag in s, made if absent (LRU way). Set lock held. */
static struct cl_ent *client_ent(struct cl_set *s, uint64_t tag, const struct lb_vip *v,
                                 uint32_t now)
{
    struct cl_ent *lru = &s->e[0];

    for (uint32_t i = 0; i < CL_WAYS; i++) {
        if (s->e[i].tag == tag)
            return &s->e[i];
        if (!s->e[i].tag || (lru->tag && (int32_t)(s->e[i].used - lru->used) < 0))
            lru = &s->e[i];
    }
    memset(lru, 0, sizeof(*lru));
    lru->tag = tag;
    lru->rate_last = now;
    lru->tokens = (uint64_t)(v->client_burst ? v->client_burst : v->client_rate) * 1000u;
    return lru;
}

int lb_limit_client(struct lb_limits *l, const struct lb_vip *v, const uint8_t *src,
                    uint32_t now, uint16_t *be)
{
    uint64_t h;
    struct cl_set *s;
    struct cl_ent *e;
    int rc = 0;

    *be = LB_RING_EMPTY;
    if (!l || (!v->client_rate && v->persistence != LB_PERSIST_SOURCE))
        return 0;
    h = client_hash(l, v, src);
    s = &l->sets[(h >> 32) & l->mask];
    lb_spin_lock(&s->lock);
    e = client_ent(s, h | 1u, v, now);
    e->used = now;
    if (v->client_rate) {
        refill(&e->tokens, &e->rate_last, now, v->client_rate, v->client_burst);
        if (e->tokens >= 1000u)
            e->tokens -= 1000u;
        else
            rc = -1;
    }
    if (rc == 0 && v->persistence == LB_PERSIST_SOURCE && e->has_be
        && (int32_t)(now - e->persist_last) < (int32_t)v->persist_ms) {
        for (uint32_t i = 0; i < v->n_backends; i++) {
            const struct lb_backend *b = &v->backends[i];
            if (b->port == e->be_port && memcmp(b->addr, e->be, 16) == 0) {
                if (b->weight && !(b->flags & F_BACKEND_DRAINING))
                    *be = (uint16_t)i;
                break;
            }
        }
    }
    lb_spin_unlock(&s->lock);
    return rc;
}

void lb_limit_persist(struct lb_limits *l, const struct lb_vip *v, const uint8_t *src,
                      const struct lb_backend *b, uint32_t now)
{
    uint64_t h;
    struct cl_set *s;
    struct cl_ent *e;

    if (!l || v->persistence != LB_PERSIST_SOURCE)
        return;
    h = client_hash(l, v, src);
    s = &l->sets[(h >> 32) & l->mask];
    lb_spin_lock(&s->lock);
    e = client_ent(s, h | 1u, v, now);
    e->used = now;
    e->persist_last = now;
    e->has_be = 1;
    memcpy(e->be, b->addr, 16);
    e->be_port = b->port;
    lb_spin_unlock(&s->lock);
}
