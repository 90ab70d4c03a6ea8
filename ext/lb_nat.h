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
 * address that names the flow's endpoint, plus the ICMP checksum. */
void lb_nat_rewrite(struct lb_pkt *p, const struct lb_flow_entry *e, enum lb_dir dir);
#endif
