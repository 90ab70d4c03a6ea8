# consts.pxi - Python-visible mirrors of lb_consts.h / lb_types.h.
RING_SIZE = LB_RING_SIZE
RING_SIZE_MAX = LB_RING_SIZE_MAX
MAX_BACKENDS = LB_MAX_BACKENDS
RING_EMPTY = LB_RING_EMPTY
MAX_VIPS = LB_MAX_VIPS
MAX_STAT_IDS = LB_MAX_STAT_IDS
FLOW_MAX = LB_FLOW_MAX
BATCH = LB_BATCH
PKT_MAX = LB_PKT_MAX

VERDICT_TX = LB_TX
VERDICT_DROP = LB_DROP
VERDICT_PASS = LB_PASS
VERDICT_REPLY = LB_REPLY
VERDICT_HOLD = LB_HOLD
VERDICT_NAMES = {LB_TX: "tx", LB_DROP: "drop", LB_PASS: "pass", LB_REPLY: "reply",
                 LB_HOLD: "hold"}

DIR_FWD = LB_DIR_FWD
DIR_REV = LB_DIR_REV

# index = enum lb_drop_reason; these names are the `reason` label of
# lbcore_drops_total and the keys of Dataplane.stats()["drops"].
DROP_REASONS = (
    "none", "truncated", "bad_version", "bad_ihl", "bad_totlen", "bad_exthdr",
    "fragment", "bad_l4", "unsupported", "no_vip", "no_backend",
    "icmp_no_flow", "icmp_bad", "bad_vnet", "flow_full", "no_neigh", "bad_l2",
    "frag_early", "closed_port", "limit_flows", "limit_rate", "new_flow_rate",
    "hold_overflow", "hold_timeout", "no_route", "ttl_exceeded",
)
assert len(DROP_REASONS) == LB_DROP__COUNT

FLOW_STATES = {LB_FS_SYN: "syn", LB_FS_EST: "established", LB_FS_FIN: "fin",
               LB_FS_CLOSE: "close", LB_FS_UDP: "udp", LB_FS_UDP_STREAM: "udp_stream"}

DEFAULT_TIMEOUTS_MS = {
    "tcp_syn": LB_TMO_TCP_SYN_MS, "tcp_established": LB_TMO_TCP_EST_MS,
    "tcp_fin": LB_TMO_TCP_FIN_MS, "tcp_close": LB_TMO_TCP_CLOSE_MS,
    "udp": LB_TMO_UDP_MS, "udp_stream": LB_TMO_UDP_STREAM_MS,
}

# fragment cache, reject rate and per-client table defaults (lb_consts.h)
FRAG_ENTRIES = LB_FRAG_ENTRIES
FRAG_BUFFERS = LB_FRAG_BUFFERS
FRAG_TIMEOUT_MS = LB_FRAG_TIMEOUT_MS
FRAG_SLOT = LB_FRAG_SLOT
REJECT_RATE = LB_REJECT_RATE
REJECT_BURST = LB_REJECT_BURST
CLIENT_ENTRIES = LB_CLIENT_ENTRIES
