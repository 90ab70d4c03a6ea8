/* lb_pipeline.c - the packet path, see lb_pipeline.h.
 *
 * lb_pipeline_run reads top to bottom as the path of a packet (katran's
 * process_packet), in three stages over the batch so that the flow lookups
 * of the whole batch overlap their memory accesses:
 *   1. pipe_classify: parse, VIP lookup (no VIP: a reply, or not ours);
 *   2. pipe_lookup: one batched flow lookup (lb_flow_lookup_batch);
 *   3. pipe_forward: on a miss admission (lb_limit.h: overload guard,
 *      max_flows, client rate), Maglev pick (or the client's persistent
 *      backend) and insert (to a VIP) or the stateless backend index of the
 *      table (a reply); NAT rewrite; a first fragment's decision goes to the
 *      fragment cache;
 *   4. pipe_later: later fragments, after every first fragment of the batch
 *      has been decided (so in-order fragments never wait): the cached
 *      decision, or held until it comes (lb_frag.h).
 * A packet from a backend's address that is no reply of any flow is passed
 * (LB_PASS, see passable()): the caller hands it back to the kernel as it is.
 * Stage 1 also answers what needs no flow: echo requests to a VIP address,
 * and the closed ports of a VIP address (lb_icmp.h).
 */
#include <errno.h>
#include <string.h>

#include "lb_flow.h"
#include "lb_frag.h"
#include "lb_icmp.h"
#include "lb_limit.h"
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

/* Refuse a new flow (or a packet to a closed port) for reason r with
 * action: drop, or reject (an RST in place: LB_REPLY; an ICMP unreachable of
 * kind k on the out list) within the reject rate. The refusal is counted
 * under r either way. */
static enum lb_verdict refuse(struct lb_worker *w, struct lb_pkt *p, enum lb_drop_reason r,
                              uint8_t action, enum lb_unreach k, uint32_t now)
{
    w->stats.drops[r]++;
    if (action != LB_ACTION_REJECT || !lb_icmp_answerable(p)
        || ((p->flags & F_PKT_FRAGMENT) && p->frag_off))
        return LB_DROP;
    if (p->key.proto == LB_IPPROTO_TCP && (p->tcp_flags & LB_TCP_RST))
        return LB_DROP;
    if (!lb_reject_allow(w, now)) {
        w->stats.rejects_limited++;
        return LB_DROP;
    }
    if (p->key.proto == LB_IPPROTO_TCP) {
        uint32_t old = p->len;
        if (!lb_icmp_rst(p))
            return LB_DROP;
        /* the rest of the buffer: zeroes, for a caller that sends it all */
        memset(p->data + p->len, 0, old - p->len);
        w->stats.resets++;
        w->stats.tx++;
        w->stats.tx_bytes += p->len;
        return LB_REPLY;
    }
    if (lb_icmp_unreach(w, p, k) == 0)
        w->stats.unreachables++;
    return LB_DROP;
}

/* The backend a new flow of a persistence "source" VIP gets: the Maglev slot
 * of the client address alone (same seed on every gateway, so the same
 * answer everywhere). */
static inline uint16_t pick_source(const struct lb_vip *vip, const struct lb_flow_key *k,
                                   uint64_t seed)
{
    struct lb_flow_key sk;

    memset(&sk, 0, sizeof(sk));
    memcpy(sk.src, k->src, 16);
    sk.family = k->family;
    return vip->ring[lb_maglev_slot(lb_hash_flow(&sk, seed), vip->ring_size)];
}

/* Admission of a new flow to vip (lb_limit.h): LB_DROP_NONE, or the reason
 * to refuse it; *pinned the client's persistent backend (LB_RING_EMPTY:
 * none). A TCP segment without SYN is no new connection but one whose flow
 * was lost (restart, ECMP move): only the overload guard applies to it. */
static inline enum lb_drop_reason admit(struct lb_worker *w, const struct lb_vip *vip,
                                        const struct lb_pkt *p, uint32_t now, uint16_t *pinned)
{
    struct lb_dataplane *dp = w->dp;
    int opens = p->key.proto != LB_IPPROTO_TCP || (p->tcp_flags & LB_TCP_SYN);
    struct lb_counter *c = vip->stat_id < LB_MAX_STAT_IDS ? &w->stats.vip[vip->stat_id] : NULL;

    *pinned = LB_RING_EMPTY;
    if (!lb_limit_vip_admit(dp->lim, vip, now)) {
        if (c)
            c->shed++;
        return LB_DROP_NEW_FLOW_RATE;
    }
    if (opens && vip->max_flows && lb_flow_active_vip(dp->ft, vip->stat_id) >= vip->max_flows) {
        if (c)
            c->limit_flows++;
        return LB_DROP_LIMIT_FLOWS;
    }
    if (!opens) {
        if (vip->persistence == LB_PERSIST_SOURCE)
            (void)lb_limit_client(dp->lim, vip, p->key.src, now, pinned);
        return LB_DROP_NONE;
    }
    if (lb_limit_client(dp->lim, vip, p->key.src, now, pinned) < 0) {
        if (c)
            c->limit_rate++;
        return LB_DROP_LIMIT_RATE;
    }
    return LB_DROP_NONE;
}

/* A new flow to vip: pick its backend, track it. LB_DROP_NONE or a drop
 * reason; *is_new is 0 when a racing packet of the same flow (another worker,
 * or earlier in this batch) inserted it first: *e is then that entry. */
static inline enum lb_drop_reason new_flow(struct lb_worker *w, const struct lb_table *t,
                                           const struct lb_vip *vip, const struct lb_pkt *p,
                                           uint32_t now, uint16_t pinned,
                                           struct lb_flow_entry *e, int *is_new)
{
    uint16_t idx;
    const struct lb_backend *be;
    int rc;

    if (pinned != LB_RING_EMPTY)
        idx = pinned;
    else if (vip->persistence == LB_PERSIST_SOURCE)
        idx = pick_source(vip, &p->key, t->sel_seed);
    else
        idx = lb_maglev_pick(vip, &p->key, t->sel_seed);
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
    if (vip->persistence == LB_PERSIST_SOURCE && pinned == LB_RING_EMPTY && *is_new)
        lb_limit_persist(w->dp->lim, vip, p->key.src, be, now);
    return LB_DROP_NONE;
}

/* Whether p, no reply of any flow, is handed back to the kernel unchanged
 * (LB_PASS) rather than dropped: it is from a backend's address, of a
 * protocol of the VIPs that backend serves (the reply path's port-less rules
 * bring all of a backend's TCP/UDP of those protocols to the data plane, for
 * the fragments of its replies, so its own traffic through the gateway comes
 * too; what the rules leave to the kernel - the other protocol - is the
 * kernel's even when a coarse rawsock filter lets a copy through), and not to
 * a VIP's address. The last condition is what keeps a passed packet from
 * looping: in mode tun the kernel routes what is written to the TUN by the
 * main table (rule `iif TUN lookup main`, before the reply rules), where only
 * the VIPs' routes lead into the TUN, so a passed packet leaves by another
 * way; mode rawsock routes it itself by the routes of its links, which a
 * packet not to a VIP does not bring back into the balancer's path. Every
 * pass costs the packet one TTL / hop limit. */
static inline int passable(const struct lb_table *t, const struct lb_pkt *p)
{
    return lb_table_backend_proto(t, p->family, p->key.src, p->key.proto)
        && !lb_table_vip_addr(t, p->family, p->key.dst);
}

/* Per-packet state between the stages of a batch. */
struct pipe_pkt {
    struct lb_pkt p;
    const struct lb_vip *vip;     /* NULL: a reply (or not ours) */
};

/* What stage 1 leaves for the later stages. */
enum pipe_next {
    NEXT_FLOW = 0,                /* flow lookup and forward (stages 2, 3) */
    NEXT_LATER = 1,               /* a later fragment (stage 4) */
    NEXT_DONE = 2,                /* answered or dropped in stage 1 */
};

/* Stage 1, one packet: parse, check a partial checksum's offset (csum_start
 * 0: none), find its VIP. LB_DROP_NONE or the reason to drop it. */
static inline enum lb_drop_reason pipe_classify(const struct lb_table *t, uint8_t *data,
                                                uint32_t len, uint16_t csum_start,
                                                struct pipe_pkt *pp)
{
    struct lb_pkt *p = &pp->p;
    enum lb_drop_reason r = lb_parse(data, len, p);

    pp->vip = NULL;
    if (r == LB_DROP_NONE && csum_start) {
        if (csum_start != p->l4_off || (p->flags & (F_PKT_ICMP_ERR | F_PKT_ECHO | F_PKT_FRAGMENT)))
            r = LB_DROP_BAD_VNET;
        else
            p->flags |= F_PKT_CSUM_PARTIAL;
    }
    if (r == LB_DROP_NONE && !t)
        r = LB_DROP_NO_VIP;
    if (r == LB_DROP_NONE && !(p->flags & F_PKT_ECHO)
        && !((p->flags & F_PKT_FRAGMENT) && p->frag_off))
        pp->vip = lb_table_find_vip(t, &p->key);
    return r;
}

/* Stage 1, a packet that needs no flow: an echo request, or TCP/UDP to a
 * VIP address on a port no VIP serves (the closed_port of the address's
 * first VIP). NEXT_DONE with *v set, or NEXT_FLOW (anything else). */
static inline enum pipe_next pipe_local(struct lb_worker *w, const struct lb_table *t,
                                        struct pipe_pkt *pp, uint32_t now, enum lb_verdict *v,
                                        enum lb_drop_reason *reason)
{
    struct lb_pkt *p = &pp->p;
    const struct lb_vip *av;

    if ((p->flags & F_PKT_FRAGMENT) && p->frag_off)
        return NEXT_LATER;
    if (pp->vip || (p->flags & F_PKT_ICMP_ERR))
        return NEXT_FLOW;
    av = lb_table_vip_addr(t, p->family, p->key.dst);
    if (p->flags & F_PKT_ECHO) {
        *reason = LB_DROP_UNSUPPORTED;
        *v = LB_DROP;
        if (av && lb_icmp_echo_reply(p)) {
            w->stats.echo_replies++;
            w->stats.tx++;
            w->stats.tx_bytes += p->len;
            *reason = LB_DROP_NONE;
            *v = LB_REPLY;
        } else {
            w->stats.drops[LB_DROP_UNSUPPORTED]++;
        }
        return NEXT_DONE;
    }
    if (!av)
        return NEXT_FLOW;            /* a reply, or not ours: stage 3 decides */
    *reason = LB_DROP_CLOSED_PORT;
    *v = refuse(w, p, LB_DROP_CLOSED_PORT, av->closed_port == LB_CLOSED_REJECT
                ? LB_ACTION_REJECT : LB_ACTION_DROP, LB_UNREACH_PORT, now);
    return NEXT_DONE;
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
    uint16_t pinned;
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
            r = admit(w, st->vip, p, now, &pinned);
            if (r != LB_DROP_NONE) {
                *reason = r;
                if (r == LB_DROP_NEW_FLOW_RATE) {    /* a flood: never answered */
                    w->stats.drops[r]++;
                    return LB_DROP;
                }
                return refuse(w, p, r, st->vip->limit_action, LB_UNREACH_ADMIN, now);
            }
            r = new_flow(w, t, st->vip, p, now, pinned, e, &is_new);
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
                if (passable(t, p)) {
                    w->stats.passed++;
                    *reason = LB_DROP_NONE;
                    return LB_PASS;
                }
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

/* Stage 4, a later fragment: the decision its first fragment got, or held
 * (when it is to a VIP address or from a backend's) until that comes. */
static inline enum lb_verdict pipe_later(struct lb_worker *w, const struct lb_table *t,
                                         struct pipe_pkt *st, uint32_t now,
                                         enum lb_drop_reason *reason)
{
    struct lb_pkt *p = &st->p;
    struct lb_flow_entry e;
    enum lb_dir dir;
    int ours = lb_table_vip_addr(t, p->family, p->key.dst) != NULL
        || lb_table_backend_addr(t, p->family, p->key.src);
    enum lb_verdict v = lb_frag_later(w, p, ours, now, &e, &dir, reason);

    if (v == LB_TX) {
        count_flow(w, &e, p->len, 0);
        w->stats.tx++;
        w->stats.tx_bytes += p->len;
    } else if (v == LB_PASS) {
        w->stats.passed++;
    } else if (v == LB_DROP) {
        w->stats.drops[*reason]++;
    }
    return v;
}

/* The extras w->out.pkt[from..) came with packet i of the batch: a loop that
 * sends each answer back the way its packet came (rawsock: link and MAC)
 * finds the packet by this index. */
static inline void out_src(struct lb_worker *w, uint32_t from, uint32_t i)
{
    for (uint32_t k = from; k < w->out.n; k++)
        w->out.pkt[k].src = (uint8_t)i;
}

uint32_t lb_pipeline_run(struct lb_worker *w, const struct lb_table *t, uint8_t *const *data,
                         uint32_t *lens, const uint16_t *csum_partial,
                         uint8_t *verdicts, uint8_t *reasons, uint32_t n, uint32_t now)
{
    struct pipe_pkt st[LB_BATCH];
    struct lb_flow_entry ent[LB_BATCH];
    uint8_t hit[LB_BATCH];
    uint32_t idx[LB_BATCH], later[LB_BATCH];
    uint32_t m = 0, nl = 0, sent = 0;

    for (uint32_t i = 0; i < n; i++) {
        enum lb_drop_reason r;
        enum lb_verdict v = LB_DROP;
        uint32_t o0 = w->out.n;

        w->stats.rx++;
        w->stats.rx_bytes += lens[i];
        verdicts[i] = LB_DROP;
        r = pipe_classify(t, data[i], lens[i], csum_partial ? csum_partial[i] : 0, &st[i]);
        if (r != LB_DROP_NONE) {
            w->stats.drops[r]++;
            reasons[i] = (uint8_t)r;
            continue;
        }
        switch (pipe_local(w, t, &st[i], now, &v, &r)) {
        case NEXT_FLOW:
            idx[m++] = i;
            break;
        case NEXT_LATER:
            later[nl++] = i;
            break;
        case NEXT_DONE:
            verdicts[i] = (uint8_t)v;
            reasons[i] = (uint8_t)r;
            if (v == LB_REPLY) {
                lens[i] = st[i].p.len;
                sent++;
            } else if (st[i].p.flags & F_PKT_FRAGMENT) {
                lb_frag_decide(w, &st[i].p, NULL, LB_DIR_FWD, r, now);
            }
            break;
        }
        out_src(w, o0, i);
    }
    if (m)
        pipe_lookup(w, st, idx, m, now, ent, hit);
    for (uint32_t j = 0; j < m; j++) {
        enum lb_drop_reason r;
        uint32_t i = idx[j], o0 = w->out.n;
        enum lb_verdict v = pipe_forward(w, t, &st[i], hit[j], &ent[j], now, &r);
        verdicts[i] = (uint8_t)v;
        reasons[i] = (uint8_t)r;
        if (v == LB_REPLY)
            lens[i] = st[i].p.len;
        /* a passed first fragment: decided "pass" (no flow, no drop reason) */
        if (st[i].p.flags & F_PKT_FRAGMENT)
            lb_frag_decide(w, &st[i].p, v == LB_TX ? &ent[j] : NULL,
                           st[i].vip ? LB_DIR_FWD : LB_DIR_REV,
                           v == LB_TX || v == LB_PASS ? LB_DROP_NONE
                           : (r != LB_DROP_NONE ? r : LB_DROP_FRAGMENT), now);
        sent += v == LB_TX || v == LB_REPLY;
        out_src(w, o0, i);
    }
    for (uint32_t j = 0; j < nl; j++) {
        enum lb_drop_reason r;
        uint32_t i = later[j], o0 = w->out.n;
        enum lb_verdict v = pipe_later(w, t, &st[i], now, &r);
        verdicts[i] = (uint8_t)v;
        reasons[i] = (uint8_t)r;
        sent += v == LB_TX;
        out_src(w, o0, i);
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
                          uint32_t *lens, uint8_t *verdicts,
                          uint8_t *reasons, uint32_t n, uint32_t now)
{
    const struct lb_table *t;
    uint8_t *data[LB_BATCH];
    uint32_t len[LB_BATCH];
    uint32_t sent = 0;

    lb_out_done(w);                  /* the previous call's extras are gone */
    t = lb_dp_enter(w);
    for (uint32_t off = 0; off < n; off += LB_BATCH) {
        uint32_t k = n - off < LB_BATCH ? n - off : LB_BATCH;
        for (uint32_t i = 0; i < k; i++) {
            data[i] = bufs + (size_t)(off + i) * stride;
            len[i] = lens[off + i] < stride ? lens[off + i] : stride;
        }
        sent += lb_pipeline_run(w, t, data, len, NULL, verdicts + off, reasons + off, k, now);
        for (uint32_t i = 0; i < k; i++)
            lens[off + i] = len[i] < lens[off + i] ? len[i] : lens[off + i];
    }
    w->stats.batches++;
    lb_dp_leave(w);
    return sent;
}
