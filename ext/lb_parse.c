/* lb_parse.c - stage 2 of the packet path: bytes -> struct lb_pkt.
 *
 * The buffer holds one IP packet (no L2 header). Every read is checked
 * against the end of what the previous header vouched for; the walk over
 * IPv6 extension headers is bounded (LB_MAX_EXTHDR). Each failure returns
 * its own enum lb_drop_reason, so the drop counters say what was wrong.
 *
 * Rules (the pure-Python oracle lbcore/reference/packet.py follows the same):
 *  - IPv4: IHL >= 5 and within the buffer (else bad_ihl), total length
 *    >= IHL*4 (else bad_totlen) and <= buffer (else truncated); bytes past
 *    the total length are ignored (p->len = total length). The header
 *    checksum is not verified: packets reach us routed by the kernel, which
 *    has checked it, and an incremental update keeps a bad one bad.
 *  - Fragments (IPv4 MF or offset, IPv6 fragment header other than an atomic
 *    one) get F_PKT_FRAGMENT and the frag_* fields (the fragment cache,
 *    lb_frag.h, keys on them). A first fragment (offset 0) is parsed on as
 *    usual, except that a UDP length may exceed the fragment (it counts the
 *    whole datagram); it must hold the whole TCP/UDP header (truncated /
 *    bad_l4 otherwise, as RFC 7112 asks of IPv6). A later fragment stops at
 *    the IP header chain: no ports, key.proto = the protocol of the
 *    fragment key. Dropped as `fragment`: a fragment whose data would end
 *    past 65535 bytes, a non-last one whose data is empty or not a multiple
 *    of 8 bytes, a second IPv6 Fragment header, a fragmented ICMP message.
 *  - IPv6: payload length 0 (a jumbogram, RFC 2675, or nothing at all) is
 *    bad_totlen; 40 + payload length must fit the buffer. Extension headers:
 *    hop-by-hop (first only), routing (only with segments left 0: otherwise
 *    this is not the final destination, and the L4 pseudo-header names an
 *    address we would not be rewriting), destination options, fragment
 *    (atomic only), AH ((len + 2) * 4 bytes); ESP, no-next-header and
 *    anything else are unsupported. At most LB_MAX_EXTHDR headers.
 *  - TCP: 20 bytes (truncated), data offset >= 5 and within the packet
 *    (bad_l4). UDP: 8 bytes (truncated), 8 <= length <= IP payload (bad_l4;
 *    a shorter length is accepted as the kernel does: bytes past it are
 *    padding). UDP over IPv6 with checksum 0 is bad_l4 (RFC 8200 8.1: the
 *    receiver drops it anyway).
 *  - ICMP errors: see parse_icmp_err(). ICMP/ICMPv6 echo requests (IPv6:
 *    without extension headers) get F_PKT_ECHO: the pipeline answers those
 *    to a VIP address.
 */
#include <string.h>
#include "lb_parse.h"
#include "lb_bytes.h"
#include "lb_proto.h"

#ifndef LB_MAX_EXTHDR
#define LB_MAX_EXTHDR 8u             /* IPv6 extension headers walked at most */
#endif


#define IP4_MF_OFFSET 0x3fffu        /* MF flag + fragment offset */
#define IP4_OFFSET    0x1fffu
#define IP6_FRAG_OFF  0xfff8u        /* fragment offset, in 8-byte units << 3 */
#define IP6_FRAG_M    0x0001u

/* Where one IP header (outer or quoted) leads. */
struct ip_walk {
    uint32_t l4_off;   /* first byte after the IP header chain */
    uint32_t end;      /* end of what the IP header vouches for */
    uint8_t  proto;    /* the upper-layer protocol */
    uint8_t  frag;     /* 1: a fragment (outer header only), fields below */
    uint8_t  frag_nh;
    uint8_t  frag_last;
    uint32_t frag_id;
    uint32_t frag_off;   /* bytes; > 0: a later fragment, l4_off = its data */
    uint32_t frag_len;   /* bytes of fragment data */
};

/* A fragment's offset and length as the fragment rules allow them. */
static inline enum lb_drop_reason frag_check(const struct ip_walk *w)
{
    if (w->frag_off + w->frag_len > 65535u)
        return LB_DROP_FRAGMENT;
    if (!w->frag_last && (w->frag_len == 0 || (w->frag_len & 7u)))
        return LB_DROP_FRAGMENT;
    return LB_DROP_NONE;
}

/* IPv4 header at d[off..end). A quote (ICMP error payload) may be cut short,
 * so its total length is not checked against end; a quoted first fragment is
 * fine (it has the ports), a later one is not. */
static enum lb_drop_reason
walk_ip4(const uint8_t *d, uint32_t off, uint32_t end, int quote, struct ip_walk *w)
{
    const uint8_t *h = d + off;
    uint32_t avail = end - off;
    uint32_t hl, tot, frag;

    if (avail < 20)
        return LB_DROP_TRUNCATED;
    if ((h[0] >> 4) != 4)
        return LB_DROP_BAD_VERSION;
    hl = (uint32_t)(h[0] & 0x0f) * 4;
    if (hl < 20 || hl > avail)
        return LB_DROP_BAD_IHL;
    tot = lb_be16(h + 2);
    frag = lb_be16(h + 6);
    if (!quote) {
        if (tot < hl)
            return LB_DROP_BAD_TOTLEN;
        if (tot > avail)
            return LB_DROP_TRUNCATED;
        w->end = off + tot;
        if (frag & IP4_MF_OFFSET) {
            w->frag = 1;
            w->frag_nh = h[9];
            w->frag_last = !(frag & 0x2000u);
            w->frag_id = lb_load16(h + 4);
            w->frag_off = (frag & IP4_OFFSET) * 8u;
            w->frag_len = tot - hl;
            if (frag_check(w) != LB_DROP_NONE)
                return LB_DROP_FRAGMENT;
        }
    } else {
        if (tot < hl + 8)
            return LB_DROP_BAD_TOTLEN;
        if (frag & IP4_OFFSET)
            return LB_DROP_FRAGMENT;
        w->end = end;
    }
    w->l4_off = off + hl;
    w->proto = h[9];
    return LB_DROP_NONE;
}

/* IPv6 header and its extension headers at d[off..end). */
static enum lb_drop_reason
walk_ip6(const uint8_t *d, uint32_t off, uint32_t end, int quote, struct ip_walk *w)
{
    const uint8_t *h = d + off;
    uint32_t avail = end - off;
    uint32_t plen, cur, hlen, i;
    uint8_t nh;

    if (avail < 40)
        return LB_DROP_TRUNCATED;
    if ((h[0] >> 4) != 6)
        return LB_DROP_BAD_VERSION;
    plen = lb_be16(h + 4);
    if (plen == 0)
        return LB_DROP_BAD_TOTLEN;
    if (!quote) {
        if (plen > avail - 40)
            return LB_DROP_TRUNCATED;
        end = off + 40 + plen;
    }
    nh = h[6];
    cur = off + 40;
    for (i = 0; i <= LB_MAX_EXTHDR; i++) {
        switch (nh) {
        case LB_IPPROTO_TCP:
        case LB_IPPROTO_UDP:
        case LB_IPPROTO_ICMPV6:
            w->l4_off = cur;
            w->end = end;
            w->proto = nh;
            return LB_DROP_NONE;
        case LB_IPPROTO_HOPOPTS:
        case LB_IPPROTO_ROUTING:
        case LB_IPPROTO_DSTOPTS:
        case LB_IPPROTO_FRAGMENT:
        case LB_IPPROTO_AH:
            break;
        default:                     /* ESP, no next header, mobility, ... */
            return LB_DROP_UNSUPPORTED;
        }
        if (i == LB_MAX_EXTHDR)
            return LB_DROP_BAD_EXTHDR;
        if (nh == LB_IPPROTO_HOPOPTS && i != 0)
            return LB_DROP_BAD_EXTHDR;   /* RFC 8200 4.3: only right after the header */
        if (end - cur < 8)
            return LB_DROP_BAD_EXTHDR;
        if (nh == LB_IPPROTO_FRAGMENT) {
            uint32_t fo = lb_be16(d + cur + 2);
            if (quote && (fo & IP6_FRAG_OFF))
                return LB_DROP_FRAGMENT;
            if (!quote && (fo & (IP6_FRAG_OFF | IP6_FRAG_M))) {
                if (w->frag)
                    return LB_DROP_FRAGMENT;     /* a second Fragment header */
                w->frag = 1;
                w->frag_nh = d[cur];
                w->frag_last = !(fo & IP6_FRAG_M);
                w->frag_id = lb_load32(d + cur + 4);
                w->frag_off = fo & IP6_FRAG_OFF;
                w->frag_len = end - (cur + 8);
                if (frag_check(w) != LB_DROP_NONE)
                    return LB_DROP_FRAGMENT;
                if (w->frag_off) {           /* a later fragment: no more headers */
                    w->l4_off = cur + 8;
                    w->end = end;
                    w->proto = d[cur];
                    return LB_DROP_NONE;
                }
            }
            hlen = 8;
        } else if (nh == LB_IPPROTO_AH) {
            hlen = ((uint32_t)d[cur + 1] + 2) * 4;
        } else {
            hlen = ((uint32_t)d[cur + 1] + 1) * 8;
        }
        if (hlen > end - cur)
            return LB_DROP_BAD_EXTHDR;
        if (nh == LB_IPPROTO_ROUTING && d[cur + 3] != 0)
            return LB_DROP_UNSUPPORTED;  /* segments left: not the final hop */
        nh = d[cur];
        cur += hlen;
    }
    return LB_DROP_BAD_EXTHDR;           /* not reached: the loop returns */
}

static enum lb_drop_reason
walk_ip(const uint8_t *d, uint32_t off, uint32_t end, uint8_t family, int quote,
        struct ip_walk *w)
{
    if (family == LB_AF_INET)
        return walk_ip4(d, off, end, quote, w);
    return walk_ip6(d, off, end, quote, w);
}

/* Copy the addresses of the IP header at h into a key (IPv4 in the first
 * 4 bytes; the rest stays zero from the memset in lb_parse). */
static inline void
key_addrs(struct lb_flow_key *k, const uint8_t *h, uint8_t family, int reversed)
{
    const uint8_t *src, *dst;
    size_t n;

    if (family == LB_AF_INET) {
        src = h + 12; dst = h + 16; n = 4;
    } else {
        src = h + 8; dst = h + 24; n = 16;
    }
    memcpy(k->src, reversed ? dst : src, n);
    memcpy(k->dst, reversed ? src : dst, n);
}

static enum lb_drop_reason parse_tcp(struct lb_pkt *p, uint32_t end)
{
    const uint8_t *t = p->data + p->l4_off;
    uint32_t doff;

    if (end - p->l4_off < 20)
        return LB_DROP_TRUNCATED;
    doff = (uint32_t)(t[12] >> 4) * 4;
    if (doff < 20 || doff > end - p->l4_off)
        return LB_DROP_BAD_L4;
    p->tcp_flags = t[13];
    p->key.sport = lb_load16(t);
    p->key.dport = lb_load16(t + 2);
    return LB_DROP_NONE;
}

static enum lb_drop_reason parse_udp(struct lb_pkt *p, uint32_t end)
{
    const uint8_t *u = p->data + p->l4_off;
    uint32_t ulen;

    if (end - p->l4_off < 8)
        return LB_DROP_TRUNCATED;
    ulen = lb_be16(u + 4);
    /* a first fragment's UDP length counts the whole datagram */
    if (ulen < 8 || (ulen > end - p->l4_off && !(p->flags & F_PKT_FRAGMENT)))
        return LB_DROP_BAD_L4;
    if (p->family == LB_AF_INET6 && lb_load16(u + 6) == 0)
        return LB_DROP_BAD_L4;
    p->key.sport = lb_load16(u);
    p->key.dport = lb_load16(u + 2);
    return LB_DROP_NONE;
}

static inline int icmp_is_error(uint8_t family, uint8_t type)
{
    if (family == LB_AF_INET)        /* dest unreachable, time exceeded, param problem */
        return type == 3 || type == 11 || type == 12;
    return type >= 1 && type <= 4;   /* dest unreach, too big, time exceeded, param */
}

/* ICMP/ICMPv6 error quoting a TCP/UDP packet we sent (or forwarded). The
 * quote is parsed by the same rules (may be cut short; a non-first fragment
 * has no ports) and must hold 8 bytes of L4 header: the ports, and for the
 * rewrite also the UDP checksum (the TCP one is fixed only if quoted). Any
 * problem with the quote, a nested ICMP error included, is icmp_bad. */
static enum lb_drop_reason parse_icmp_err(struct lb_pkt *p, uint32_t end)
{
    const uint8_t *d = p->data;
    uint32_t inner = (uint32_t)p->l4_off + 8;
    struct ip_walk w;

    if (end - p->l4_off < 8)
        return LB_DROP_TRUNCATED;
    if (!icmp_is_error(p->family, d[p->l4_off]))
        return LB_DROP_UNSUPPORTED;
    if (walk_ip(d, inner, end, p->family, 1, &w) != LB_DROP_NONE)
        return LB_DROP_ICMP_BAD;
    if (w.proto != LB_IPPROTO_TCP && w.proto != LB_IPPROTO_UDP)
        return LB_DROP_ICMP_BAD;
    if (end - w.l4_off < 8)
        return LB_DROP_ICMP_BAD;
    p->flags |= F_PKT_ICMP_ERR;
    p->inner_off = (uint16_t)inner;
    p->inner_l4_off = (uint16_t)w.l4_off;
    /* The quote is a packet of the flow going the other way: reverse it. */
    key_addrs(&p->key, d + inner, p->family, 1);
    p->key.sport = lb_load16(d + w.l4_off + 2);
    p->key.dport = lb_load16(d + w.l4_off);
    p->key.proto = w.proto;
    return LB_DROP_NONE;
}

/* 1 (and F_PKT_ECHO) for an echo request: ICMP type 8 / ICMPv6 type 128,
 * code 0, the 8-byte header present; over IPv6 without extension headers
 * (the reply swaps the addresses and keeps the rest). */
static int parse_echo(struct lb_pkt *p, uint32_t end)
{
    const uint8_t *ic = p->data + p->l4_off;

    if (end - p->l4_off < 8 || ic[1] != 0)
        return 0;
    if (p->family == LB_AF_INET ? ic[0] != 8 : (ic[0] != 128 || p->l4_off != 40))
        return 0;
    p->flags |= F_PKT_ECHO;
    return 1;
}

enum lb_drop_reason lb_parse(uint8_t *data, uint32_t len, struct lb_pkt *p)
{
    struct ip_walk w;
    enum lb_drop_reason r;

    memset(p, 0, sizeof(*p));
    p->data = data;
    p->len = len;
    if (len < 1)
        return LB_DROP_TRUNCATED;
    switch (data[0] >> 4) {
    case 4:
        p->family = LB_AF_INET;
        break;
    case 6:
        p->family = LB_AF_INET6;
        break;
    default:
        return LB_DROP_BAD_VERSION;
    }
    memset(&w, 0, sizeof(w));
    r = walk_ip(data, 0, len, p->family, 0, &w);
    if (r != LB_DROP_NONE) {
        if (r == LB_DROP_FRAGMENT)
            p->flags |= F_PKT_FRAGMENT;
        return r;
    }
    p->len = w.end;
    p->l4_off = (uint16_t)w.l4_off;
    p->proto = w.proto;
    p->key.family = p->family;
    p->key.proto = w.proto;
    key_addrs(&p->key, data, p->family, 0);
    if (w.frag) {
        p->flags |= F_PKT_FRAGMENT;
        p->frag_id = w.frag_id;
        p->frag_off = (uint16_t)w.frag_off;
        p->frag_len = (uint16_t)w.frag_len;
        p->frag_nh = w.frag_nh;
        p->frag_last = w.frag_last;
        if (w.frag_off)
            return LB_DROP_NONE;             /* a later fragment: no L4 header */
        if (w.proto != LB_IPPROTO_TCP && w.proto != LB_IPPROTO_UDP)
            return LB_DROP_FRAGMENT;
    }

    switch (w.proto) {
    case LB_IPPROTO_TCP:
        return parse_tcp(p, w.end);
    case LB_IPPROTO_UDP:
        return parse_udp(p, w.end);
    case LB_IPPROTO_ICMP:
        if (p->family != LB_AF_INET)
            return LB_DROP_UNSUPPORTED;
        if (parse_echo(p, w.end))
            return LB_DROP_NONE;
        return parse_icmp_err(p, w.end);
    case LB_IPPROTO_ICMPV6:
        if (p->family != LB_AF_INET6)
            return LB_DROP_UNSUPPORTED;
        if (parse_echo(p, w.end))
            return LB_DROP_NONE;
        return parse_icmp_err(p, w.end);
    default:
        return LB_DROP_UNSUPPORTED;
    }
}
