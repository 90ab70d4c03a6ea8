/* lb_pipeline.c - the packet path, see lb_pipeline.h.
 *
 * lb_pipeline_run reads top to bottom as the path of a packet (katran's
 * process_packet), in three stages over the batch so that the flow lookups
 * of the whole batch overlap their memory accesses:
 *   1. pipe_classify: parse, VIP lookup (no VIP: a reply, or not ours);
 *   2. pipe_lookup: one batched flow lookup (lb_flow_lookup_batch);
 *   3. pipe_forward: on a miss Maglev pick and insert (to a VIP) or the
 *      stateless backend index of the table (a reply); NAT rewrite.
 */
#include <errno.h>
#include <string.h>

#include "lb_flow.h"
#include "lb_maglev.h"
#include "lb_nat.h"
#include "lb_parse.h"
#include "lb_pipeline.h"
#include "lb_proto.h"
#include "lb_sync.h"
#include "lb_table.h"

static inline void count_drop(struct lb_worker *w, enum lb_drop_reason r,
                              enum lb_drop_reason *reason)
{
    w->stats.drops[r]++;
    *reason = r;
}

static inline void count_flow(struct lb_worker *w, const struct lb_flow_entry *e,
                              uint32_t len, int new_flow)
{
    if (e->vip_stat < LB_MAX_STAT_IDS) {
        struct lb_counter *c = &w->stats.vip[e->vip_stat];
        c->packets++;
        c->bytes += len;
        c->new_flows += (uint64_t)new_flow;
    }
    if (e->be_stat < LB_MAX_STAT_IDS) {
        struct lb_counter *c = &w->stats.backend[e->be_stat];
        c->packets++;
        c->bytes += len;
        c->new_flows += (uint64_t)new_flow;
    }
}

/* The NAT translation of a flow: client:cport <-> vip, served by backend. */
static inline void set_flow(struct lb_flow_entry *e, const uint8_t *client, uint16_t cport,
                            const struct lb_vip *vip, const struct lb_backend *be,
                            const struct lb_flow_key *k)
{
    memcpy(e->client, client, 16);
    memcpy(e->vip, vip->addr, 16);
    memcpy(e->backend, be->addr, 16);
    e->cport = cport;
    e->vport = vip->port;
    e->bport = be->port;
    e->proto = k->proto;
    e->family = k->family;
    e->vip_stat = vip->stat_id;
    e->be_stat = be->stat_id;
}

/* A new flow to vip: pick its backend, track it. LB_DROP_NONE or a drop
 * reason; *is_new is 0 when a racing packet of the same flow (another worker,
 * or earlier in this batch) inserted it first: *e is then that entry. */
static inline enum lb_drop_reason new_flow(struct lb_worker *w, const struct lb_table *t,
                                           const struct lb_vip *vip, const struct lb_pkt *p,
                                           uint32_t now, struct lb_flow_entry *e, int *is_new)
{
    uint16_t idx = lb_maglev_pick(vip, &p->key, t->sel_seed);
    const struct lb_backend *be;
    int rc;

    if (idx == LB_RING_EMPTY || idx >= vip->n_backends)
        return LB_DROP_NO_BACKEND;
    be = &vip->backends[idx];
    set_flow(e, p->key.src, p->key.sport, vip, be, &p->key);
    /* a TCP non-SYN miss (restart, ECMP move) is picked up as half-open: it
     * becomes established once the backend answers and the client ACKs */
    e->state = p->key.proto == LB_IPPROTO_TCP ? LB_FS_SYN : LB_FS_UDP;
    e->flags = 0;
    e->pad1 = 0;
    e->last_seen = now;
    rc = lb_flow_insert(w->dp->ft, e, now);
    *is_new = rc != -EEXIST;
    if (rc == -ENOSPC) {
        /* counted, but still forwarded: the Maglev answer is stable, so the
         * flow keeps its backend even untracked */
        w->stats.drops[LB_DROP_FLOW_FULL]++;
    } else if (rc == 0) {
        struct lb_sync_ring *ring = __atomic_load_n(&w->sync, __ATOMIC_RELAXED);
        w->stats.flow_new++;
        if (ring)      /* peers learn the flow: a copy into this worker's ring */
            lb_sync_ring_push(ring, e);
    }
    return LB_DROP_NONE;
}

/* Per-packet state between the stages of a batch. */
struct pipe_pkt {
    struct lb_pkt p;
    const struct lb_vip *vip;     /* NULL: a reply (or not ours) */
};

/* Stage 1, one packet: parse, check a partial checksum's offset (csum_start
 * 0: none), find its VIP. LB_DROP_NONE or the reason to drop it. */
static inline enum lb_drop_reason pipe_classify(const struct lb_table *t, uint8_t *data,
                                                uint32_t len, uint16_t csum_start,
                                                struct pipe_pkt *pp)
{
    struct lb_pkt *p = &pp->p;
    enum lb_drop_reason r = lb_parse(data, len, p);

    if (r == LB_DROP_NONE && csum_start) {
        if (csum_start != p->l4_off || (p->flags & F_PKT_ICMP_ERR))
            r = LB_DROP_BAD_VNET;
        else
            p->flags |= F_PKT_CSUM_PARTIAL;
    }
    if (r == LB_DROP_NONE && !t)
        r = LB_DROP_NO_VIP;
    if (r == LB_DROP_NONE)
        pp->vip = lb_table_find_vip(t, &p->key);
    return r;
}

/* Stage 2: the flow lookups of the m packets st[idx[0..m)] in one batched
 * call, a packet to a VIP by its forward key, any other by its reverse key;
 * ent[j] and hit[j] answer for st[idx[j]]. */
static inline void pipe_lookup(struct lb_worker *w, const struct pipe_pkt *st,
                               const uint32_t *idx, uint32_t m, uint32_t now,
                               struct lb_flow_entry *ent, uint8_t *hit)
{
    const struct lb_flow_key *keys[LB_BATCH];
    uint8_t dirs[LB_BATCH], flags[LB_BATCH];

    for (uint32_t j = 0; j < m; j++) {
        const struct pipe_pkt *pp = &st[idx[j]];
        keys[j] = &pp->p.key;
        dirs[j] = pp->vip ? LB_DIR_FWD : LB_DIR_REV;
        flags[j] = pp->p.tcp_flags;
    }
    lb_flow_lookup_batch(w->dp->ft, keys, dirs, flags, m, now, ent, hit);
}

/* Stage 3, one packet whose flow lookup is done (hit: *e is its flow): on a
 * miss a new flow (to a VIP) or the stateless reply path, then the NAT
 * rewrite and the counters. */
static inline enum lb_verdict pipe_forward(struct lb_worker *w, const struct lb_table *t,
                                           struct pipe_pkt *st, int hit,
                                           struct lb_flow_entry *e, uint32_t now,
                                           enum lb_drop_reason *reason)
{
    struct lb_pkt *p = &st->p;
    enum lb_drop_reason r;
    int is_new = 0;
    enum lb_dir dir = st->vip ? LB_DIR_FWD : LB_DIR_REV;

    if (hit) {
        w->stats.flow_hit++;
    } else {
        w->stats.flow_miss++;
        if (p->flags & F_PKT_ICMP_ERR) {
            count_drop(w, LB_DROP_ICMP_NO_FLOW, reason);
            return LB_DROP;
        }
        if (st->vip) {
            /* client -> VIP, no flow yet */
            r = new_flow(w, t, st->vip, p, now, e, &is_new);
            if (r != LB_DROP_NONE) {
                count_drop(w, r, reason);
                return LB_DROP;
            }
        } else {
            /* backend -> client without a flow: the stateless reply path, when
             * the backend serves exactly one VIP on this port */
            const struct lb_vip *v2 = NULL;
            const struct lb_backend *be = lb_table_find_backend(t, &p->key, &v2);
            if (!be) {
                count_drop(w, LB_DROP_NO_VIP, reason);
                return LB_DROP;
            }
            set_flow(e, p->key.dst, p->key.dport, v2, be, &p->key);
        }
    }
    lb_nat_rewrite(p, e, dir);
    count_flow(w, e, p->len, is_new);
    w->stats.tx++;
    w->stats.tx_bytes += p->len;
    *reason = LB_DROP_NONE;
    return LB_TX;
}

uint32_t lb_pipeline_run(struct lb_worker *w, const struct lb_table *t, uint8_t *const *data,
                         const uint32_t *lens, const uint16_t *csum_partial,
                         uint8_t *verdicts, uint8_t *reasons, uint32_t n, uint32_t now)
{
    struct pipe_pkt st[LB_BATCH];
    struct lb_flow_entry ent[LB_BATCH];
    uint8_t hit[LB_BATCH];
    uint32_t idx[LB_BATCH];
    uint32_t m = 0, sent = 0;

    for (uint32_t i = 0; i < n; i++) {
        enum lb_drop_reason r;

        w->stats.rx++;
        w->stats.rx_bytes += lens[i];
        verdicts[i] = LB_DROP;
        r = pipe_classify(t, data[i], lens[i], csum_partial ? csum_partial[i] : 0, &st[i]);
        if (r != LB_DROP_NONE) {
            w->stats.drops[r]++;
            reasons[i] = (uint8_t)r;
            continue;
        }
        idx[m++] = i;
    }
    if (m)
        pipe_lookup(w, st, idx, m, now, ent, hit);
    for (uint32_t j = 0; j < m; j++) {
        enum lb_drop_reason r;
        uint32_t i = idx[j];
        enum lb_verdict v = pipe_forward(w, t, &st[i], hit[j], &ent[j], now, &r);
        verdicts[i] = (uint8_t)v;
        reasons[i] = (uint8_t)r;
        sent += v == LB_TX;
    }
    return sent;
}

enum lb_verdict lb_process_packet(struct lb_worker *w, const struct lb_table *t,
                                  uint8_t *data, uint32_t len, uint32_t now,
                                  int csum_partial, enum lb_drop_reason *reason)
{
    uint16_t cp = (uint16_t)(csum_partial > 0 && csum_partial < 65536 ? csum_partial : 0);
    uint8_t v, r;

    if (csum_partial && !cp) {
        w->stats.rx++;
        count_drop(w, LB_DROP_BAD_VNET, reason);
        return LB_DROP;
    }
    lb_pipeline_run(w, t, &data, &len, &cp, &v, &r, 1, now);
    *reason = (enum lb_drop_reason)r;
    return (enum lb_verdict)v;
}

uint32_t lb_process_batch(struct lb_worker *w, uint8_t *bufs, uint32_t stride,
                          const uint32_t *lens, uint8_t *verdicts,
                          uint8_t *reasons, uint32_t n, uint32_t now)
{
    const struct lb_table *t = lb_dp_enter(w);
    uint8_t *data[LB_BATCH];
    uint32_t len[LB_BATCH];
    uint32_t sent = 0;

    for (uint32_t off = 0; off < n; off += LB_BATCH) {
        uint32_t k = n - off < LB_BATCH ? n - off : LB_BATCH;
        for (uint32_t i = 0; i < k; i++) {
            data[i] = bufs + (size_t)(off + i) * stride;
            len[i] = lens[off + i] < stride ? lens[off + i] : stride;
        }
        sent += lb_pipeline_run(w, t, data, len, NULL, verdicts + off, reasons + off, k, now);
    }
    w->stats.batches++;
    lb_dp_leave(w);
    return sent;
}
