/* lb_proto.h - IP protocol numbers and TCP flag bits, one copy for every
 * stage. Own names (LB_ prefix) rather than <netinet/in.h>'s, so that a file
 * reads the same whatever the libc headers define. */
#ifndef LB_PROTO_H
#define LB_PROTO_H

/* IP protocol numbers (IANA; the IPv6 ones are extension headers) */
#define LB_IPPROTO_HOPOPTS  0
#define LB_IPPROTO_ICMP     1
#define LB_IPPROTO_TCP      6
#define LB_IPPROTO_UDP      17
#define LB_IPPROTO_ROUTING  43
#define LB_IPPROTO_FRAGMENT 44
#define LB_IPPROTO_AH       51
#define LB_IPPROTO_ICMPV6   58
#define LB_IPPROTO_DSTOPTS  60

/* TCP flag bits (the flags byte, RFC 9293) */
#define LB_TCP_FIN 0x01u
#define LB_TCP_SYN 0x02u
#define LB_TCP_RST 0x04u
#define LB_TCP_ACK 0x10u

#endif
