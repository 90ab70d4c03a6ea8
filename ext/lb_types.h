/* lb_types.h - the structs shared by every stage of the packet path.
 *
 * Byte order is in the comment of each field: "be" fields hold network order,
 * exactly as they stand in the packet, so the hot path never swaps them.
 * Addresses are 16 bytes: IPv4 uses the first 4 and zeroes the rest, so a
 * key of either family hashes and compares as one fixed-size blob.
 */
#ifndef LB_TYPES_H
#define LB_TYPES_H

#include <stdint.h>
#include <stddef.h>
#include "lb_consts.h"

#define LB_AF_INET  4
#define LB_AF_INET6 6

/* What the pipeline decides for one packet. */
enum lb_verdict {
    LB_TX = 0,    /* rewritten in place: send it */
    LB_DROP = 1,  /* drop; the reason is counted */
    LB_PASS = 2,  /* from a backend's address but no reply of any flow (its own
                     traffic through the gateway): handed back to the kernel
                     unchanged (tun: written back to the TUN, routed by the
                     main table; rawsock: routed by the worker itself, as
                     the kernel would: TTL / hop limit decremented) */
    LB_REPLY = 3, /* answered in place (echo reply, RST): send it back the way
                     it came, i.e. routed to its new destination, the sender */
    LB_HOLD = 4,  /* kept by the data plane (a fragment that came before its
                     first fragment, copied to the fragment cache): the
                     buffer is free again, nothing is sent now */
};

/* Why a packet was dropped. Counted per worker; names in consts.pxi. */
enum lb_drop_reason {
    LB_DROP_NONE = 0,
    LB_DROP_TRUNCATED,      /* buffer shorter than a header says */
    LB_DROP_BAD_VERSION,    /* IP version neither 4 nor 6 */
    LB_DROP_BAD_IHL,        /* IPv4 header length < 20 or > packet */
    LB_DROP_BAD_TOTLEN,     /* IPv4 total / IPv6 payload length inconsistent */
    LB_DROP_BAD_EXTHDR,     /* IPv6 extension header chain malformed / too long */
    LB_DROP_FRAGMENT,       /* IP fragment: no ports to balance on */
    LB_DROP_BAD_L4,         /* TCP data offset / UDP length bad */
    LB_DROP_UNSUPPORTED,    /* protocol other than TCP/UDP/ICMP error */
    LB_DROP_NO_VIP,         /* no VIP, no flow, no known backend */
    LB_DROP_NO_BACKEND,     /* VIP has no usable backend */
    LB_DROP_ICMP_NO_FLOW,   /* ICMP error quoting an untracked flow */
    LB_DROP_ICMP_BAD,       /* ICMP error with an unusable quote */
    LB_DROP_BAD_VNET,       /* virtio_net_hdr inconsistent with the packet */
    LB_DROP_FLOW_FULL,      /* new flow, table full of established flows;
                               counted, but the packet is still forwarded */
    LB_DROP_NO_NEIGH,       /* rawsock: no route or no MAC for the next hop */
    LB_DROP_BAD_L2,         /* rawsock: truncated, VLAN-tagged or non-IP frame */
    LB_DROP_FRAG_EARLY,     /* a later fragment before its first, no room to hold it */
    LB_DROP_CLOSED_PORT,    /* to a VIP address on a port no VIP serves (counted
                               also when answered: closed_port "reject") */
    LB_DROP_LIMIT_FLOWS,    /* new flow over the VIP's max_flows (counted also when
                               answered: limit_action "reject"); so the next two */
    LB_DROP_LIMIT_RATE,     /* new flow over the client's new-flow rate */
    LB_DROP_NEW_FLOW_RATE,  /* new flow over the VIP's new_flow_rate (overload guard) */
    LB_DROP_HOLD_OVERFLOW,  /* rawsock: next hop unresolved and its hold queue full */
    LB_DROP_HOLD_TIMEOUT,   /* rawsock: held for a next hop that did not resolve in time */
    LB_DROP_NO_ROUTE,       /* rawsock: a passed packet no route of any link covers (or
                               to a multicast, broadcast or link-local address) */
    LB_DROP_TTL_EXCEEDED,   /* rawsock: a passed packet whose TTL / hop limit ran out */
    LB_DROP__COUNT
};

/* A 5-tuple as it stands in a packet. 40 bytes, no holes. */
struct lb_flow_key {
    uint8_t  src[16];     /* be */
    uint8_t  dst[16];     /* be */
    uint16_t sport;       /* be */
    uint16_t dport;       /* be */
    uint8_t  proto;       /* IPPROTO_TCP / IPPROTO_UDP */
    uint8_t  family;      /* LB_AF_INET / LB_AF_INET6 */
    uint8_t  pad[2];      /* always zero */
};

/* A parsed packet: offsets into the caller's buffer, validated against len. */
struct lb_pkt {
    uint8_t *data;         /* first byte of the IP header */
    uint32_t len;          /* bytes of IP packet in the buffer */
    uint16_t l4_off;       /* offset of the TCP/UDP/ICMP header */
    uint8_t  family;       /* LB_AF_INET / LB_AF_INET6 */
    uint8_t  proto;        /* L4 protocol (after IPv6 extension headers) */
    uint8_t  tcp_flags;    /* TCP flags byte, 0 for UDP/ICMP */
    uint8_t  flags;        /* F_PKT_* */
    uint16_t inner_off;    /* ICMP error: offset of the quoted IP header */
    uint16_t inner_l4_off; /* ICMP error: offset of the quoted L4 header */
    uint16_t frag_off;     /* F_PKT_FRAGMENT: offset of this fragment's data, bytes */
    struct lb_flow_key key;   /* outer 5-tuple (ICMP error: the quote's,
                                 reversed, i.e. the direction of the error;
                                 a later fragment: addresses and protocol, no ports) */
    uint32_t frag_id;      /* F_PKT_FRAGMENT: IPv4 ID / IPv6 fragment id, as stored */
    uint16_t frag_len;     /* F_PKT_FRAGMENT: bytes of fragment data in this packet */
    uint8_t  frag_nh;      /* F_PKT_FRAGMENT: protocol of the fragment key (IPv4
                              protocol; IPv6: the Fragment header's next header) */
    uint8_t  frag_last;    /* F_PKT_FRAGMENT: 1 if this is the last fragment (no MF) */
};

/* One backend of a VIP, as the data plane sees it. */
struct lb_backend {
    uint8_t  addr[16];    /* be */
    uint16_t port;        /* be */
    uint8_t  family;
    uint8_t  flags;       /* F_BACKEND_* */
    uint32_t stat_id;     /* counters slot, stable across rebuilds */
    uint32_t weight;      /* host order; 0 = in no ring slot */
};

/* One VIP with its Maglev ring. */
struct lb_vip {
    uint8_t  addr[16];    /* be */
    uint16_t port;        /* be */
    uint8_t  proto;
    uint8_t  family;
    uint32_t stat_id;
    uint32_t ring_size;   /* M, prime */
    uint32_t n_backends;
    uint16_t *ring;       /* M slots of backend indexes, LB_RING_EMPTY = none */
    struct lb_backend *backends;
    /* per-VIP traffic settings (0 = off / default) */
    uint8_t  closed_port;     /* LB_CLOSED_*: the ports of this address no VIP serves */
    uint8_t  persistence;     /* LB_PERSIST_* */
    uint8_t  limit_action;    /* LB_ACTION_*: what an over-limit new flow gets */
    uint8_t  pad2;
    uint32_t max_flows;       /* tracked flows of this VIP at most */
    uint32_t client_rate;     /* new flows per second per client address */
    uint32_t client_burst;    /* ... in a burst of at most this many */
    uint32_t new_flow_rate;   /* new flows per second of the whole VIP */
    uint32_t new_flow_burst;
    uint32_t persist_ms;      /* persistence: a client keeps its backend this long
                                 after its last new flow */
};

#define LB_CLOSED_DROP    0
#define LB_CLOSED_REJECT  1
#define LB_PERSIST_NONE   0
#define LB_PERSIST_SOURCE 1
#define LB_ACTION_DROP    0
#define LB_ACTION_REJECT  1

/* The forwarding state: immutable once published; replaced as a whole. */
struct lb_table {
    uint64_t sel_seed;    /* selection hash seed, from the config */
    uint32_t n_vips;
    uint32_t pad;
    struct lb_vip *vips;
};

/* TCP state of a tracked connection (enum lb_flow_state). */
enum lb_flow_state {
    LB_FS_SYN = 0,        /* half-open: client SYN seen, not yet confirmed */
    LB_FS_EST = 1,        /* established (or picked up mid-stream) */
    LB_FS_FIN = 2,        /* FIN seen in either direction */
    LB_FS_CLOSE = 3,      /* RST seen */
    LB_FS_UDP = 4,        /* UDP, no reply yet */
    LB_FS_UDP_STREAM = 5, /* UDP, backend has replied */
};

/* Direction of a packet relative to its flow. */
enum lb_dir {
    LB_DIR_FWD = 0,       /* client -> VIP (becomes client -> backend) */
    LB_DIR_REV = 1,       /* backend -> client (becomes VIP -> client) */
};

/* A tracked connection: the NAT translation for both directions.
 * Found by its forward key (client, vip, cport, vport, proto) and by its
 * reverse key (backend, client, bport, cport, proto). */
struct lb_flow_entry {
    uint8_t  client[16];  /* be */
    uint8_t  vip[16];     /* be */
    uint8_t  backend[16]; /* be */
    uint16_t cport;       /* be */
    uint16_t vport;       /* be */
    uint16_t bport;       /* be */
    uint8_t  proto;
    uint8_t  family;
    uint8_t  state;       /* enum lb_flow_state */
    uint8_t  flags;       /* F_FLOW_* (lb_flow.h) */
    uint16_t pad1;
    uint32_t vip_stat;    /* counters slot of the VIP */
    uint32_t be_stat;     /* counters slot of the backend */
    uint32_t last_seen;   /* ms, wrap-safe compare, table's clock */
};

/* Idle timeouts, ms. */
struct lb_timeouts {
    uint32_t tcp_syn, tcp_est, tcp_fin, tcp_close, udp, udp_stream;
};

/* Per-worker counters. Each worker writes only its own; Python sums them. */
struct lb_counter {
    uint64_t packets;
    uint64_t bytes;
    uint64_t new_flows;
    uint64_t limit_flows;     /* VIP: new flows refused by max_flows */
    uint64_t limit_rate;      /* VIP: new flows refused by client_rate */
    uint64_t shed;            /* VIP: new flows refused by new_flow_rate */
};

struct lb_stats {
    uint64_t rx, tx, rx_bytes, tx_bytes;
    uint64_t flow_hit, flow_miss, flow_new;
    uint64_t loops, batches;     /* worker loop iterations / non-empty batches */
    uint64_t spin_ns;            /* busy polling an empty queue (busy_poll_us): time
                                    bought for latency, not spent on packets */
    uint64_t tx_errors;          /* write() to the device failed */
    uint64_t echo_replies;       /* ICMP/ICMPv6 echo requests to a VIP answered */
    uint64_t resets;             /* TCP RSTs sent (closed port, limit reject) */
    uint64_t unreachables;       /* ICMP/ICMPv6 unreachables sent */
    uint64_t rejects_limited;    /* rejects not sent: over the reject rate */
    uint64_t out_dropped;        /* extra packets (released fragments, ICMP
                                    errors) that did not fit the batch's out list */
    uint64_t passed;             /* LB_PASS: a backend's packets that are no reply
                                    (fragments included), handed back unchanged */
    uint64_t drops[LB_DROP__COUNT];
    struct lb_counter *vip;      /* [LB_MAX_STAT_IDS], indexed by stat_id */
    struct lb_counter *backend;  /* [LB_MAX_STAT_IDS] */
};

#endif
