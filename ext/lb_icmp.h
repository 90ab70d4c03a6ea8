/* lb_icmp.h - what the data plane answers itself, for a VIP address:
 * ICMP/ICMPv6 echo (ping), and rejects - a TCP RST or an ICMP/ICMPv6
 * destination unreachable - for a closed port or a refused new flow.
 *
 * Echo replies and RSTs are built in place (the answer is never longer
 * than the question); an unreachable quotes the packet and so is longer: it
 * is built in the worker's scratch area and goes on its out list
 * (lb_out.h). Rejects are rate-limited like the kernel's ICMP
 * (icmp_msgs_per_sec / icmp_msgs_burst): a token bucket per worker, each
 * worker with its share of the data plane's rate; a suppressed reject is a
 * silent drop, counted reject_limited. Nothing is ever sent to a
 * multicast, broadcast or unspecified source, in answer to an RST or to an
 * ICMP error, or about a later fragment. */
#ifndef LB_ICMP_H
#define LB_ICMP_H
#include <stdint.h>
#include "lb_types.h"

struct lb_worker;

/* Kinds of unreachable (the ICMP code depends on the family). */
enum lb_unreach {
    LB_UNREACH_PORT = 0,     /* closed port: port unreachable (3/3; v6 1/4) */
    LB_UNREACH_ADMIN = 1,    /* refused by a limit: administratively prohibited
                                (3/13; v6 1/1) */
};

/* 1 if the source of p may be answered at all (not multicast, broadcast,
 * unspecified or loopback). */
int lb_icmp_answerable(const struct lb_pkt *p);

/* Turn the echo request p (F_PKT_ECHO, to a VIP) into its reply in place.
 * Returns the reply's length (p->len) or 0 when it cannot be answered. */
uint32_t lb_icmp_echo_reply(struct lb_pkt *p);

/* Take one reject token of worker w at now; 1 = may send. */
int lb_reject_allow(struct lb_worker *w, uint32_t now);

/* Turn the TCP segment p into the RST that answers it, in place (RFC 9293
 * 3.10.7.1, "If the connection does not exist"). Returns the RST's length,
 * 0 when p must not be answered (an RST itself). */
uint32_t lb_icmp_rst(struct lb_pkt *p);

/* Build the unreachable of kind k that answers p into w's scratch area and
 * append it to w's out list. 0, or -1 when there was no room. */
int lb_icmp_unreach(struct lb_worker *w, const struct lb_pkt *p, enum lb_unreach k);
#endif
