/* lb_rawsock.c - AF_PACKET data plane (mode "rawsock"), see lb_rawsock.h.
 *
 * Per frame: V3 ring frame -> check the Ethernet header (no VLAN: a tagged
 * frame is dropped as bad_l2) and the virtio_net_hdr the kernel put in front
 * of it -> lb_process_packet on the IP packet in place -> next hop (route of
 * the egress link, longest prefix) -> MAC from the L2 table -> new Ethernet
 * header in place -> queued for sendmmsg() on the egress link together with
 * its virtio_net_hdr (NEEDS_CSUM / GSO pass through, as with the TUN).
 * An answer (LB_REPLY: echo reply, RST) leaves on the link it came from, to
 * the MAC it came from (the previous hop: no neighbour lookup, so the first
 * answer to a new client is not lost to an unresolved entry), with a zeroed
 * virtio_net_hdr (its checksums are complete); the packet's
 * extras (released fragments, ICMP errors: lb_out.h) get an Ethernet header
 * in their headroom and are sent at once (they are rare).
 * Receive ring: Documentation/networking/packet_mmap.rst ("TPACKET_V3").
 */
#define _GNU_SOURCE      /* sendmmsg */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>

#include "lb_bytes.h"
#include "lb_pipeline.h"
#include "lb_rawsock.h"
#include "lb_vnet.h"

#define ETH_HLEN_ 14u
#define VNET_LEN ((uint32_t)sizeof(struct virtio_net_hdr))
#define TXB LB_BATCH                      /* frames per sendmmsg() */
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

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
                uint32_t block_size, uint32_t block_nr, int qdisc_bypass)
{
    int one = 1, v3 = TPACKET_V3, rc;
    struct tpacket_req3 req;
    struct sockaddr_ll sll;

    memset(s, 0, sizeof(*s));
    s->fd = -1;
    if (ifindex == 0 || block_nr == 0 || block_size < LB_RAW_FRAME
        || block_size % LB_RAW_FRAME)
        return -EINVAL;
    /* protocol 0: nothing is queued until bind(), which comes after the
     * filter and the ring, so no unfiltered frame ever reaches user space */
    s->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s->fd < 0)
        return -errno;
    s->ifindex = ifindex;
    if (setsockopt(s->fd, SOL_PACKET, PACKET_VERSION, &v3, sizeof(v3)) < 0)
        goto fail;
    /* before the ring: the kernel refuses it afterwards (EBUSY) */
    if (setsockopt(s->fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one)) < 0)
        goto fail;
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
    req.tp_block_size = block_size;
    req.tp_block_nr = block_nr;
    req.tp_frame_size = LB_RAW_FRAME;
    req.tp_frame_nr = (block_size / LB_RAW_FRAME) * block_nr;
    req.tp_retire_blk_tov = 1;            /* ms: a partly filled block is handed over soon */
    if (setsockopt(s->fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) < 0)
        goto fail;
    s->block_size = block_size;
    s->block_nr = block_nr;
    s->ring_len = (size_t)block_size * block_nr;
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
    struct tpacket_stats_v3 st;
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

/* Send the extras of the packet just processed (it came on link from the MAC
 * peer), then give their buffers back. */
static void send_extras(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_l2 *l2,
                        uint8_t link, uint8_t out_link, const uint8_t *peer,
                        struct lb_raw_sock *socks, struct txq *qs)
{
    for (uint32_t i = 0; i < w->out.n; i++) {
        const struct lb_out_pkt *o = &w->out.pkt[i];
        uint8_t eg = o->kind == LB_OUT_REPLY ? link : out_link, family;
        uint8_t *frame = o->data - ETH_HLEN_;
        const uint8_t *mac;
        if (o->kind == LB_OUT_REPLY) {
            mac = peer;
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
        tx_add(w, socks[eg].fd, &qs[eg], frame - VNET_LEN, (size_t)o->len + ETH_HLEN_ + VNET_LEN);
    }
    if (qs[link].n)
        tx_flush(w, socks[link].fd, &qs[link]);
    if (qs[out_link].n)
        tx_flush(w, socks[out_link].fd, &qs[out_link]);
    lb_out_done(w);
}

_Static_assert(ETH_HLEN_ + sizeof(struct virtio_net_hdr) <= LB_OUT_HEADROOM,
               "extras have room for the L2 headers");

/* One frame of a block whose bytes are blk[0..blk_len). */
static inline void rx_one(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_table *t,
                          const struct lb_l2 *l2, uint8_t link, uint8_t out_link,
                          struct lb_raw_sock *socks, struct txq *qs,
                          const struct tpacket3_hdr *h, uint8_t *blk, size_t off,
                          size_t blk_len, uint32_t now)
{
    const struct sockaddr_ll *sll;
    struct virtio_net_hdr vh;
    enum lb_drop_reason r;
    enum lb_verdict v;
    uint8_t *frame, *ip, family, peer[6];
    const uint8_t *mac;
    uint32_t snap = h->tp_snaplen, iplen;
    uint16_t csum_start, etype;

    if ((size_t)TPACKET_ALIGN(sizeof(*h)) + sizeof(*sll) > blk_len - off)
        return;
    sll = (const struct sockaddr_ll *)(blk + off + TPACKET_ALIGN(sizeof(*h)));
    if (sll->sll_pkttype == PACKET_OUTGOING)
        return;
    if (h->tp_mac < TPACKET_ALIGN(sizeof(*h)) + VNET_LEN
        || (size_t)h->tp_mac + snap > blk_len - off) {
        l2_drop(w, LB_DROP_BAD_L2);
        return;
    }
    frame = blk + off + h->tp_mac;
    /* truncated (snaplen < len), or VLAN-tagged: 802.1Q is not supported */
    if (snap < ETH_HLEN_ || snap < h->tp_len || (h->tp_status & TP_STATUS_VLAN_VALID)) {
        l2_drop(w, LB_DROP_BAD_L2);
        return;
    }
    etype = lb_be16(frame + 12);
    if (etype == ETH_P_ARP) {
        arp_one(w, t, l2, link, &socks[link], &qs[link], frame, snap);
        return;
    }
    if (etype != ETH_P_IP && etype != ETH_P_IPV6) {
        l2_drop(w, LB_DROP_BAD_L2);
        return;
    }
    memcpy(&vh, frame - VNET_LEN, VNET_LEN);
    /* csum_start counts from the Ethernet header */
    if (lb_vnet_csum_start(&vh, ETH_HLEN_, snap, &csum_start) < 0) {
        l2_drop(w, LB_DROP_BAD_VNET);
        return;
    }
    ip = frame + ETH_HLEN_;
    iplen = snap - ETH_HLEN_;
    memcpy(peer, frame + 6, 6);
    v = lb_process_packet(w, t, ip, iplen, now, csum_start, &r);
    if (v == LB_TX || v == LB_REPLY) {
        /* the rewritten packet's destination decides the next hop; an
         * answer goes back out of the link it came in on, to its sender */
        uint8_t eg = v == LB_REPLY ? link : out_link;
        if (v == LB_REPLY) {
            mac = l2 ? peer : NULL;
        } else if (l2) {
            uint8_t dst[16], nh[16];
            ip_dst(ip, &family, dst);
            memcpy(nh, dst, 16);
            mac = lb_l2_lookup(l2, eg, family, dst, nh);
            if (!mac)   /* held until the next hop resolves (or dropped, counted) */
                lb_l2_hold(w, rs, l2, eg, family, dst, frame - VNET_LEN, snap + VNET_LEN,
                           iplen, now);
        } else {
            mac = next_mac(w, rs, l2, eg, ip, iplen, &family);
        }
        if (mac) {
            memcpy(frame, mac, 6);
            memcpy(frame + 6, l2->src_mac[eg], 6);
            if (v == LB_REPLY)
                memset(&vh, 0, sizeof(vh));
            vh.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM;   /* DATA_VALID means nothing on transmit */
            memcpy(frame - VNET_LEN, &vh, VNET_LEN);
            tx_add(w, socks[eg].fd, &qs[eg], frame - VNET_LEN, (size_t)snap + VNET_LEN);
        }
    }
    if (w->out.n)
        send_extras(w, rs, l2, link, out_link, peer, socks, qs);
}

/* Process the block s->cur if user space owns it; 1 if it did. */
static int rx_block(struct lb_worker *w, struct lb_rawsock *rs, struct lb_raw_sock *socks,
                    uint32_t n_socks, uint8_t link, struct txq *qs)
{
    struct lb_raw_sock *s = &socks[link];
    uint8_t *blk = s->ring + (size_t)s->cur * s->block_size;
    struct tpacket_block_desc *bd = (struct tpacket_block_desc *)blk;
    uint8_t out_link = n_socks == 2 ? (uint8_t)(link ^ 1u) : 0;
    const struct lb_table *t;
    const struct lb_l2 *l2;
    uint32_t now, n, i;
    size_t off;

    if (!(__atomic_load_n(&bd->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
        return 0;
    t = lb_dp_enter(w);
    l2 = lb_rawsock_l2(rs);
    now = lb_now_ms();
    n = bd->hdr.bh1.num_pkts;
    off = bd->hdr.bh1.offset_to_first_pkt;
    for (i = 0; i < n; i++) {
        const struct tpacket3_hdr *h;
        if (off < sizeof(*bd) || off + sizeof(*h) > s->block_size)
            break;
        h = (const struct tpacket3_hdr *)(blk + off);
        rx_one(w, rs, t, l2, link, out_link, socks, qs, h, blk, off, s->block_size, now);
        if (h->tp_next_offset == 0)
            break;
        off += h->tp_next_offset;
    }
    /* the queued frames live in this block: send before handing it back */
    for (i = 0; i < n_socks; i++)
        if (qs[i].n)
            tx_flush(w, socks[i].fd, &qs[i]);
    __atomic_store_n(&bd->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
    s->cur = (s->cur + 1) % s->block_nr;
    w->stats.batches++;
    return 1;
}

int lb_rawsock_run(struct lb_worker *w, struct lb_rawsock *rs, struct lb_raw_sock *socks,
                   uint32_t n_socks)
{
    struct lb_dataplane *dp = w->dp;
    struct pollfd pfd[LB_RAW_LINKS];
    struct txq *qs;
    int rc = 0;

    if (n_socks < 1 || n_socks > LB_RAW_LINKS || !rs)
        return -EINVAL;
    for (uint32_t i = 0; i < n_socks; i++) {
        if (socks[i].fd < 0 || !socks[i].ring)
            return -EBADF;
        pfd[i].fd = socks[i].fd;
        pfd[i].events = POLLIN;
        pfd[i].revents = 0;
    }
    qs = calloc(LB_RAW_LINKS, sizeof(*qs));   /* once per run, never per packet */
    if (!qs)
        return -ENOMEM;
    while (!__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
        int busy = 0;
        w->stats.loops++;
        lb_l2_release(w, rs, socks, n_socks, lb_now_ms());
        /* up to a few blocks per link in turn, so that one busy link
         * cannot starve the other (requests vs replies) */
        for (int round = 0; round < 4; round++) {
            int got = 0;
            for (uint32_t i = 0; i < n_socks; i++)
                got |= rx_block(w, rs, socks, n_socks, (uint8_t)i, qs);
            busy |= got;
            if (!got)
                break;
        }
        if (busy)
            continue;
        /* holding no table while asleep: a publish need not wait for us */
        lb_dp_leave(w);
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
    free(qs);
    return rc;
}
