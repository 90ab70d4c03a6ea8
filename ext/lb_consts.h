/* lb_consts.h - limits and tunables of the data plane.
 *
 * Every limit is #ifndef-overridable at build time (-DLB_RING_SIZE=...), as in
 * katran's balancer_consts.h. Units are in the comment after each value.
 */
#ifndef LB_CONSTS_H
#define LB_CONSTS_H

#ifndef LB_RING_SIZE
#define LB_RING_SIZE 65537u          /* default Maglev table size M (prime) */
#endif
#ifndef LB_RING_SIZE_MAX
#define LB_RING_SIZE_MAX 16777213u   /* largest accepted M (prime, < 2^24) */
#endif
#ifndef LB_MAX_BACKENDS
#define LB_MAX_BACKENDS 65534u       /* per VIP; ring entries are uint16_t */
#endif
#define LB_RING_EMPTY 0xFFFFu        /* ring slot owned by no backend */

#ifndef LB_MAX_VIPS
#define LB_MAX_VIPS 4096u
#endif
#ifndef LB_MAX_STAT_IDS
#define LB_MAX_STAT_IDS 65536u       /* stats slots for VIPs and backends */
#endif

#ifndef LB_FLOW_MAX
#define LB_FLOW_MAX (16u << 20)      /* flow-table capacity limit: 16M flows */
#endif

#ifndef LB_BATCH
#define LB_BATCH 64u                 /* packets per lb_pipeline_run call, at most */
#endif
#ifndef LB_TUN_BATCH
#define LB_TUN_BATCH 32u             /* packets a TUN worker reads before it runs them */
#endif
#ifndef LB_PKT_MAX
#define LB_PKT_MAX 65550u            /* largest packet incl. vnet header (GSO) */
#endif

/* Default idle timeouts, milliseconds (see README "Flow table"). Chosen like
 * IPVS (established 15 min, SYN 1 min, FIN 2 min, close 10 s); UDP like
 * nf_conntrack: 30 s until the backend has replied, 120 s once it has. */
#define LB_TMO_TCP_SYN_MS    (60u * 1000u)
#define LB_TMO_TCP_EST_MS    (900u * 1000u)
#define LB_TMO_TCP_FIN_MS    (120u * 1000u)
#define LB_TMO_TCP_CLOSE_MS  (10u * 1000u)
#define LB_TMO_UDP_MS        (30u * 1000u)
#define LB_TMO_UDP_STREAM_MS (120u * 1000u)

/* flag bits of struct lb_backend.flags */
#define F_BACKEND_DRAINING (1u << 0) /* no new flows; existing ones stay */

/* flag bits of struct lb_pkt.flags */
#define F_PKT_CSUM_PARTIAL (1u << 0) /* L4 csum holds only the pseudo-header sum
                                        (virtio NEEDS_CSUM / CHECKSUM_PARTIAL) */
#define F_PKT_ICMP_ERR     (1u << 1) /* ICMP error quoting a TCP/UDP header */
#define F_PKT_FRAGMENT     (1u << 2) /* an IP fragment (frag_* fields of lb_pkt) */
#define F_PKT_ECHO         (1u << 3) /* ICMP/ICMPv6 echo request */

/* Fragment cache (lb_frag.h) defaults; sizes are set at start from the config. */
#ifndef LB_FRAG_ENTRIES
#define LB_FRAG_ENTRIES 4096u        /* datagrams in flight remembered at most */
#endif
#ifndef LB_FRAG_BUFFERS
#define LB_FRAG_BUFFERS 1024u        /* early fragments held at most (2 KiB each) */
#endif
#define LB_FRAG_TIMEOUT_MS 2000u     /* a datagram's decision / held fragments live this long */
#define LB_FRAG_SLOT 2048u           /* bytes per held-fragment buffer, headroom included */
#define LB_FRAG_HOLD_MAX 64u         /* held fragments per datagram at most */

/* Extra packets a batch may send besides its own (lb_out.h) */
#define LB_OUT_MAX 256u              /* released fragments + generated ICMP, per batch */
#define LB_OUT_SCRATCH 32u           /* generated ICMP errors per batch */
#define LB_OUT_SLOT 1408u            /* bytes per generated packet, headroom included */
#define LB_OUT_HEADROOM 64u          /* writable bytes before every extra packet:
                                        room for a virtio_net_hdr and an Ethernet header */

/* Rejects (RST, ICMP unreachable) per second and burst, per data plane;
 * like the kernel's icmp_msgs_per_sec / icmp_msgs_burst. */
#define LB_REJECT_RATE  1000u
#define LB_REJECT_BURST 50u

#ifndef LB_CLIENT_ENTRIES
#define LB_CLIENT_ENTRIES 65536u     /* per-client table (limits, persistence) */
#endif

#endif
