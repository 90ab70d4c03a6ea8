/* lb_nat.h - the NAT rewrite (RFC 1624 incremental checksums). */
#ifndef LB_NAT_H
#define LB_NAT_H
#include "lb_types.h"

/* Rewrite the parsed packet p in place for flow e:
 *   LB_DIR_FWD: destination VIP:vport -> backend:bport
 *   LB_DIR_REV: source backend:bport -> VIP:vport
 * IPv4 header checksum and TCP/UDP checksum are updated incrementally; a
 * zero UDP checksum over IPv4 stays zero. With F_PKT_CSUM_PARTIAL the L4
 * field holds the pseudo-header sum only (CHECKSUM_PARTIAL): only address
 * changes are folded in, not inverted. For F_PKT_ICMP_ERR the quoted header
 * is rewritten (inner addresses, ports, inner checksums) and the outer
 * address that names the flow's endpoint, plus the ICMP checksum. A later
 * fragment (F_PKT_FRAGMENT, frag_off > 0) has no transport header: only its
 * IP header is rewritten (lb_nat_rewrite_ip); the first fragment's
 * transport checksum, updated like any other, covers the whole datagram.
 * Not for an echo request (F_PKT_ECHO): that is answered, not translated. */
void lb_nat_rewrite(struct lb_pkt *p, const struct lb_flow_entry *e, enum lb_dir dir);

/* The IP-header part of the rewrite, for the IP packet at d: the address
 * (destination FWD, source REV) and the IPv4 header checksum. */
void lb_nat_rewrite_ip(uint8_t *d, uint8_t family, const struct lb_flow_entry *e,
                       enum lb_dir dir);
#endif
