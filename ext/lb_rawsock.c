/* lb_rawsock.c - AF_PACKET data plane (mode "rawsock"), see lb_rawsock.h.
 *
 * Per batch of one link: up to LB_BATCH frames the kernel handed over in the
 * V2 ring (each checked where it lies: the tpacket2_hdr's offsets and
 * lengths, the Ethernet header - no VLAN: a tagged frame is dropped as
 * bad_l2 - and the virtio_net_hdr the kernel put in front of it; ARP
 * requests answered at once) -> lb_pipeline_run over their IP packets, in
 * place in the ring, the same call as the TUN loop's -> per verdict: next hop
 * (route of the egress link, longest prefix) -> MAC from the L2 table (none
 * yet: the frame is held, lb_l2_hold) -> new Ethernet header in place ->
 * queued for sendmmsg() on the egress link together with its
 * virtio_net_hdr (NEEDS_CSUM / GSO pass through, as with the TUN) -> the
 * batch's extras -> every queue flushed -> the frames handed back to the
 * kernel (only now: the queued iovecs point into them).
 * A passed packet (LB_PASS: a backend's own traffic) is routed by the worker
 * as the kernel would have: egress link by the longest prefix over all its
 * links, TTL / hop limit down by one (tx_pass).
 * An answer (LB_REPLY: echo reply, RST) leaves on the link it came from, to
 * the MAC it came from (the previous hop: no neighbour lookup, so the first
 * answer to a new client is not lost to an unresolved entry), with a zeroed
 * virtio_net_hdr (its checksums are complete); the batch's extras (released
 * fragments, ICMP errors: lb_out.h) get an Ethernet header in their headroom.
 * A frame larger than a ring slot (a GSO super-packet) arrives truncated with
 * TP_STATUS_COPY, and whole on the socket's queue (PACKET_COPY_THRESH), in
 * the same order: it is read with recvmsg() into one of a few per-run buffers.
 */
#define _GNU_SOURCE      /* sendmmsg */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>

#include "lb_bytes.h"
#include "lb_csum.h"
#include "lb_pipeline.h"
#include "lb_rawsock.h"
#include "lb_vnet.h"

#define ETH_HLEN_ 14u
#define VNET_LEN ((uint32_t)sizeof(struct virtio_net_hdr))
#define TXB LB_BATCH                      /* frames per sendmmsg() */
#define HDR2 ((uint32_t)TPACKET_ALIGN(sizeof(struct tpacket2_hdr)))
/* copy-path buffers per run: a batch stops gathering when they are used up */
#define BIG_NR 16u
#define BIG_LEN (VNET_LEN + ETH_HLEN_ + 65535u + 1u)   /* +1: a longer one shows as MSG_TRUNC */
#define RAW_RCVBUF (8 << 20)              /* queue room for copy-path super-packets */
/* Coalescing under load: from NAP_RATE frames per ms on, a worker whose rings ran dry naps
 * for about half a batch's worth of arrivals (at most NAP_MAX_NS) instead of spinning or
 * waiting for poll() to wake it per frame; below, it spins (busy_poll_us) and sleeps.
 * Closed-loop traffic must stay below the threshold: a nap delays every exchange of a
 * request/response load, and the lab's keep-alive HTTP load (about 200 frames per ms
 * through one worker) ran at 0.69x kernel forwarding with naps from 200 frames/ms, 0.82x
 * from 500. What it costs: between the two rates the worker spins in its busy-poll window
 * between frames, about a sixth of a core more in a rate sweep, with no loss either way
 * (none at all with busy_poll_us = 0). */
#define NAP_RATE 500u
#define NAP_MAX_NS 100000u
#define RATE_WINDOW_NS 1000000u
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

_Static_assert(LB_RAW_BLOCK % LB_RAW_FRAME == 0, "whole frames per block");
_Static_assert(LB_BATCH <= 256, "a batch index fits in lb_out_pkt.src");

/* ---------------------------------------------------------------- sockets */

void lb_raw_close(struct lb_raw_sock *s)
{
    if (s->ring && s->ring != MAP_FAILED)
        munmap(s->ring, s->ring_len);
    s->ring = NULL;
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
}

int lb_raw_open(struct lb_raw_sock *s, uint32_t ifindex, uint16_t fanout_id,
                const struct sock_filter *filter, uint16_t n_filter,
                uint32_t frame_nr, int qdisc_bypass)
{
    const uint32_t per_block = LB_RAW_BLOCK / LB_RAW_FRAME;
    int one = 1, v2 = TPACKET_V2, rcvbuf = RAW_RCVBUF, rc;
    struct tpacket_req req;
    struct sockaddr_ll sll;
    uint32_t block_nr;

    memset(s, 0, sizeof(*s));
    s->fd = -1;
    if (ifindex == 0 || frame_nr == 0 || frame_nr > LB_RAW_FRAME_NR_MAX)
        return -EINVAL;
    block_nr = (frame_nr + per_block - 1) / per_block;
    /* protocol 0: nothing is queued until bind(), which comes after the
     * filter and the ring, so no unfiltered frame ever reaches user space */
    s->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s->fd < 0)
        return -errno;
    s->ifindex = ifindex;
    if (setsockopt(s->fd, SOL_PACKET, PACKET_VERSION, &v2, sizeof(v2)) < 0)
        goto fail;
    /* before the ring: the kernel refuses it afterwards (EBUSY) */
    if (setsockopt(s->fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one)) < 0)
        goto fail;
    /* a frame larger than a ring slot is also queued whole on the socket
     * (the slot says TP_STATUS_COPY): GSO super-packets cross whole without
     * 64 KiB slots; the queue needs room for a few of them */
    if (setsockopt(s->fd, SOL_PACKET, PACKET_COPY_THRESH, &one, sizeof(one)) < 0)
        goto fail;
    if (setsockopt(s->fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
        (void)setsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    if (n_filter) {
        struct sock_fprog prog = { .len = n_filter, .filter = (struct sock_filter *)filter };
        if (setsockopt(s->fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)) < 0)
            goto fail;
    }
    /* our own transmissions are no input (best effort: Linux >= 4.20) */
    (void)setsockopt(s->fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one));
    if (qdisc_bypass
        && setsockopt(s->fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)
        goto fail;
    memset(&req, 0, sizeof(req));
    req.tp_block_size = LB_RAW_BLOCK;
    req.tp_block_nr = block_nr;
    req.tp_frame_size = LB_RAW_FRAME;
    req.tp_frame_nr = block_nr * per_block;
    if (setsockopt(s->fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) < 0)
        goto fail;
    s->frame_size = LB_RAW_FRAME;
    s->frame_nr = req.tp_frame_nr;
    s->ring_len = (size_t)LB_RAW_BLOCK * block_nr;
    s->ring = mmap(NULL, s->ring_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   s->fd, 0);
    if (s->ring == MAP_FAILED) {
        s->ring = NULL;
        goto fail;
    }
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = (int)ifindex;
    if (bind(s->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
        goto fail;
    if (fanout_id) {
        int arg = (int)fanout_id | (PACKET_FANOUT_HASH << 16);
        if (setsockopt(s->fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg)) < 0)
            goto fail;
    }
    return 0;
fail:
    rc = -errno;
    lb_raw_close(s);
    return rc;
}

int lb_raw_set_filter(struct lb_raw_sock *s, const struct sock_filter *filter, uint16_t n_filter)
{
    struct sock_fprog prog = { .len = n_filter, .filter = (struct sock_filter *)filter };

    if (s->fd < 0 || n_filter == 0)
        return -EBADF;
    /* SO_ATTACH_FILTER swaps the program atomically (a reload) */
    if (setsockopt(s->fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)) < 0)
        return -errno;
    return 0;
}

int lb_raw_ring_stats(struct lb_raw_sock *s, uint32_t *packets, uint32_t *drops)
{
    struct tpacket_stats st;              /* V1/V2 layout */
    socklen_t len = sizeof(st);

    if (s->fd < 0)
        return -EBADF;
    memset(&st, 0, sizeof(st));
    if (getsockopt(s->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) < 0)
        return -errno;
    *packets = st.tp_packets;
    *drops = st.tp_drops;
    return 0;
}

/* ---------------------------------------------------------------- the loop */

struct txq {
    uint32_t n;
    struct mmsghdr msg[TXB];
    struct iovec iov[TXB];
};

static void tx_flush(struct lb_worker *w, int fd, struct txq *q)
{
    uint32_t done = 0;

    while (done < q->n) {
        int rc = sendmmsg(fd, q->msg + done, q->n - done, MSG_DONTWAIT);
        if (rc > 0) {
            done += (uint32_t)rc;
            continue;
        }
        if (rc < 0 && errno == EINTR)
            continue;
        /* the message at `done` failed (ring/queue full, link down, too
         * big): count it, go on with the rest */
        w->stats.tx_errors++;
        done++;
    }
    q->n = 0;
}

static inline void tx_add(struct lb_worker *w, int fd, struct txq *q, uint8_t *p, size_t len)
{
    if (q->n == TXB)
        tx_flush(w, fd, q);
    q->iov[q->n].iov_base = p;
    q->iov[q->n].iov_len = len;
    memset(&q->msg[q->n].msg_hdr, 0, sizeof(q->msg[q->n].msg_hdr));
    q->msg[q->n].msg_hdr.msg_iov = &q->iov[q->n];
    q->msg[q->n].msg_hdr.msg_iovlen = 1;
    q->n++;
}

/* A frame dropped before the pipeline saw it: still received. */
static inline void l2_drop(struct lb_worker *w, enum lb_drop_reason r)
{
    w->stats.rx++;
    w->stats.drops[r]++;
}

/* An ARP request for an IPv4 VIP (the VIP is assigned to no interface, so
 * the kernel would not answer it): the reply is built in place and queued
 * on the link it came from. RFC 826; only Ethernet/IPv4 requests. */
static inline void arp_one(struct lb_worker *w, const struct lb_table *t, const struct lb_l2 *l2,
                           uint8_t link, struct lb_raw_sock *in, struct txq *q, uint8_t *frame,
                           uint32_t snap)
{
    uint8_t *a = frame + ETH_HLEN_, tpa[4], sha[6], spa[4];
    int ours = 0;

    w->stats.rx++;
    if (snap < ETH_HLEN_ + 28 || !t || !l2 || lb_be16(a) != 1 || lb_be16(a + 2) != ETH_P_IP
        || a[4] != 6 || a[5] != 4 || lb_be16(a + 6) != 1) {
        w->stats.drops[LB_DROP_BAD_L2]++;
        return;
    }
    memcpy(tpa, a + 24, 4);
    for (uint32_t i = 0; i < t->n_vips && !ours; i++)
        ours = t->vips[i].family == LB_AF_INET && memcmp(t->vips[i].addr, tpa, 4) == 0;
    if (!ours) {
        w->stats.drops[LB_DROP_NO_VIP]++;
        return;
    }
    memcpy(sha, a + 8, 6);
    memcpy(spa, a + 14, 4);
    lb_store16(a + 6, htons(2));                   /* reply */
    memcpy(a + 8, l2->src_mac[link], 6);           /* sender: us, the VIP */
    memcpy(a + 14, tpa, 4);
    memcpy(a + 18, sha, 6);                        /* target: the asker */
    memcpy(a + 24, spa, 4);
    memcpy(frame, sha, 6);
    memcpy(frame + 6, l2->src_mac[link], 6);
    memset(frame - VNET_LEN, 0, VNET_LEN);
    w->stats.tx++;
    tx_add(w, in->fd, q, frame - VNET_LEN, ETH_HLEN_ + 28 + VNET_LEN);
}

/* The next hop's MAC for the IP packet at ip leaving on link eg, or NULL
 * (then counted as a no_neigh drop instead of a sent packet, and recorded
 * for resolution). */
/* Where a packet leaving the pipeline goes: its family and IP destination
 * (parse validated the header lengths, or we built the header). */
static inline void ip_dst(const uint8_t *ip, uint8_t *family, uint8_t dst[16])
{
    memset(dst, 0, 16);
    if ((ip[0] >> 4) == 4) {
        *family = LB_AF_INET;
        memcpy(dst, ip + 16, 4);
    } else {
        *family = LB_AF_INET6;
        memcpy(dst, ip + 24, 16);
    }
}

/* The MAC of the next hop of a packet leaving on eg; NULL (a counted
 * no_neigh drop, the miss recorded for the resolver) when it has none. For
 * the packets the pipeline adds (answers, rejects); the packet itself is
 * held instead (lb_l2_hold). */
static const uint8_t *next_mac(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_l2 *l2,
                               uint8_t eg, const uint8_t *ip, uint32_t iplen, uint8_t *family)
{
    uint8_t nh[16], dst[16];
    const uint8_t *mac;

    ip_dst(ip, family, dst);
    memcpy(nh, dst, 16);
    mac = l2 ? lb_l2_lookup(l2, eg, *family, dst, nh) : NULL;
    if (!mac) {
        /* the pipeline counted it as sent; it is a drop after all (the VIP
         * and backend counters keep it: the flow did see the packet) */
        w->stats.tx--;
        w->stats.tx_bytes -= iplen;
        w->stats.drops[LB_DROP_NO_NEIGH]++;
        lb_rawsock_record_miss(rs, eg, *family, nh);
    }
    return mac;
}

/* The state of one worker run, allocated once per run (never per packet):
 * the transmit queues, the batch being gathered, the copy-path buffers. */
struct raw_run {
    struct txq q[LB_RAW_LINKS];
    /* the batch: pipeline packet j is data[j][0..len[j]), in the frame at
     * frame[j] (Ethernet header first, virtio_net_hdr in front) */
    uint8_t *data[LB_BATCH];
    uint8_t *frame[LB_BATCH];
    uint32_t len[LB_BATCH];
    uint32_t snap[LB_BATCH];
    uint16_t csum[LB_BATCH];
    uint8_t verdict[LB_BATCH];
    uint8_t reason[LB_BATCH];
    uint8_t pkttype[LB_BATCH];    /* sll_pkttype: PACKET_HOST, i.e. to our MAC? */
    uint8_t peer[LB_BATCH][6];
    uint8_t *big;                 /* BIG_NR buffers of BIG_LEN bytes */
};

/* The frame of the copy path (TP_STATUS_COPY): the next packet on the
 * socket's queue, read whole into buf (virtio_net_hdr first). Its length
 * without the virtio_net_hdr, or 0 (missing, or longer than a buffer). */
static uint32_t rx_copy(int fd, uint8_t *buf)
{
    for (;;) {
        ssize_t r = recv(fd, buf, BIG_LEN, MSG_DONTWAIT | MSG_TRUNC);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < (ssize_t)(VNET_LEN + ETH_HLEN_) || r >= (ssize_t)BIG_LEN)
            return 0;
        return (uint32_t)r - VNET_LEN;
    }
}

/* Whether the kernel would forward a packet to dst at all: not to a
 * multicast, broadcast, zero or loopback IPv4 address, nor to an IPv6
 * multicast, link-local, unspecified or loopback one. */
static inline int routable_dst(uint8_t family, const uint8_t *dst)
{
    static const uint8_t zero[15];

    if (family == LB_AF_INET)
        return dst[0] != 0 && dst[0] != 127 && dst[0] < 224;
    if (dst[0] == 0xff || (dst[0] == 0xfe && (dst[1] & 0xc0) == 0x80))
        return 0;
    return memcmp(dst, zero, 15) != 0 || dst[15] > 1;
}

/* Take one from the IPv4 TTL (its header checksum updated incrementally,
 * RFC 1624) or the IPv6 hop limit of the packet at ip (iplen bytes, its
 * header validated by the pipeline). 0, and nothing changed, when it would
 * reach 0 (the kernel's ip_forward/ip6_forward drop such a packet too). */
static inline int ttl_dec(uint8_t *ip, uint32_t iplen, uint8_t family)
{
    if (family == LB_AF_INET) {
        uint16_t from, to;
        if (iplen < 20 || ip[8] <= 1)
            return 0;
        from = lb_load16(ip + 8);                 /* TTL and protocol */
        ip[8]--;
        to = lb_load16(ip + 8);
        lb_store16(ip + 10, lb_csum_update(lb_load16(ip + 10), lb_csum_diff16(0, from, to)));
        return 1;
    }
    if (iplen < 40 || ip[7] <= 1)
        return 0;
    ip[7]--;
    return 1;
}

/* A passed packet (LB_PASS: a backend's own traffic, which the reply path's
 * port-less rules keep from the kernel, its copy going to a blackhole): the
 * worker forwards it as the kernel would have. The egress link is the one
 * whose route covers the destination by the longest prefix, over all of the
 * worker's links (the one it came in on included, as the kernel would); the
 * next hop's MAC comes from the same lookup and hold as a translated
 * packet's; the TTL / hop limit goes down by one. Dropped and counted: a
 * frame not addressed to the gateway's MAC (seen in promiscuous mode: the
 * kernel forwards only PACKET_HOST), a destination no route of the links
 * covers or that is no unicast address (no_route), a TTL / hop limit that
 * would reach 0 (ttl_exceeded: no ICMP error is sent). A passed packet is
 * never to a VIP (passable() in the pipeline), so it cannot come back into
 * the balancer's path as a client's packet. */
static inline void tx_pass(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_l2 *l2,
                           struct raw_run *run, struct lb_raw_sock *socks, uint32_t n_socks,
                           uint32_t j, uint32_t now)
{
    uint8_t family, dst[16], nh[16], eg = 0, *frame = run->frame[j], *ip = run->data[j];
    uint32_t snap = run->snap[j], iplen = snap - ETH_HLEN_;
    enum lb_drop_reason r = LB_DROP_NO_ROUTE;
    struct virtio_net_hdr vh;
    const uint8_t *mac;

    if (run->pkttype[j] != PACKET_HOST || !l2 || snap < ETH_HLEN_ + 20)
        goto drop;
    ip_dst(ip, &family, dst);
    if (family == LB_AF_INET6 && iplen < 40)
        goto drop;
    if (!routable_dst(family, dst)
        || !lb_l2_route_any(l2, (uint8_t)n_socks, family, dst, &eg, nh) || eg >= n_socks)
        goto drop;
    if (!ttl_dec(ip, iplen, family)) {
        r = LB_DROP_TTL_EXCEEDED;
        goto drop;
    }
    mac = lb_l2_mac(l2, eg, family, nh);
    if (!mac) {     /* held until the next hop resolves (or dropped, counted) */
        lb_l2_hold(w, rs, l2, eg, family, dst, frame - VNET_LEN, snap + VNET_LEN, iplen, 1,
                   now);
        return;
    }
    memcpy(&vh, frame - VNET_LEN, VNET_LEN);
    memcpy(frame, mac, 6);
    memcpy(frame + 6, l2->src_mac[eg], 6);
    vh.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM;   /* DATA_VALID means nothing on transmit */
    memcpy(frame - VNET_LEN, &vh, VNET_LEN);
    tx_add(w, socks[eg].fd, &run->q[eg], frame - VNET_LEN, (size_t)snap + VNET_LEN);
    return;
drop:
    w->stats.passed--;
    w->stats.drops[r]++;
}

/* Where a frame of the batch goes after the pipeline (verdict v, IP length
 * iplen): its Ethernet header and virtio_net_hdr rewritten in place and
 * queued on the egress link, or held for its next hop, or dropped. */
static inline void tx_verdict(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_l2 *l2,
                              struct raw_run *run, struct lb_raw_sock *socks, uint32_t n_socks,
                              uint8_t link, uint8_t out_link, uint32_t j, uint32_t now)
{
    uint8_t v = run->verdict[j], family, *frame = run->frame[j], *ip = run->data[j];
    uint32_t snap = run->snap[j], iplen = snap - ETH_HLEN_;
    struct virtio_net_hdr vh;
    const uint8_t *mac;
    uint8_t eg;

    if (v == LB_PASS) {
        tx_pass(w, rs, l2, run, socks, n_socks, j, now);
        return;
    }
    if (v != LB_TX && v != LB_REPLY)
        return;
    /* the rewritten packet's destination decides the next hop; an answer
     * goes back out of the link it came in on, to its sender */
    eg = v == LB_REPLY ? link : out_link;
    if (v == LB_REPLY) {
        mac = l2 ? run->peer[j] : NULL;
    } else if (l2) {
        uint8_t dst[16], nh[16];
        ip_dst(ip, &family, dst);
        memcpy(nh, dst, 16);
        mac = lb_l2_lookup(l2, eg, family, dst, nh);
        if (!mac)   /* held until the next hop resolves (or dropped, counted) */
            lb_l2_hold(w, rs, l2, eg, family, dst, frame - VNET_LEN, snap + VNET_LEN,
                       iplen, 0, now);
    } else {
        mac = next_mac(w, rs, l2, eg, ip, iplen, &family);
    }
    if (!mac)
        return;
    memcpy(&vh, frame - VNET_LEN, VNET_LEN);
    memcpy(frame, mac, 6);
    memcpy(frame + 6, l2->src_mac[eg], 6);
    if (v == LB_REPLY)
        memset(&vh, 0, sizeof(vh));
    vh.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM;   /* DATA_VALID means nothing on transmit */
    memcpy(frame - VNET_LEN, &vh, VNET_LEN);
    /* the frame as it came (an answer shorter than its packet is padded
     * with zeroes by the pipeline) */
    tx_add(w, socks[eg].fd, &run->q[eg], frame - VNET_LEN, (size_t)snap + VNET_LEN);
}

/* Queue the batch's extras (they came with the batch's packets from link;
 * each says which one, lb_out_pkt.src, for an answer's MAC). */
static void tx_extras(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_l2 *l2,
                      struct raw_run *run, struct lb_raw_sock *socks, uint8_t link,
                      uint8_t out_link, uint32_t n)
{
    for (uint32_t i = 0; i < w->out.n; i++) {
        const struct lb_out_pkt *o = &w->out.pkt[i];
        uint8_t eg = o->kind == LB_OUT_REPLY ? link : out_link, family;
        uint8_t *frame = o->data - ETH_HLEN_;
        const uint8_t *mac;
        if (o->kind == LB_OUT_REPLY && o->src < n) {
            mac = run->peer[o->src];
            family = (o->data[0] >> 4) == 4 ? LB_AF_INET : LB_AF_INET6;
        } else {
            mac = next_mac(w, rs, l2, eg, o->data, o->len, &family);
        }
        if (!mac || !l2)
            continue;
        memcpy(frame, mac, 6);
        memcpy(frame + 6, l2->src_mac[eg], 6);
        lb_store16(frame + 12, htons(family == LB_AF_INET ? ETH_P_IP : ETH_P_IPV6));
        memset(frame - VNET_LEN, 0, VNET_LEN);
        tx_add(w, socks[eg].fd, &run->q[eg], frame - VNET_LEN,
               (size_t)o->len + ETH_HLEN_ + VNET_LEN);
    }
}

_Static_assert(ETH_HLEN_ + sizeof(struct virtio_net_hdr) <= LB_OUT_HEADROOM,
               "extras have room for the L2 headers");

/* A frame of the ring handed over to us: checked, then answered (ARP),
 * dropped (counted) or added to the batch. Returns 1 if it used a copy-path
 * buffer. Every offset and length of the tpacket2_hdr is checked against the
 * slot: a frame never reads or writes outside its own slot (or buffer). */
static inline uint32_t rx_frame(struct lb_worker *w, const struct lb_table *t,
                                const struct lb_l2 *l2, struct raw_run *run,
                                struct lb_raw_sock *socks, uint8_t link, uint8_t *slot,
                                uint32_t status, uint8_t *bigbuf, uint32_t *n)
{
    const struct tpacket2_hdr *h = (const struct tpacket2_hdr *)slot;
    const struct sockaddr_ll *sll = (const struct sockaddr_ll *)(slot + HDR2);
    uint32_t snap = h->tp_snaplen, mac = h->tp_mac, fsz = socks[link].frame_size, used = 0;
    struct virtio_net_hdr vh;
    uint16_t csum_start, etype;
    uint8_t *frame;

    if (status & TP_STATUS_COPY) {
        /* the slot holds its head; the whole frame is next on the queue
         * (read it even if we drop it: the queue stays in step) */
        uint32_t got = rx_copy(socks[link].fd, bigbuf);
        if (sll->sll_pkttype == PACKET_OUTGOING)
            return 1;
        if (!got || (status & TP_STATUS_VLAN_VALID)) {
            l2_drop(w, LB_DROP_BAD_L2);
            return 1;
        }
        frame = bigbuf + VNET_LEN;
        snap = got;
        used = 1;
    } else {
        if (sll->sll_pkttype == PACKET_OUTGOING)
            return 0;
        if (mac < HDR2 + sizeof(*sll) + VNET_LEN || mac > fsz || snap > fsz - mac) {
            l2_drop(w, LB_DROP_BAD_L2);
            return 0;
        }
        frame = slot + mac;
        /* truncated (snaplen < len), or VLAN-tagged: 802.1Q is not supported */
        if (snap < h->tp_len || (status & TP_STATUS_VLAN_VALID)) {
            l2_drop(w, LB_DROP_BAD_L2);
            return 0;
        }
    }
    if (snap < ETH_HLEN_) {
        l2_drop(w, LB_DROP_BAD_L2);
        return used;
    }
    etype = lb_be16(frame + 12);
    if (etype == ETH_P_ARP) {
        arp_one(w, t, l2, link, &socks[link], &run->q[link], frame, snap);
        return used;
    }
    if (etype != ETH_P_IP && etype != ETH_P_IPV6) {
        l2_drop(w, LB_DROP_BAD_L2);
        return used;
    }
    memcpy(&vh, frame - VNET_LEN, VNET_LEN);
    /* csum_start counts from the Ethernet header */
    if (lb_vnet_csum_start(&vh, ETH_HLEN_, snap, &csum_start) < 0) {
        l2_drop(w, LB_DROP_BAD_VNET);
        return used;
    }
    run->frame[*n] = frame;
    run->data[*n] = frame + ETH_HLEN_;
    run->len[*n] = snap - ETH_HLEN_;
    run->snap[*n] = snap;
    run->csum[*n] = csum_start;
    memcpy(run->peer[*n], frame + 6, 6);
    run->pkttype[*n] = sll->sll_pkttype;
    (*n)++;
    return used;
}

static inline uint8_t *ring_slot(const struct lb_raw_sock *s, uint32_t i)
{
    return s->ring + (size_t)i * s->frame_size;
}

/* One batch of link: the frames the kernel handed over (up to LB_BATCH, or
 * fewer when the copy-path buffers run out), through the pipeline, out,
 * and handed back. The number of frames taken (0: none was ready). */
static uint32_t rx_batch(struct lb_worker *w, struct lb_rawsock *rs, struct raw_run *run,
                         struct lb_raw_sock *socks, uint32_t n_socks, uint8_t link)
{
    struct lb_raw_sock *s = &socks[link];
    uint8_t out_link = n_socks == 2 ? (uint8_t)(link ^ 1u) : 0;
    const struct lb_table *t;
    const struct lb_l2 *l2;
    uint32_t now, k = 0, n = 0, nbig = 0, cur = s->cur;
    uint32_t st = __atomic_load_n(&((struct tpacket2_hdr *)ring_slot(s, cur))->tp_status,
                                  __ATOMIC_ACQUIRE);

    if (!(st & TP_STATUS_USER))
        return 0;
    t = lb_dp_enter(w);
    l2 = lb_rawsock_l2(rs);
    now = lb_now_ms();
    /* 1. gather the ready frames in place */
    while (k < LB_BATCH) {
        uint32_t i = cur + k < s->frame_nr ? cur + k : cur + k - s->frame_nr;
        uint8_t *slot = ring_slot(s, i);
        if (k) {
            st = __atomic_load_n(&((struct tpacket2_hdr *)slot)->tp_status, __ATOMIC_ACQUIRE);
            if (!(st & TP_STATUS_USER))
                break;
            if ((st & TP_STATUS_COPY) && nbig == BIG_NR)
                break;               /* next batch: no buffer left for it */
        }
        __builtin_prefetch(ring_slot(s, i + 1 < s->frame_nr ? i + 1 : 0));
        nbig += rx_frame(w, t, l2, run, socks, link, slot, st,
                         run->big + (size_t)nbig * BIG_LEN, &n);
        k++;
    }
    /* 2. the pipeline over the batch's IP packets, 3. each where it goes */
    if (n) {
        lb_pipeline_run(w, t, run->data, run->len, run->csum, run->verdict, run->reason, n,
                        now);
        for (uint32_t j = 0; j < n; j++)
            tx_verdict(w, rs, l2, run, socks, n_socks, link, out_link, j, now);
        if (w->out.n)
            tx_extras(w, rs, l2, run, socks, link, out_link, n);
    }
    /* 4. send: the queued frames live in the ring (and the extras in the
     * out list): only then hand them back */
    for (uint32_t i = 0; i < n_socks; i++)
        if (run->q[i].n)
            tx_flush(w, socks[i].fd, &run->q[i]);
    lb_out_done(w);
    for (uint32_t j = 0; j < k; j++) {
        uint32_t i = cur + j < s->frame_nr ? cur + j : cur + j - s->frame_nr;
        __atomic_store_n(&((struct tpacket2_hdr *)ring_slot(s, i))->tp_status,
                         TP_STATUS_KERNEL, __ATOMIC_RELEASE);
    }
    s->cur = cur + k < s->frame_nr ? cur + k : cur + k - s->frame_nr;
    w->stats.batches++;
    return k;
}

static inline uint64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Busy polling: spin on the rings' next slots until one holds a frame (1),
 * or until the monotonic clock reaches until_ns or the data plane stops (0). */
static int spin_ready(struct lb_dataplane *dp, const struct lb_raw_sock *socks, uint32_t n_socks,
                      uint64_t until_ns)
{
    for (;;) {
        for (int k = 0; k < 64; k++) {
            for (uint32_t i = 0; i < n_socks; i++) {
                const struct tpacket2_hdr *h =
                    (const struct tpacket2_hdr *)ring_slot(&socks[i], socks[i].cur);
                if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER)
                    return 1;
            }
            cpu_relax();
        }
        if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE) || mono_ns() >= until_ns)
            return 0;
    }
}

/* Busy polling: after its last frame a worker keeps looking at its rings
 * for dp->busy_poll_us before it sleeps in poll(): a request/response
 * exchange (the next request, a backend's reply) then finds the worker
 * awake, without the wake-up of a sleeping thread (scheduler, C-state exit)
 * on its path. The kernel's own busy polling (SO_BUSY_POLL,
 * SO_PREFER_BUSY_POLL, net.core.busy_read) does not apply here: it polls a
 * device queue's NAPI context, found through the NAPI id of the socket's
 * last skb, and neither AF_PACKET's ring (tpacket_rcv records no NAPI id,
 * and a ring is not read by recvmsg/poll of the socket's queue) nor a veth
 * without XDP/GRO (no NAPI of its own) has one. So the loop spins itself,
 * reading the next slot's status word: no system call while it waits.
 * Under a flood (NAP_RATE frames per ms and more) neither spinning nor a
 * poll() woken per frame pays: the worker naps instead, so that frames
 * gather into batches (V3's block timer did that, at every rate). */
int lb_rawsock_run(struct lb_worker *w, struct lb_rawsock *rs, struct lb_raw_sock *socks,
                   uint32_t n_socks)
{
    struct lb_dataplane *dp = w->dp;
    struct pollfd pfd[LB_RAW_LINKS];
    struct raw_run *run;
    int rc = 0;

    if (n_socks < 1 || n_socks > LB_RAW_LINKS || !rs)
        return -EINVAL;
    for (uint32_t i = 0; i < n_socks; i++) {
        if (socks[i].fd < 0 || !socks[i].ring || socks[i].frame_nr == 0
            || socks[i].frame_size < HDR2 + sizeof(struct sockaddr_ll) + VNET_LEN)
            return -EBADF;
        socks[i].cur %= socks[i].frame_nr;
        pfd[i].fd = socks[i].fd;
        pfd[i].events = POLLIN;
        pfd[i].revents = 0;
    }
    run = calloc(1, sizeof(*run));   /* once per run, never per packet */
    if (!run)
        return -ENOMEM;
    run->big = malloc((size_t)BIG_NR * BIG_LEN);
    if (!run->big) {
        free(run);
        return -ENOMEM;
    }
    uint64_t win_start = mono_ns();
    uint32_t win_frames = 0, rate = 0;   /* frames per ms in the last window */
    int traffic = 0;                     /* frames since the last sleep: a window may start */
    while (!__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
        uint32_t got = 0;
        uint64_t now;
        w->stats.loops++;
        lb_l2_release(w, rs, socks, n_socks, lb_now_ms());
        /* up to a few batches per link in turn, so that one busy link
         * cannot starve the other (requests vs replies) */
        for (int round = 0; round < 4; round++) {
            uint32_t r = 0;
            for (uint32_t i = 0; i < n_socks; i++)
                r += rx_batch(w, rs, run, socks, n_socks, (uint8_t)i);
            got += r;
            if (!r)
                break;
        }
        win_frames += got;
        now = mono_ns();
        if (now - win_start >= RATE_WINDOW_NS) {
            rate = (uint32_t)((uint64_t)win_frames * 1000000u / (now - win_start));
            win_frames = 0;
            win_start = now;
        }
        if (got) {
            traffic = 1;
            continue;
        }
        /* holding no table while napping, spinning or asleep: a publish
         * need not wait for us */
        lb_dp_leave(w);
        if (rate >= NAP_RATE) {
            /* a flood: let half a batch gather, then take it in one go (one
             * wake-up and one sendmmsg per batch, not per frame) */
            uint64_t nap = (uint64_t)(LB_BATCH / 2) * 1000000u / rate;
            struct timespec ts = { 0, (long)(nap < NAP_MAX_NS ? nap : NAP_MAX_NS) };
            nanosleep(&ts, NULL);
            continue;
        }
        uint64_t spin_ns = (uint64_t)lb_dp_busy_poll(dp) * 1000u;
        if (spin_ns && traffic) {
            int ready = spin_ready(dp, socks, n_socks, now + spin_ns);
            w->stats.spin_ns += mono_ns() - now;
            traffic = 0;
            if (ready)
                continue;
        }
        int pr = poll(pfd, n_socks, 100);
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        for (uint32_t i = 0; i < n_socks; i++) {
            if (pfd[i].revents & POLLNVAL) {
                rc = -EBADF;
                goto out;
            }
            if (pfd[i].revents & POLLERR) {
                /* e.g. ENETDOWN while the link is down: read (and so
                 * clear) the error, keep going; the link may come back */
                int err = 0;
                socklen_t el = sizeof(err);
                (void)getsockopt(socks[i].fd, SOL_SOCKET, SO_ERROR, &err, &el);
                w->stats.tx_errors += err != 0;
            }
        }
    }
out:
    lb_dp_leave(w);
    free(run->big);
    free(run);
    return rc;
}
