/* lb_loop.c - the per-packet pipeline and the TUN worker loop.
 *
 * lb_process_packet reads top to bottom as the packet path (katran's
 * process_packet): parse -> VIP? -> flow lookup -> on a miss Maglev pick and
 * insert -> NAT rewrite. A packet to no VIP is a reply: flow lookup by its
 * reverse key, then the stateless backend index of the table.
 *
 * Table publication (RCU-like, as ip_vs_mh's call_rcu): the control side
 * swaps dp->table and bumps dp->epoch; each worker stores the epoch it saw in
 * w->qs before it loads the table pointer, and stores LB_QS_OFFLINE while it
 * sleeps in poll(). Once every worker's qs has reached the new epoch or is
 * offline, no worker can still hold the old table, and it is freed.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/virtio_net.h>

#include "lb_flow.h"
#include "lb_loop.h"
#include "lb_maglev.h"
#include "lb_nat.h"
#include "lb_parse.h"
#include "lb_proto.h"
#include "lb_table.h"

uint32_t lb_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

struct lb_dataplane *lb_dp_new(uint32_t n_workers, uint32_t flow_capacity,
                               uint64_t flow_seed, const struct lb_timeouts *tmo)
{
    struct lb_dataplane *dp;

    if (n_workers == 0 || n_workers > 256)
        return NULL;
    dp = calloc(1, sizeof(*dp));
    if (!dp)
        return NULL;
    dp->n_workers = n_workers;
    /* one more worker than asked: the last one serves lb_process_batch
     * calls from the control side (tests, `lbcore pick`, benchmarks) */
    dp->workers = calloc(n_workers + 1, sizeof(struct lb_worker));
    dp->ft = lb_flow_new(flow_capacity, flow_seed, tmo);
    if (!dp->workers || !dp->ft)
        goto fail;
    for (uint32_t i = 0; i <= n_workers; i++) {
        struct lb_worker *w = &dp->workers[i];
        w->dp = dp;
        w->id = i;
        w->fd = -1;
        w->qs = LB_QS_OFFLINE;
        w->stats.vip = calloc(LB_MAX_STAT_IDS, sizeof(struct lb_counter));
        w->stats.backend = calloc(LB_MAX_STAT_IDS, sizeof(struct lb_counter));
        if (!w->stats.vip || !w->stats.backend)
            goto fail;
    }
    return dp;
fail:
    lb_dp_free(dp);
    return NULL;
}

void lb_dp_free(struct lb_dataplane *dp)
{
    if (!dp)
        return;
    if (dp->workers) {
        for (uint32_t i = 0; i <= dp->n_workers; i++) {
            free(dp->workers[i].stats.vip);
            free(dp->workers[i].stats.backend);
        }
        free(dp->workers);
    }
    if (dp->ft)
        lb_flow_free(dp->ft);
    lb_table_free(dp->table);
    free(dp);
}

struct lb_table *lb_dp_publish(struct lb_dataplane *dp, struct lb_table *t)
{
    struct lb_table *old = __atomic_exchange_n(&dp->table, t, __ATOMIC_SEQ_CST);

    __atomic_add_fetch(&dp->epoch, 1, __ATOMIC_SEQ_CST);
    return old;
}

int lb_dp_synchronize(struct lb_dataplane *dp, uint32_t timeout_ms)
{
    uint64_t target = __atomic_load_n(&dp->epoch, __ATOMIC_SEQ_CST);
    struct timespec nap = { 0, 500 * 1000 };     /* 0.5 ms */
    uint32_t waited_us = 0;

    for (;;) {
        int pending = 0;
        for (uint32_t i = 0; i <= dp->n_workers; i++) {
            uint64_t qs = __atomic_load_n(&dp->workers[i].qs, __ATOMIC_SEQ_CST);
            if (qs != LB_QS_OFFLINE && qs < target)
                pending = 1;
        }
        if (!pending)
            return 0;
        if (waited_us / 1000 >= timeout_ms)
            return -ETIMEDOUT;
        nanosleep(&nap, NULL);
        waited_us += 500;
    }
}

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
        w->stats.flow_new++;
    }
    return LB_DROP_NONE;
}

/* Per-packet state between the stages of a batch. */
struct stage {
    struct lb_pkt p;
    const struct lb_vip *vip;     /* NULL: a reply (or not ours) */
};

/* Stage 3 for one packet whose flow lookup is done (hit: *e is its flow). */
static inline enum lb_verdict finish(struct lb_worker *w, const struct lb_table *t,
                                     struct stage *st, int hit, struct lb_flow_entry *e,
                                     uint32_t now, enum lb_drop_reason *reason)
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

/* The pipeline over n <= LB_BATCH packets, in stages so that the flow
 * lookups of the whole batch overlap their memory accesses
 * (lb_flow_lookup_batch): 1. parse + VIP lookup, 2. one batched flow
 * lookup, 3. pick/insert on a miss, NAT. csum_partial[i] as in
 * lb_process_packet (NULL = none). Returns the number of LB_TX. */
static uint32_t process_vec(struct lb_worker *w, const struct lb_table *t, uint8_t *const *data,
                            const uint32_t *lens, const uint16_t *csum_partial,
                            uint8_t *verdicts, uint8_t *reasons, uint32_t n, uint32_t now)
{
    struct stage st[LB_BATCH];
    const struct lb_flow_key *keys[LB_BATCH];
    struct lb_flow_entry ent[LB_BATCH];
    uint8_t dirs[LB_BATCH], flags[LB_BATCH], hit[LB_BATCH];
    uint32_t idx[LB_BATCH];
    uint32_t m = 0, sent = 0;

    for (uint32_t i = 0; i < n; i++) {
        struct lb_pkt *p = &st[i].p;
        enum lb_drop_reason r;

        w->stats.rx++;
        w->stats.rx_bytes += lens[i];
        verdicts[i] = LB_DROP;
        r = lb_parse(data[i], lens[i], p);
        if (r == LB_DROP_NONE && csum_partial && csum_partial[i]) {
            if (csum_partial[i] != p->l4_off || (p->flags & F_PKT_ICMP_ERR))
                r = LB_DROP_BAD_VNET;
            else
                p->flags |= F_PKT_CSUM_PARTIAL;
        }
        if (r == LB_DROP_NONE && !t)
            r = LB_DROP_NO_VIP;
        if (r != LB_DROP_NONE) {
            w->stats.drops[r]++;
            reasons[i] = (uint8_t)r;
            continue;
        }
        st[i].vip = lb_table_find_vip(t, &p->key);
        keys[m] = &p->key;
        dirs[m] = st[i].vip ? LB_DIR_FWD : LB_DIR_REV;
        flags[m] = p->tcp_flags;
        idx[m++] = i;
    }
    if (m)
        lb_flow_lookup_batch(w->dp->ft, keys, dirs, flags, m, now, ent, hit);
    for (uint32_t j = 0; j < m; j++) {
        enum lb_drop_reason r;
        uint32_t i = idx[j];
        enum lb_verdict v = finish(w, t, &st[i], hit[j], &ent[j], now, &r);
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
    process_vec(w, t, &data, &len, &cp, &v, &r, 1, now);
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
        sent += process_vec(w, t, data, len, NULL, verdicts + off, reasons + off, k, now);
    }
    w->stats.batches++;
    lb_dp_leave(w);
    return sent;
}

/* The virtio_net_hdr in front of a packet read from the TUN: the checksum
 * state (NEEDS_CSUM -> csum_start, which must be the L4 offset), or a drop.
 * The header is written back unchanged: NAT keeps every length and offset,
 * so GSO fields (gso_type/size, hdr_len) and csum_start/offset stay valid
 * for the rewritten super-packet. 0 = ok; -1 = malformed. */
static inline int vnet_csum(const uint8_t *buf, size_t n, size_t hdr, uint16_t *csum_start)
{
    struct virtio_net_hdr vh;

    *csum_start = 0;
    if (!hdr)
        return 0;
    if (n < hdr)
        return -1;
    memcpy(&vh, buf, sizeof(vh));
    if (vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (vh.csum_start == 0 || (size_t)vh.csum_start + vh.csum_offset + 2 > n - hdr)
            return -1;
        *csum_start = vh.csum_start;
    }
    return 0;
}

static inline void tun_write(struct lb_worker *w, const uint8_t *buf, size_t n)
{
    for (;;) {
        if (write(w->fd, buf, n) >= 0)
            return;
        if (errno != EINTR) {
            w->stats.tx_errors++;
            return;
        }
    }
}

#define TUN_BATCH 32u   /* packets read before they are processed together */

int lb_loop_run_tun(struct lb_worker *w)
{
    struct lb_dataplane *dp = w->dp;
    struct pollfd pfd = { .fd = w->fd, .events = POLLIN, .revents = 0 };
    size_t hdr = w->vnet_hdr ? sizeof(struct virtio_net_hdr) : 0;
    uint8_t *bufs, *data[TUN_BATCH];
    uint32_t len[TUN_BATCH];
    size_t raw[TUN_BATCH];
    uint16_t csum[TUN_BATCH];
    uint8_t verdicts[TUN_BATCH], reasons[TUN_BATCH];
    int rc = 0, busy = 0;

    if (w->fd < 0)
        return -EBADF;
    /* TUN_BATCH packet buffers (GSO super-packets up to 64 KiB), allocated
     * once per worker run, never per packet */
    bufs = malloc((size_t)TUN_BATCH * LB_PKT_MAX);
    if (!bufs)
        return -ENOMEM;
    while (!__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
        const struct lb_table *t;
        uint32_t now, got = 0, n = 0;

        w->stats.loops++;
        if (!busy) {
            /* holding no table while asleep: a publish need not wait for us */
            __atomic_store_n(&w->qs, LB_QS_OFFLINE, __ATOMIC_SEQ_CST);
            int pr = poll(&pfd, 1, 100);
            if (pr < 0) {
                if (errno == EINTR)
                    continue;
                rc = -errno;
                break;
            }
            if (pr == 0)
                continue;
            if (pfd.revents & (POLLERR | POLLHUP | POLLNVAL)) {
                rc = -EIO;
                break;
            }
        }
        t = lb_dp_enter(w);
        now = lb_now_ms();
        /* 1. read a batch (a TUN fd gives one packet per read) */
        for (got = 0; got < TUN_BATCH; got++) {
            uint8_t *b = bufs + (size_t)n * LB_PKT_MAX;
            ssize_t r = read(w->fd, b, LB_PKT_MAX);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                rc = -errno;
                goto out;
            }
            if (vnet_csum(b, (size_t)r, hdr, &csum[n]) < 0) {
                w->stats.rx++;
                w->stats.drops[LB_DROP_BAD_VNET]++;
                continue;
            }
            raw[n] = (size_t)r;
            data[n] = b + hdr;
            len[n] = (uint32_t)((size_t)r - hdr);
            n++;
        }
        /* 2. the pipeline over the batch, 3. write back what it sends */
        if (n) {
            process_vec(w, t, data, len, csum, verdicts, reasons, n, now);
            for (uint32_t i = 0; i < n; i++)
                if (verdicts[i] == LB_TX)
                    tun_write(w, bufs + (size_t)i * LB_PKT_MAX, raw[i]);
            w->stats.batches++;
        }
        /* a full batch means more is likely queued: go on without poll() */
        busy = got == TUN_BATCH;
    }
out:
    lb_dp_leave(w);
    free(bufs);
    return rc;
}
