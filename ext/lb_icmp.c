/* lb_icmp.c - echo replies and rejects, see lb_icmp.h.
 *
 * Checksums: an echo reply is an incremental update (the type changes, the
 * addresses swap - a swap leaves every one's-complement sum unchanged - and
 * the IPv4 TTL is reset); an RST and an unreachable are new headers, summed
 * in full over their few dozen bytes plus, for an unreachable, its quote.
 */
#include <string.h>

#include "lb_bytes.h"
#include "lb_csum.h"
#include "lb_dp.h"
#include "lb_icmp.h"
#include "lb_out.h"
#include "lb_proto.h"

#define TTL 64u
#define IP4_QUOTE_MAX (576u - 28u)     /* RFC 1812 4.3.2.3: the reply fits 576 bytes */
#define IP6_QUOTE_MAX (1280u - 48u)    /* RFC 4443 2.4(c): ... fits the minimum MTU */

int lb_icmp_answerable(const struct lb_pkt *p)
{
    const uint8_t *s = p->key.src;
    static const uint8_t zero[16];

    if (p->family == LB_AF_INET)
        return s[0] != 0 && s[0] != 127 && s[0] < 224;
    return s[0] != 0xff && memcmp(s, zero, 16) != 0
        && !(memcmp(s, zero, 15) == 0 && s[15] == 1);
}

static void swap_addrs(uint8_t *d, uint8_t family)
{
    uint8_t tmp[16];
    size_t n = family == LB_AF_INET ? 4 : 16;
    uint8_t *src = d + (family == LB_AF_INET ? 12 : 8);
    uint8_t *dst = src + n;

    memcpy(tmp, src, n);
    memcpy(src, dst, n);
    memcpy(dst, tmp, n);
}

uint32_t lb_icmp_echo_reply(struct lb_pkt *p)
{
    uint8_t *d = p->data, *icmp = d + p->l4_off;
    uint16_t old = lb_load16(icmp), neu;

    if (!lb_icmp_answerable(p))
        return 0;
    icmp[0] = p->family == LB_AF_INET ? 0 : 129;
    neu = lb_load16(icmp);
    lb_store16(icmp + 2, lb_csum_update(lb_load16(icmp + 2), lb_csum_diff16(0, old, neu)));
    swap_addrs(d, p->family);
    if (p->family == LB_AF_INET) {
        uint16_t o = lb_load16(d + 8), n;
        d[8] = TTL;
        n = lb_load16(d + 8);
        lb_store16(d + 10, lb_csum_update(lb_load16(d + 10), lb_csum_diff16(0, o, n)));
    } else {
        d[7] = TTL;
    }
    return p->len;
}

int lb_reject_allow(struct lb_worker *w, uint32_t now)
{
    struct lb_dataplane *dp = w->dp;
    uint64_t n = dp->n_workers ? dp->n_workers : 1;
    uint64_t rate = dp->reject_rate;               /* per second, whole data plane */
    uint64_t cap = (uint64_t)dp->reject_burst * 1000u / n;
    uint32_t el = now - w->out.reject_last;

    if (!rate)
        return 0;
    if (cap < 1000u)
        cap = 1000u;
    if (el > 10000u)
        el = 10000u;
    w->out.reject_last = now;
    /* milli-tokens: rate/n per second = rate/n milli-tokens per ms */
    w->out.reject_tokens += (uint64_t)el * rate / n;
    if (w->out.reject_tokens > cap)
        w->out.reject_tokens = cap;
    if (w->out.reject_tokens < 1000u)
        return 0;
    w->out.reject_tokens -= 1000u;
    return 1;
}

/* A fresh IP header at d for a packet of l4len bytes of protocol proto from
 * src to dst (addresses of p's family); returns its length. */
static uint32_t ip_header(uint8_t *d, uint8_t family, const uint8_t *src, const uint8_t *dst,
                          uint8_t proto, uint32_t l4len)
{
    if (family == LB_AF_INET) {
        uint32_t tot = 20u + l4len;
        d[0] = 0x45;
        d[1] = 0;
        d[2] = (uint8_t)(tot >> 8);
        d[3] = (uint8_t)tot;
        d[4] = d[5] = 0;                     /* ID: DF is set, it never fragments */
        d[6] = 0x40;
        d[7] = 0;
        d[8] = TTL;
        d[9] = proto;
        d[10] = d[11] = 0;
        memcpy(d + 12, src, 4);
        memcpy(d + 16, dst, 4);
        uint16_t c = (uint16_t)~lb_csum_fold(lb_csum_partial(d, 20, 0));
        d[10] = (uint8_t)(c >> 8);
        d[11] = (uint8_t)c;
        return 20;
    }
    d[0] = 0x60;
    d[1] = d[2] = d[3] = 0;
    d[4] = (uint8_t)(l4len >> 8);
    d[5] = (uint8_t)l4len;
    d[6] = proto;
    d[7] = TTL;
    memcpy(d + 8, src, 16);
    memcpy(d + 24, dst, 16);
    return 40;
}

/* The transport checksum of the l4len bytes at l4 under the pseudo-header
 * of the IP header at d (RFC 793 / 768 / 8200 8.1; ICMPv4 has none). */
static uint16_t l4_csum(const uint8_t *d, uint8_t family, const uint8_t *l4, uint32_t l4len,
                        uint8_t proto, int pseudo)
{
    uint32_t sum = 0;
    uint8_t ph[8];

    if (pseudo) {
        if (family == LB_AF_INET) {
            sum = lb_csum_partial(d + 12, 8, 0);
            ph[0] = 0; ph[1] = proto; ph[2] = (uint8_t)(l4len >> 8); ph[3] = (uint8_t)l4len;
            sum = lb_csum_partial(ph, 4, sum);
        } else {
            sum = lb_csum_partial(d + 8, 32, 0);
            ph[0] = (uint8_t)(l4len >> 24); ph[1] = (uint8_t)(l4len >> 16);
            ph[2] = (uint8_t)(l4len >> 8); ph[3] = (uint8_t)l4len;
            ph[4] = ph[5] = ph[6] = 0; ph[7] = proto;
            sum = lb_csum_partial(ph, 8, sum);
        }
    }
    return (uint16_t)~lb_csum_fold(lb_csum_partial(l4, l4len, sum));
}

static inline void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

uint32_t lb_icmp_rst(struct lb_pkt *p)
{
    uint8_t *d = p->data, t[20], src[16], dst[16];
    const uint8_t *in = d + p->l4_off;
    uint32_t seg_len, hl, n = p->family == LB_AF_INET ? 4 : 16;
    uint8_t fl = p->tcp_flags;

    if ((fl & LB_TCP_RST) || !lb_icmp_answerable(p) || (p->flags & F_PKT_FRAGMENT))
        return 0;
    /* SEG.LEN: data + SYN + FIN; the data ends at the IP packet's end */
    seg_len = p->len - p->l4_off - (uint32_t)(in[12] >> 4) * 4u
        + ((fl & LB_TCP_SYN) ? 1u : 0u) + ((fl & LB_TCP_FIN) ? 1u : 0u);
    memset(t, 0, sizeof(t));
    memcpy(t, in + 2, 2);                    /* source port: the one asked for */
    memcpy(t + 2, in, 2);
    if (fl & LB_TCP_ACK) {
        memcpy(t + 4, in + 8, 4);            /* SEQ = SEG.ACK */
        t[13] = LB_TCP_RST;
    } else {
        put_be32(t + 8, lb_be32(in + 4) + seg_len);   /* ACK = SEG.SEQ + SEG.LEN */
        t[13] = LB_TCP_RST | LB_TCP_ACK;
    }
    t[12] = 5 << 4;
    memcpy(src, d + (n == 4 ? 16 : 24), n);  /* from the VIP ... */
    memcpy(dst, d + (n == 4 ? 12 : 8), n);   /* ... to the sender */
    hl = ip_header(d, p->family, src, dst, LB_IPPROTO_TCP, 20);
    memcpy(d + hl, t, 20);
    put_be16(d + hl + 16, l4_csum(d, p->family, d + hl, 20, LB_IPPROTO_TCP, 1));
    p->len = hl + 20;
    return p->len;
}

int lb_icmp_unreach(struct lb_worker *w, const struct lb_pkt *p, enum lb_unreach k)
{
    uint8_t *d, src[16], dst[16];
    const uint8_t *in = p->data;
    uint32_t n = p->family == LB_AF_INET ? 4 : 16, q, hl, l4len;
    uint8_t proto = p->family == LB_AF_INET ? LB_IPPROTO_ICMP : LB_IPPROTO_ICMPV6;

    if (!lb_icmp_answerable(p) || (p->flags & F_PKT_FRAGMENT && p->frag_off))
        return -1;
    d = lb_out_scratch(w);
    if (!d)
        return -1;
    q = p->len;
    if (q > (p->family == LB_AF_INET ? IP4_QUOTE_MAX : IP6_QUOTE_MAX))
        q = p->family == LB_AF_INET ? IP4_QUOTE_MAX : IP6_QUOTE_MAX;
    if (q > LB_OUT_SLOT - LB_OUT_HEADROOM - 48u)
        q = LB_OUT_SLOT - LB_OUT_HEADROOM - 48u;
    memcpy(src, in + (n == 4 ? 16 : 24), n);
    memcpy(dst, in + (n == 4 ? 12 : 8), n);
    l4len = 8 + q;
    hl = ip_header(d, p->family, src, dst, proto, l4len);
    memset(d + hl, 0, 8);
    if (p->family == LB_AF_INET) {
        d[hl] = 3;
        d[hl + 1] = k == LB_UNREACH_PORT ? 3 : 13;
    } else {
        d[hl] = 1;
        d[hl + 1] = k == LB_UNREACH_PORT ? 4 : 1;
    }
    memcpy(d + hl + 8, in, q);
    put_be16(d + hl + 2, l4_csum(d, p->family, d + hl, l4len, proto, p->family != LB_AF_INET));
    return lb_out_add(w, d, hl + l4len, LB_OUT_NO_SLOT, LB_OUT_REPLY);
}
