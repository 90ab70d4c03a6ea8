/* lb_parse.h - bounds-checked IPv4/IPv6/TCP/UDP/ICMP-error parsing. */
#ifndef LB_PARSE_H
#define LB_PARSE_H
#include <stdint.h>
#include "lb_types.h"

/* Parse the IP packet in data[0..len) into *p. Returns LB_DROP_NONE, or the
 * reason to drop it. Never reads outside data[0..len).
 *
 * For TCP/UDP, p->key is the packet's 5-tuple. For an ICMP/ICMPv6 error
 * (dest unreachable, packet too big, time exceeded, parameter problem) that
 * quotes a TCP/UDP header, F_PKT_ICMP_ERR is set, p->proto is the ICMP
 * protocol, and p->key is the QUOTED 5-tuple REVERSED (key.proto = the quoted
 * L4 protocol): the direction in which the error travels, so the pipeline
 * looks it up like any other packet of that flow. An echo request returns
 * LB_DROP_NONE with F_PKT_ECHO (ports 0); other ICMP LB_DROP_UNSUPPORTED.
 * A fragment has F_PKT_FRAGMENT and the frag_* fields; a later one
 * (frag_off > 0) has no ports (see lb_parse.c for the rules). */
enum lb_drop_reason lb_parse(uint8_t *data, uint32_t len, struct lb_pkt *p);
#endif
