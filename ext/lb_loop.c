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
#include "lb_table.h"

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define IPPROTO_TCP_ 6

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

/* A new flow to vip: pick its backend, track it. 0, or a drop reason. */
static inline enum lb_drop_reason new_flow(struct lb_worker *w, const struct lb_table *t,
                                           const struct lb_vip *vip, const struct lb_pkt *p,
                                           uint32_t now, struct lb_flow_entry *e)
{
    uint16_t idx = lb_maglev_pick(vip, &p->key, t->sel_seed);
    const struct lb_backend *be;
    int rc;

    if (idx == LB_RING_EMPTY || idx >= vip->n_backends)
        return LB_DROP_NO_BACKEND;
    be = &vip->backends[idx];
    memcpy(e->client, p->key.src, 16);
    memcpy(e->vip, vip->addr, 16);
    memcpy(e->backend, be->addr, 16);
    e->cport = p->key.sport;
    e->vport = vip->port;
    e->bport = be->port;
    e->proto = p->key.proto;
    e->family = p->key.family;
    /* a TCP non-SYN miss (restart, ECMP move) is picked up as half-open: it
     * becomes established once the backend answers and the client ACKs */
    e->state = p->key.proto == IPPROTO_TCP_ ? LB_FS_SYN : LB_FS_UDP;
    e->pad0 = 0;
    e->pad1 = 0;
    e->vip_stat = vip->stat_id;
    e->be_stat = be->stat_id;
    e->last_seen = now;
    rc = lb_flow_insert(w->dp->ft, e, now);
    if (rc == -ENOSPC) {
        /* counted, but still forwarded: the Maglev answer is stable, so the
         * flow keeps its backend even untracked */
        w->stats.drops[LB_DROP_FLOW_FULL]++;
    } else if (rc == 0) {
        w->stats.flow_new++;
    }
    /* -EEXIST: a racing worker inserted it first; *e is now its entry */
    return LB_DROP_NONE;
}

enum lb_verdict lb_process_packet(struct lb_worker *w, const struct lb_table *t,
                                  uint8_t *data, uint32_t len, uint32_t now,
                                  int csum_partial, enum lb_drop_reason *reason)
{
    struct lb_pkt p;
    struct lb_flow_entry e;
    const struct lb_vip *vip;
    const struct lb_backend *be;
    enum lb_drop_reason r;
    int is_new = 0;

    *reason = LB_DROP_NONE;
    w->stats.rx++;
    w->stats.rx_bytes += len;

    r = lb_parse(data, len, &p);
    if (r != LB_DROP_NONE) {
        count_drop(w, r, reason);
        return LB_DROP;
    }
    if (csum_partial) {
        if ((uint32_t)csum_partial != p.l4_off || (p.flags & F_PKT_ICMP_ERR)) {
            count_drop(w, LB_DROP_BAD_VNET, reason);
            return LB_DROP;
        }
        p.flags |= F_PKT_CSUM_PARTIAL;
    }
    if (!t) {
        count_drop(w, LB_DROP_NO_VIP, reason);
        return LB_DROP;
    }

    vip = lb_table_find_vip(t, &p.key);
    if (vip) {
        /* client -> VIP */
        if (lb_flow_lookup(w->dp->ft, &p.key, LB_DIR_FWD, p.tcp_flags, now, &e)) {
            w->stats.flow_hit++;
        } else {
            w->stats.flow_miss++;
            if (p.flags & F_PKT_ICMP_ERR) {
                count_drop(w, LB_DROP_ICMP_NO_FLOW, reason);
                return LB_DROP;
            }
            r = new_flow(w, t, vip, &p, now, &e);
            if (r != LB_DROP_NONE) {
                count_drop(w, r, reason);
                return LB_DROP;
            }
            is_new = 1;
        }
        lb_nat_rewrite(&p, &e, LB_DIR_FWD);
        count_flow(w, &e, p.len, is_new);
        w->stats.tx++;
        w->stats.tx_bytes += p.len;
        return LB_TX;
    }

    /* backend -> client: a reply */
    if (lb_flow_lookup(w->dp->ft, &p.key, LB_DIR_REV, p.tcp_flags, now, &e)) {
        w->stats.flow_hit++;
    } else {
        const struct lb_vip *v2 = NULL;
        w->stats.flow_miss++;
        be = lb_table_find_backend(t, &p.key, &v2);
        if (!be || (p.flags & F_PKT_ICMP_ERR)) {
            count_drop(w, (p.flags & F_PKT_ICMP_ERR) ? LB_DROP_ICMP_NO_FLOW : LB_DROP_NO_VIP,
                       reason);
            return LB_DROP;
        }
        /* stateless reply: the backend serves exactly one VIP on this port */
        memcpy(e.client, p.key.dst, 16);
        memcpy(e.vip, v2->addr, 16);
        memcpy(e.backend, be->addr, 16);
        e.cport = p.key.dport;
        e.vport = v2->port;
        e.bport = be->port;
        e.proto = p.key.proto;
        e.family = p.key.family;
        e.vip_stat = v2->stat_id;
        e.be_stat = be->stat_id;
    }
    lb_nat_rewrite(&p, &e, LB_DIR_REV);
    count_flow(w, &e, p.len, 0);
    w->stats.tx++;
    w->stats.tx_bytes += p.len;
    return LB_TX;
}

uint32_t lb_process_batch(struct lb_worker *w, uint8_t *bufs, uint32_t stride,
                          const uint32_t *lens, uint8_t *verdicts,
                          uint8_t *reasons, uint32_t n, uint32_t now)
{
    struct lb_dataplane *dp = w->dp;
    const struct lb_table *t;
    uint32_t sent = 0;

    (void)dp;
    t = lb_dp_enter(w);
    for (uint32_t i = 0; i < n; i++) {
        enum lb_drop_reason r;
        uint32_t len = lens[i] < stride ? lens[i] : stride;
        enum lb_verdict v = lb_process_packet(w, t, bufs + (size_t)i * stride, len, now, 0, &r);
        verdicts[i] = (uint8_t)v;
        reasons[i] = (uint8_t)r;
        sent += v == LB_TX;
    }
    w->stats.batches++;
    lb_dp_leave(w);
    return sent;
}

/* One packet from the device: strip and check the virtio_net_hdr, run the
 * pipeline, write it back. The header is written back unchanged: NAT keeps
 * every length and offset, so GSO fields (gso_type/size, hdr_len) and
 * csum_start/offset stay valid for the rewritten super-packet. */
static inline void tun_one(struct lb_worker *w, const struct lb_table *t, uint8_t *buf,
                           size_t n, size_t hdr, uint32_t now)
{
    enum lb_drop_reason r;
    int csum_partial = 0;

    if (hdr) {
        struct virtio_net_hdr vh;
        if (n < hdr) {
            w->stats.drops[LB_DROP_BAD_VNET]++;
            return;
        }
        memcpy(&vh, buf, sizeof(vh));
        if (vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
            if (vh.csum_start == 0 || (size_t)vh.csum_start + vh.csum_offset + 2 > n - hdr) {
                w->stats.rx++;
                w->stats.drops[LB_DROP_BAD_VNET]++;
                return;
            }
            csum_partial = vh.csum_start;
        }
    }
    if (lb_process_packet(w, t, buf + hdr, (uint32_t)(n - hdr), now, csum_partial, &r) != LB_TX)
        return;
    for (;;) {
        ssize_t wr = write(w->fd, buf, n);
        if (wr >= 0)
            return;
        if (errno != EINTR) {
            w->stats.tx_errors++;
            return;
        }
    }
}

int lb_loop_run_tun(struct lb_worker *w)
{
    struct lb_dataplane *dp = w->dp;
    struct pollfd pfd = { .fd = w->fd, .events = POLLIN, .revents = 0 };
    size_t hdr = w->vnet_hdr ? sizeof(struct virtio_net_hdr) : 0;
    uint8_t *buf;
    int rc = 0, busy = 0;

    if (w->fd < 0)
        return -EBADF;
    buf = malloc(LB_PKT_MAX);   /* once per worker run, never per packet */
    if (!buf)
        return -ENOMEM;
    while (!__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
        const struct lb_table *t;
        uint32_t now, i;

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
        for (i = 0; i < LB_BATCH; i++) {
            ssize_t n = read(w->fd, buf, LB_PKT_MAX);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                rc = -errno;
                goto out;
            }
            tun_one(w, t, buf, (size_t)n, hdr, now);
        }
        /* a full batch means more is likely queued: go on without poll() */
        busy = i == LB_BATCH;
        w->stats.batches++;
    }
out:
    lb_dp_leave(w);
    free(buf);
    return rc;
}
