/* lb_sync.c - flow sync rings and wire records, see lb_sync.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lb_dp.h"
#include "lb_flow.h"
#include "lb_sync.h"
#include "lb_table.h"

struct lb_sync_ring *lb_sync_ring_new(uint32_t size)
{
    struct lb_sync_ring *r = NULL;

    if (size < 2 || size > (1u << 20) || (size & (size - 1)))
        return NULL;
    if (posix_memalign((void **)&r, 64,
                       sizeof(*r) + (size_t)size * sizeof(struct lb_flow_entry)))
        return NULL;
    memset(r, 0, sizeof(*r));
    r->size = size;
    r->mask = size - 1;
    return r;
}

void lb_sync_ring_free(struct lb_sync_ring *r)
{
    free(r);
}

uint32_t lb_sync_ring_pop(struct lb_sync_ring *r, struct lb_flow_entry *out, uint32_t max)
{
    uint32_t t = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
    uint32_t h = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
    uint32_t n = h - t;

    if (n > max)
        n = max;
    for (uint32_t i = 0; i < n; i++)
        out[i] = r->ev[(t + i) & r->mask];
    __atomic_store_n(&r->tail, t + n, __ATOMIC_RELEASE);
    return n;
}

int lb_sync_attach(struct lb_dataplane *dp, uint32_t size)
{
    if (!lb_flow_end_ring(lb_dp_flows(dp))) {
        struct lb_sync_ring *e = lb_sync_ring_new(size);
        if (!e)
            return -ENOMEM;
        lb_flow_set_end_ring(lb_dp_flows(dp), e);
    }
    for (uint32_t i = 0; i <= dp->n_workers; i++) {
        struct lb_sync_ring *r;
        if (dp->workers[i].sync)
            continue;
        r = lb_sync_ring_new(size);
        if (!r) {
            lb_sync_detach(dp);
            return -ENOMEM;
        }
        __atomic_store_n(&dp->workers[i].sync, r, __ATOMIC_RELEASE);
    }
    return 0;
}

void lb_sync_detach(struct lb_dataplane *dp)
{
    struct lb_flowtable *ft = lb_dp_flows(dp);
    if (ft) {
        struct lb_sync_ring *e = lb_flow_end_ring(ft);
        lb_flow_set_end_ring(ft, NULL);
        lb_sync_ring_free(e);
    }
    for (uint32_t i = 0; i <= dp->n_workers; i++) {
        struct lb_sync_ring *r = __atomic_exchange_n(&dp->workers[i].sync, NULL,
                                                     __ATOMIC_ACQ_REL);
        lb_sync_ring_free(r);
    }
}

uint32_t lb_sync_drain(struct lb_dataplane *dp, struct lb_flow_entry *out, uint32_t max,
                       uint64_t *drops)
{
    uint32_t n = 0;

    *drops = 0;
    for (uint32_t i = 0; i <= dp->n_workers; i++) {
        struct lb_sync_ring *r = __atomic_load_n(&dp->workers[i].sync, __ATOMIC_ACQUIRE);
        if (!r)
            continue;
        n += lb_sync_ring_pop(r, out + n, max - n);
        *drops += __atomic_load_n(&r->drops, __ATOMIC_RELAXED);
    }
    return n;
}

uint32_t lb_sync_drain_ends(struct lb_dataplane *dp, struct lb_flow_entry *out, uint32_t max,
                            uint64_t *drops)
{
    struct lb_sync_ring *r = lb_flow_end_ring(lb_dp_flows(dp));

    *drops = 0;
    if (!r)
        return 0;
    *drops = __atomic_load_n(&r->drops, __ATOMIC_RELAXED);
    return lb_sync_ring_pop(r, out, max);
}

static inline void put16(uint8_t *p, uint16_t v_be)
{
    memcpy(p, &v_be, 2);               /* ports are kept in network order */
}

static inline uint16_t get16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

size_t lb_sync_encode(const struct lb_flow_entry *e, uint32_t n, uint8_t type,
                      uint32_t now, uint8_t *out, size_t cap)
{
    size_t off = 0;

    for (uint32_t i = 0; i < n && off + LB_SYNC_REC_SIZE <= cap; i++, off += LB_SYNC_REC_SIZE) {
        uint8_t *r = out + off;
        int32_t age = (int32_t)(now - e[i].last_seen);
        uint32_t a = age < 0 ? 0u : (uint32_t)age;
        r[0] = type;
        r[1] = e[i].family;
        r[2] = e[i].proto;
        r[3] = e[i].state;
        r[4] = e[i].flags;
        r[5] = 0;
        put16(r + 6, e[i].cport);
        put16(r + 8, e[i].vport);
        put16(r + 10, e[i].bport);
        r[12] = (uint8_t)(a >> 24);
        r[13] = (uint8_t)(a >> 16);
        r[14] = (uint8_t)(a >> 8);
        r[15] = (uint8_t)a;
        memcpy(r + 16, e[i].client, 16);
        memcpy(r + 32, e[i].vip, 16);
        memcpy(r + 48, e[i].backend, 16);
    }
    return off;
}

int lb_sync_decode(const uint8_t *r, uint32_t now, struct lb_flow_entry *e, uint8_t *type)
{
    uint32_t age = (uint32_t)r[12] << 24 | (uint32_t)r[13] << 16 | (uint32_t)r[14] << 8 | r[15];

    memset(e, 0, sizeof(*e));
    *type = r[0];
    if (r[0] < LB_SYNC_NEW || r[0] > LB_SYNC_END || r[5] != 0 || age > INT32_MAX)
        return -EINVAL;
    e->family = r[1];
    e->proto = r[2];
    e->state = r[3];
    e->flags = r[4];
    e->cport = get16(r + 6);
    e->vport = get16(r + 8);
    e->bport = get16(r + 10);
    memcpy(e->client, r + 16, 16);
    memcpy(e->vip, r + 32, 16);
    memcpy(e->backend, r + 48, 16);
    e->last_seen = now - age;
    e->vip_stat = e->be_stat = LB_MAX_STAT_IDS;   /* uncounted until bound */
    return lb_flow_entry_valid(e) ? 0 : -EINVAL;
}

int lb_sync_bind(void *ctx, struct lb_flow_entry *e)
{
    const struct lb_table *t = ctx;
    struct lb_flow_key k;
    const struct lb_vip *v;

    if (!t)
        return -ENOENT;
    lb_flow_key_fwd(e, &k);
    v = lb_table_find_vip(t, &k);
    if (!v)
        return -ENOENT;
    for (uint32_t i = 0; i < v->n_backends; i++) {
        const struct lb_backend *b = &v->backends[i];
        if (b->port == e->bport && b->family == e->family &&
            memcmp(b->addr, e->backend, 16) == 0) {
            e->vip_stat = v->stat_id;
            e->be_stat = b->stat_id;
            return 0;
        }
    }
    return -ESRCH;
}

static int same_backend(const struct lb_flow_entry *a, const struct lb_flow_entry *b)
{
    return a->bport == b->bport && memcmp(a->backend, b->backend, 16) == 0;
}

int lb_sync_apply(struct lb_flowtable *ft, const struct lb_table *t, const uint8_t *body,
                  size_t len, uint32_t now, struct lb_sync_rx_stats *st)
{
    if (len % LB_SYNC_REC_SIZE)
        return -EINVAL;
    for (size_t off = 0; off < len; off += LB_SYNC_REC_SIZE) {
        struct lb_flow_entry e, cur;
        struct lb_flow_key k;
        uint8_t type;
        int rc;

        if (lb_sync_decode(body + off, now, &e, &type) < 0) {
            st->bad_record++;
            continue;
        }
        lb_flow_key_fwd(&e, &k);
        if (type == LB_SYNC_END) {
            /* touching first only moves last_seen to the sender's last packet */
            if (!lb_flow_touch(ft, &k, e.last_seen, &cur))
                st->not_found++;
            else if (!same_backend(&cur, &e))
                st->conflict++;
            else if (lb_flow_delete(ft, &k))
                st->ended++;
            else
                st->not_found++;
            continue;
        }
        rc = lb_sync_bind((void *)t, &e);
        if (rc == -ENOENT) {
            st->unknown_vip++;
            continue;
        }
        if (rc < 0) {
            st->unknown_backend++;
            continue;
        }
        cur = e;
        rc = lb_flow_insert_seen(ft, &cur, now, e.last_seen);
        if (rc == 0) {
            st->inserted++;
        } else if (rc == -EEXIST) {
            if (same_backend(&cur, &e) && lb_flow_touch(ft, &k, e.last_seen, NULL))
                st->refreshed++;
            else
                st->conflict++;
        } else {
            st->full++;
        }
    }
    return 0;
}
