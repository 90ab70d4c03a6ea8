/* lb_nat.c - stage 5 of the packet path: the NAT rewrite, with checksums
 * updated incrementally (RFC 1624, see lb_csum.h); nothing is summed over
 * the payload.
 *
 *   LB_DIR_FWD  client -> VIP:vport      becomes client -> backend:bport
 *   LB_DIR_REV  backend:bport -> client  becomes VIP:vport -> client
 *
 * The checksum deltas are taken from what the packet holds, so a field is
 * always replaced by the value the flow entry gives for it.
 *
 * ICMP errors quoting a flow (F_PKT_ICMP_ERR) are translated the same way,
 * inside out: the quoted packet is a packet of the flow travelling the other
 * way, so a FWD error (towards the VIP) quotes VIP:vport -> client, whose
 * source becomes backend:bport again, and a REV error quotes
 * client -> backend:bport, whose destination becomes VIP:vport. Each change
 * inside the ICMP message (addresses, ports, and the quoted checksum fields
 * that those changes update) feeds the ICMP checksum; ICMPv6 also covers the
 * pseudo-header, so the outer address change counts there too.
 *
 * F_PKT_CSUM_PARTIAL is not looked at for ICMP errors: no stack hands an
 * ICMP message over with a checksum still to be completed.
 *
 * The caller has parsed p with lb_parse() (LB_DROP_NONE): every offset used
 * here was bounds-checked there.
 */
#include <string.h>
#include "lb_nat.h"
#include "lb_csum.h"
#include "lb_bytes.h"
#include "lb_proto.h"

/* Offsets inside the IP header. */
#define IP4_CSUM 10
#define IP4_SRC  12
#define IP4_DST  16
#define IP6_SRC  8
#define IP6_DST  24

static inline uint32_t l4_csum_off(uint8_t proto)
{
    return proto == LB_IPPROTO_TCP ? 16 : 6;
}

/* TCP/UDP packet of the flow. */
static void nat_l4(struct lb_pkt *p, const struct lb_flow_entry *e, enum lb_dir dir)
{
    uint8_t *d = p->data;
    uint8_t *l4 = d + p->l4_off;
    int v4 = p->family == LB_AF_INET;
    size_t alen = v4 ? 4 : 16;
    uint8_t *addr, *port, *csum;
    const uint8_t *to;
    uint16_t to_port, c;
    uint32_t acc_addr, acc_port;

    if (dir == LB_DIR_FWD) {
        addr = d + (v4 ? IP4_DST : IP6_DST);
        port = l4 + 2;
        to = e->backend;
        to_port = e->bport;
    } else {
        addr = d + (v4 ? IP4_SRC : IP6_SRC);
        port = l4;
        to = e->vip;
        to_port = e->vport;
    }
    acc_addr = lb_csum_diff(0, addr, to, alen);
    acc_port = lb_csum_diff16(0, lb_load16(port), to_port);

    if (v4)
        lb_store16(d + IP4_CSUM, lb_csum_update(lb_load16(d + IP4_CSUM), acc_addr));

    csum = l4 + l4_csum_off(p->proto);
    c = lb_load16(csum);
    if (p->flags & F_PKT_CSUM_PARTIAL) {
        /* Seed of a checksum the device will finish: the pseudo-header
         * (addresses) only; ports are in the part still to be summed. */
        lb_store16(csum, lb_csum_update_partial(c, acc_addr));
    } else if (p->proto == LB_IPPROTO_UDP && c == 0) {
        /* UDP over IPv4 without checksum stays without (parse refuses a
         * zero UDP checksum over IPv6). */
    } else {
        c = lb_csum_update(c, acc_addr + acc_port);
        if (p->proto == LB_IPPROTO_UDP && c == 0)
            c = 0xffff;          /* RFC 768: a computed 0 is sent as all ones */
        lb_store16(csum, c);
    }
    memcpy(addr, to, alen);
    lb_store16(port, to_port);
}

/* ICMP/ICMPv6 error quoting a packet of the flow. */
static void nat_icmp(struct lb_pkt *p, const struct lb_flow_entry *e, enum lb_dir dir)
{
    uint8_t *d = p->data;
    uint8_t *in = d + p->inner_off;
    uint8_t *il4 = d + p->inner_l4_off;
    uint8_t *icmp_csum = d + p->l4_off + 2;
    int v4 = p->family == LB_AF_INET;
    size_t alen = v4 ? 4 : 16;
    uint8_t *in_addr, *in_port, *out_addr;
    const uint8_t *to;
    uint16_t to_port, old, c;
    uint32_t acc_addr, acc_port, acc_icmp, l4c;

    if (dir == LB_DIR_FWD) {
        /* quote VIP:vport -> client; outer X -> VIP */
        in_addr = in + (v4 ? IP4_SRC : IP6_SRC);
        in_port = il4;
        out_addr = d + (v4 ? IP4_DST : IP6_DST);
        to = e->backend;
        to_port = e->bport;
    } else {
        /* quote client -> backend:bport; outer backend-or-router -> client.
         * A router's address stays: only the backend's own is hidden. */
        in_addr = in + (v4 ? IP4_DST : IP6_DST);
        in_port = il4 + 2;
        out_addr = d + (v4 ? IP4_SRC : IP6_SRC);
        if (memcmp(out_addr, e->backend, alen) != 0)
            out_addr = NULL;
        to = e->vip;
        to_port = e->vport;
    }

    acc_addr = lb_csum_diff(0, in_addr, to, alen);
    acc_port = lb_csum_diff16(0, lb_load16(in_port), to_port);
    acc_icmp = acc_addr + acc_port;

    if (v4) {
        old = lb_load16(in + IP4_CSUM);
        c = lb_csum_update(old, acc_addr);
        acc_icmp = lb_csum_diff16(acc_icmp, old, c);
        lb_store16(in + IP4_CSUM, c);
    }

    /* The quoted L4 checksum covers the whole original packet, which we do
     * not have; but the update is incremental, so the quoted field alone is
     * enough, when the quote reaches it. */
    l4c = p->inner_l4_off + l4_csum_off(p->key.proto);
    if (l4c + 2 <= p->len) {
        old = lb_load16(d + l4c);
        if (!(p->key.proto == LB_IPPROTO_UDP && old == 0)) {
            c = lb_csum_update(old, acc_addr + acc_port);
            if (p->key.proto == LB_IPPROTO_UDP && c == 0)
                c = 0xffff;
            acc_icmp = lb_csum_diff16(acc_icmp, old, c);
            lb_store16(d + l4c, c);
        }
    }
    memcpy(in_addr, to, alen);
    lb_store16(in_port, to_port);

    if (out_addr) {
        uint32_t acc_out = lb_csum_diff(0, out_addr, to, alen);
        if (v4)
            lb_store16(d + IP4_CSUM, lb_csum_update(lb_load16(d + IP4_CSUM), acc_out));
        else
            acc_icmp += acc_out;     /* ICMPv6 pseudo-header */
        memcpy(out_addr, to, alen);
    }
    lb_store16(icmp_csum, lb_csum_update(lb_load16(icmp_csum), acc_icmp));
}

void lb_nat_rewrite_ip(uint8_t *d, uint8_t family, const struct lb_flow_entry *e,
                       enum lb_dir dir)
{
    const uint8_t *to = dir == LB_DIR_FWD ? e->backend : e->vip;

    if (family == LB_AF_INET) {
        uint8_t *a = d + (dir == LB_DIR_FWD ? IP4_DST : IP4_SRC);
        uint32_t acc = lb_csum_diff(0, a, to, 4);
        lb_store16(d + IP4_CSUM, lb_csum_update(lb_load16(d + IP4_CSUM), acc));
        memcpy(a, to, 4);
    } else {
        memcpy(d + (dir == LB_DIR_FWD ? IP6_DST : IP6_SRC), to, 16);
    }
}

void lb_nat_rewrite(struct lb_pkt *p, const struct lb_flow_entry *e, enum lb_dir dir)
{
    if (p->flags & F_PKT_ICMP_ERR)
        nat_icmp(p, e, dir);
    else if ((p->flags & F_PKT_FRAGMENT) && p->frag_off)
        lb_nat_rewrite_ip(p->data, p->family, e, dir);
    else
        nat_l4(p, e, dir);
}
