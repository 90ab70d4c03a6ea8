# lb.pxd - every C declaration the Cython layer uses, nothing else.
# Mirrors ext/lb_*.h; all of it is nogil (the C side never touches Python).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "lb_consts.h" nogil:
    const uint32_t LB_RING_SIZE
    const uint32_t LB_RING_SIZE_MAX
    const uint32_t LB_MAX_BACKENDS
    const uint32_t LB_RING_EMPTY
    const uint32_t LB_MAX_VIPS
    const uint32_t LB_MAX_STAT_IDS
    const uint32_t LB_FLOW_MAX
    const uint32_t LB_BATCH
    const uint32_t LB_PKT_MAX
    const uint32_t F_BACKEND_DRAINING
    const uint32_t F_PKT_CSUM_PARTIAL
    const uint32_t F_PKT_ICMP_ERR
    const uint32_t F_PKT_FRAGMENT
    const uint32_t F_PKT_ECHO
    const uint32_t LB_FRAG_ENTRIES
    const uint32_t LB_FRAG_BUFFERS
    const uint32_t LB_FRAG_TIMEOUT_MS
    const uint32_t LB_FRAG_SLOT
    const uint32_t LB_OUT_MAX
    const uint32_t LB_REJECT_RATE
    const uint32_t LB_REJECT_BURST
    const uint32_t LB_CLIENT_ENTRIES
    const uint32_t LB_TMO_TCP_SYN_MS
    const uint32_t LB_TMO_TCP_EST_MS
    const uint32_t LB_TMO_TCP_FIN_MS
    const uint32_t LB_TMO_TCP_CLOSE_MS
    const uint32_t LB_TMO_UDP_MS
    const uint32_t LB_TMO_UDP_STREAM_MS

cdef extern from "lb_types.h" nogil:
    const int LB_AF_INET
    const int LB_AF_INET6

    enum lb_verdict:
        LB_TX
        LB_DROP
        LB_PASS
        LB_REPLY
        LB_HOLD

    enum lb_drop_reason:
        LB_DROP_NONE
        LB_DROP_TRUNCATED
        LB_DROP_BAD_VERSION
        LB_DROP_BAD_IHL
        LB_DROP_BAD_TOTLEN
        LB_DROP_BAD_EXTHDR
        LB_DROP_FRAGMENT
        LB_DROP_BAD_L4
        LB_DROP_UNSUPPORTED
        LB_DROP_NO_VIP
        LB_DROP_NO_BACKEND
        LB_DROP_ICMP_NO_FLOW
        LB_DROP_ICMP_BAD
        LB_DROP_BAD_VNET
        LB_DROP_FLOW_FULL
        LB_DROP_NO_NEIGH
        LB_DROP_BAD_L2
        LB_DROP_FRAG_EARLY
        LB_DROP_CLOSED_PORT
        LB_DROP_LIMIT_FLOWS
        LB_DROP_LIMIT_RATE
        LB_DROP_NEW_FLOW_RATE
        LB_DROP__COUNT

    const int LB_CLOSED_DROP
    const int LB_CLOSED_REJECT
    const int LB_PERSIST_NONE
    const int LB_PERSIST_SOURCE
    const int LB_ACTION_DROP
    const int LB_ACTION_REJECT

    enum lb_flow_state:
        LB_FS_SYN
        LB_FS_EST
        LB_FS_FIN
        LB_FS_CLOSE
        LB_FS_UDP
        LB_FS_UDP_STREAM

    enum lb_dir:
        LB_DIR_FWD
        LB_DIR_REV

    struct lb_flow_key:
        uint8_t src[16]
        uint8_t dst[16]
        uint16_t sport
        uint16_t dport
        uint8_t proto
        uint8_t family
        uint8_t pad[2]

    struct lb_pkt:
        uint8_t *data
        uint32_t len
        uint16_t l4_off
        uint8_t family
        uint8_t proto
        uint8_t tcp_flags
        uint8_t flags
        uint16_t inner_off
        uint16_t inner_l4_off
        uint16_t frag_off
        lb_flow_key key
        uint32_t frag_id
        uint16_t frag_len
        uint8_t frag_nh
        uint8_t frag_last

    struct lb_backend:
        uint8_t addr[16]
        uint16_t port
        uint8_t family
        uint8_t flags
        uint32_t stat_id
        uint32_t weight

    struct lb_vip:
        uint8_t addr[16]
        uint16_t port
        uint8_t proto
        uint8_t family
        uint32_t stat_id
        uint32_t ring_size
        uint32_t n_backends
        uint16_t *ring
        lb_backend *backends
        uint8_t closed_port
        uint8_t persistence
        uint8_t limit_action
        uint32_t max_flows
        uint32_t client_rate
        uint32_t client_burst
        uint32_t new_flow_rate
        uint32_t new_flow_burst
        uint32_t persist_ms

    struct lb_table:
        uint64_t sel_seed
        uint32_t n_vips
        lb_vip *vips

    struct lb_flow_entry:
        uint8_t client[16]
        uint8_t vip[16]
        uint8_t backend[16]
        uint16_t cport
        uint16_t vport
        uint16_t bport
        uint8_t proto
        uint8_t family
        uint8_t state
        uint8_t flags
        uint16_t pad1
        uint32_t vip_stat
        uint32_t be_stat
        uint32_t last_seen

    struct lb_timeouts:
        uint32_t tcp_syn, tcp_est, tcp_fin, tcp_close, udp, udp_stream

    struct lb_counter:
        uint64_t packets
        uint64_t bytes
        uint64_t new_flows
        uint64_t limit_flows
        uint64_t limit_rate
        uint64_t shed

    struct lb_stats:
        uint64_t rx, tx, rx_bytes, tx_bytes
        uint64_t flow_hit, flow_miss, flow_new
        uint64_t loops, batches
        uint64_t spin_ns
        uint64_t tx_errors
        uint64_t echo_replies
        uint64_t resets
        uint64_t unreachables
        uint64_t rejects_limited
        uint64_t out_dropped
        uint64_t passed
        uint64_t drops[<int>LB_DROP__COUNT]
        lb_counter *vip
        lb_counter *backend

cdef extern from "lb_hash.h" nogil:
    uint64_t lb_hash_bytes(const void *data, size_t n, uint64_t seed)
    uint64_t lb_hash_flow(const lb_flow_key *k, uint64_t seed)

cdef extern from "lb_maglev.h" nogil:
    int lb_maglev_is_prime(uint32_t n)
    int lb_maglev_populate(uint16_t *ring, uint32_t M, const lb_backend *backends,
                           uint32_t n, uint64_t seed)
    uint32_t lb_maglev_slot(uint64_t hash, uint32_t M)
    uint16_t lb_maglev_pick(const lb_vip *vip, const lb_flow_key *k, uint64_t seed)

cdef extern from "lb_flow.h" nogil:
    const uint32_t F_FLOW_REV_SEEN
    const uint32_t F_FLOW_EST_SEEN
    const size_t LB_FLOW_KEYBYTES
    struct lb_flowtable:
        pass
    struct lb_flow_counters:
        uint64_t inserted
        uint64_t refused_full
        uint64_t refused_exists
        uint64_t evicted_expired
        uint64_t evicted_halfopen
        uint64_t evicted_udp
        uint64_t expired
        uint64_t deleted
    lb_flowtable *lb_flow_new(uint32_t capacity, uint64_t seed, const lb_timeouts *tmo)
    void lb_flow_free(lb_flowtable *ft)
    void lb_flow_set_timeouts(lb_flowtable *ft, const lb_timeouts *tmo)
    void lb_flow_default_timeouts(lb_timeouts *tmo)
    int lb_flow_lookup(lb_flowtable *ft, const lb_flow_key *k, lb_dir dir,
                       uint8_t tcp_flags, uint32_t now, lb_flow_entry *out)
    uint32_t lb_flow_lookup_batch(lb_flowtable *ft, const lb_flow_key *const *keys,
                                  const uint8_t *dirs, const uint8_t *tcp_flags, uint32_t n,
                                  uint32_t now, lb_flow_entry *out, uint8_t *hit)
    int lb_flow_insert(lb_flowtable *ft, lb_flow_entry *e, uint32_t now)
    int lb_flow_delete(lb_flowtable *ft, const lb_flow_key *k)
    uint32_t lb_flow_expire(lb_flowtable *ft, uint32_t now, uint32_t max)
    uint32_t lb_flow_purge_backend(lb_flowtable *ft, const uint8_t *addr16,
                                   uint16_t port_be, uint8_t proto)
    uint32_t lb_flow_walk(lb_flowtable *ft, uint32_t *cursor, lb_flow_entry *out, uint32_t max)
    struct lb_flow_filter:
        uint8_t vip[16]
        uint16_t vport
        uint8_t proto
        uint8_t family
    uint32_t lb_flow_walk_filter(lb_flowtable *ft, uint32_t *cursor, lb_flow_entry *out,
                                 uint32_t max, const lb_flow_filter *f)
    uint32_t lb_flow_count(const lb_flowtable *ft)
    uint32_t lb_flow_capacity(const lb_flowtable *ft)
    size_t lb_flow_memory(const lb_flowtable *ft)
    void lb_flow_get_counters(const lb_flowtable *ft, lb_flow_counters *out)
    uint32_t lb_flow_active_backend(const lb_flowtable *ft, uint32_t be_stat)
    uint32_t lb_flow_active_vip(const lb_flowtable *ft, uint32_t vip_stat)
    int lb_flow_check(lb_flowtable *ft)
    int lb_flow_insert_seen(lb_flowtable *ft, lb_flow_entry *e, uint32_t now, uint32_t seen)
    uint32_t lb_flow_expire_report(lb_flowtable *ft, uint32_t now, uint32_t max,
                                   lb_flow_entry *gone, uint32_t gone_cap, uint32_t *n_gone)
    const uint32_t LB_FLOW_LAYOUT_VERSION
    uint32_t lb_flow_slot_size()
    uint64_t lb_flow_layout_sig()
    int lb_flow_entry_valid(const lb_flow_entry *e)
    ctypedef int (*lb_flow_bind_fn)(void *ctx, lb_flow_entry *e)
    struct lb_flow_adopt_stats:
        uint32_t adopted
        uint32_t invalid
        uint32_t expired
        uint32_t unbound
        uint32_t duplicate
        uint32_t full
    int lb_flow_adopt(lb_flowtable *ft, const void *old_slots, uint32_t old_capacity,
                      uint32_t now, lb_flow_bind_fn bind, void *ctx, lb_flow_adopt_stats *st)
    int lb_flow_touch(lb_flowtable *ft, const lb_flow_key *k, uint32_t seen, lb_flow_entry *out)
    void lb_flow_key_fwd(const lb_flow_entry *e, lb_flow_key *k)
    void lb_flow_key_rev(const lb_flow_entry *e, lb_flow_key *k)

cdef extern from "lb_parse.h" nogil:
    lb_drop_reason lb_parse(uint8_t *data, uint32_t len, lb_pkt *p)

cdef extern from "lb_nat.h" nogil:
    void lb_nat_rewrite(lb_pkt *p, const lb_flow_entry *e, lb_dir dir)
    void lb_nat_rewrite_ip(uint8_t *d, uint8_t family, const lb_flow_entry *e, lb_dir dir)

cdef extern from "lb_table.h" nogil:
    lb_table *lb_table_new(uint32_t n_vips, uint64_t sel_seed)
    int lb_table_set_vip(lb_table *t, uint32_t i, const lb_vip *vip,
                         const lb_backend *backends, uint32_t n)
    int lb_table_seal(lb_table *t)
    void lb_table_free(lb_table *t)
    const lb_vip *lb_table_find_vip(const lb_table *t, const lb_flow_key *k)
    const lb_backend *lb_table_find_backend(const lb_table *t, const lb_flow_key *k,
                                            const lb_vip **vip_out)

cdef extern from "lb_out.h" nogil:
    struct lb_out_pkt:
        uint8_t *data
        uint32_t len
        uint32_t slot
        uint8_t kind
    struct lb_out:
        uint32_t n
        lb_out_pkt pkt[1]
    const int LB_OUT_FWD
    const int LB_OUT_REPLY

cdef extern from "lb_frag.h" nogil:
    struct lb_frag:
        pass
    struct lb_frag_counters:
        uint64_t first
        uint64_t forwarded
        uint64_t held
        uint64_t released
        uint64_t early_dropped
        uint64_t dropped
        uint64_t timeouts
        uint64_t timeout_held
        uint64_t evicted
        uint64_t completed
    size_t lb_frag_memory(const lb_frag *fc)
    void lb_frag_get_counters(const lb_frag *fc, lb_frag_counters *out)
    void lb_frag_usage(lb_frag *fc, uint32_t *entries, uint32_t *buffers,
                       uint32_t *cap_entries, uint32_t *cap_buffers)
    uint32_t lb_frag_expire(lb_frag *fc, uint32_t now, uint32_t max_sets)

cdef extern from "lb_limit.h" nogil:
    struct lb_limits:
        pass
    size_t lb_limit_memory(const lb_limits *l)

cdef extern from "lb_dp.h" nogil:
    struct lb_dataplane:
        lb_frag *frag
        lb_limits *lim
        uint32_t reject_rate
        uint32_t reject_burst
        uint32_t busy_poll_us
    struct lb_worker:
        lb_dataplane *dp
        uint64_t qs
        lb_stats stats
        int fd
        int vnet_hdr
        uint32_t id
        lb_out out
    lb_dataplane *lb_dp_new(uint32_t n_workers, uint32_t flow_capacity,
                            uint64_t flow_seed, const lb_timeouts *tmo)
    lb_dataplane *lb_dp_new_at(uint32_t n_workers, uint32_t flow_capacity,
                               uint64_t flow_seed, const lb_timeouts *tmo, void *flow_slots)
    void lb_dp_free(lb_dataplane *dp)
    void lb_out_done(lb_worker *w)
    int lb_dp_set_traffic(lb_dataplane *dp, uint32_t frag_entries, uint32_t frag_buffers,
                          uint32_t frag_timeout_ms, uint32_t clients, uint32_t reject_rate,
                          uint32_t reject_burst, uint64_t seed)
    lb_table *lb_dp_publish(lb_dataplane *dp, lb_table *t)
    int lb_dp_synchronize(lb_dataplane *dp, uint32_t timeout_ms)
    uint32_t lb_now_ms()
    lb_worker *lb_dp_worker(lb_dataplane *dp, uint32_t i)
    lb_flowtable *lb_dp_flows(lb_dataplane *dp)
    void lb_dp_set_stop(lb_dataplane *dp, int stop)
    void lb_dp_set_busy_poll(lb_dataplane *dp, uint32_t us)
    uint32_t lb_dp_busy_poll(const lb_dataplane *dp)
    const lb_table *lb_dp_enter(lb_worker *w)
    void lb_dp_leave(lb_worker *w)

cdef extern from "lb_shm.h" nogil:
    const char *LB_SHM_MAGIC
    const uint32_t LB_SHM_HDR_SIZE
    const uint32_t LB_SHM_BOOT_ID
    struct lb_shm_hdr:
        char magic[8]
        uint32_t version
        uint32_t hdr_size
        uint32_t slot_size
        uint32_t capacity
        uint64_t layout
        uint64_t seed
        uint8_t boot_id[16]
        uint64_t created_ms
        uint32_t pid
        uint64_t checksum
    struct lb_shm:
        void *base
        size_t len
        void *slots
        uint32_t capacity
        lb_shm_hdr hdr
    enum lb_shm_refusal:
        LB_SHM_OK
        LB_SHM_ERR_OPEN
        LB_SHM_ERR_NOT_FILE
        LB_SHM_ERR_SHORT
        LB_SHM_ERR_MAGIC
        LB_SHM_ERR_CHECKSUM
        LB_SHM_ERR_VERSION
        LB_SHM_ERR_LAYOUT
        LB_SHM_ERR_CAPACITY
        LB_SHM_ERR_TRUNCATED
        LB_SHM_ERR_BOOT
        LB_SHM_ERR__COUNT
    uint64_t lb_shm_checksum(const lb_shm_hdr *h)
    int lb_shm_create(const char *path, uint32_t capacity, uint64_t seed,
                      const uint8_t *boot_id, lb_shm *out)
    int lb_shm_open_old(const char *path, const uint8_t *boot_id, lb_shm *out, int *err)
    void lb_shm_close(lb_shm *m)

cdef extern from "lb_sync.h" nogil:
    const uint32_t LB_SYNC_REC_SIZE
    const uint32_t LB_SYNC_NEW
    const uint32_t LB_SYNC_REFRESH
    const uint32_t LB_SYNC_END
    struct lb_sync_rx_stats:
        uint64_t inserted
        uint64_t refreshed
        uint64_t ended
        uint64_t not_found
        uint64_t bad_record
        uint64_t unknown_vip
        uint64_t unknown_backend
        uint64_t conflict
        uint64_t full
    int lb_sync_attach(lb_dataplane *dp, uint32_t size)
    uint32_t lb_sync_drain(lb_dataplane *dp, lb_flow_entry *out, uint32_t max, uint64_t *drops)
    uint32_t lb_sync_drain_ends(lb_dataplane *dp, lb_flow_entry *out, uint32_t max,
                                uint64_t *drops)
    size_t lb_sync_encode(const lb_flow_entry *e, uint32_t n, uint8_t type, uint32_t now,
                          uint8_t *out, size_t cap)
    int lb_sync_bind(void *ctx, lb_flow_entry *e)
    int lb_sync_apply(lb_flowtable *ft, const lb_table *t, const uint8_t *body, size_t len,
                      uint32_t now, lb_sync_rx_stats *st)

cdef extern from "lb_pipeline.h" nogil:
    uint32_t lb_process_batch(lb_worker *w, uint8_t *bufs, uint32_t stride,
                              uint32_t *lens, uint8_t *verdicts,
                              uint8_t *reasons, uint32_t n, uint32_t now)

cdef extern from "lb_tun.h" nogil:
    enum:
        LB_TUN_IO_RW
        LB_TUN_IO_URING
    struct lb_tun:
        pass
    lb_tun *lb_tun_open(lb_worker *w, int want_uring, int *err)
    int lb_tun_io(const lb_tun *t)
    int lb_tun_fallback(const lb_tun *t)
    int lb_tun_run(lb_tun *t)
    void lb_tun_close(lb_tun *t)

cdef extern from "lb_csum.h" nogil:
    uint16_t lb_csum_fold(uint32_t sum)
    uint32_t lb_csum_partial(const uint8_t *p, size_t n, uint32_t sum)

cdef extern from "lb_l2.h" nogil:
    const uint32_t LB_RAW_LINKS
    const uint32_t LB_RAW_MISS
    struct lb_l2_route:
        uint8_t prefix[16]
        uint8_t gw[16]
        uint8_t plen
        uint8_t family
        uint8_t link
        uint8_t has_gw
    struct lb_l2:
        uint8_t src_mac[2][6]
        uint32_t n_routes
    struct lb_raw_miss:
        uint32_t seq
        uint8_t addr[16]
        uint8_t family
        uint8_t link
    struct lb_rawsock:
        pass
    lb_l2 *lb_l2_new(uint32_t n_routes, uint32_t n_neigh)
    void lb_l2_free(lb_l2 *l2)
    int lb_l2_set_route(lb_l2 *l2, uint32_t i, const lb_l2_route *r)
    int lb_l2_add_neigh(lb_l2 *l2, uint8_t link, uint8_t family, const uint8_t *addr16,
                        const uint8_t *mac6)
    void lb_l2_seal(lb_l2 *l2)
    int lb_l2_nexthop(const lb_l2 *l2, uint8_t link, uint8_t family,
                      const uint8_t *dst16, uint8_t *nh16)
    const uint8_t *lb_l2_mac(const lb_l2 *l2, uint8_t link, uint8_t family,
                             const uint8_t *nh16)
    const uint8_t *lb_l2_lookup(const lb_l2 *l2, uint8_t link, uint8_t family,
                                const uint8_t *dst16, uint8_t *nh16)
    const lb_l2 *lb_rawsock_l2(lb_rawsock *rs)
    lb_rawsock *lb_rawsock_new()
    void lb_rawsock_free(lb_rawsock *rs)
    lb_l2 *lb_rawsock_publish(lb_dataplane *dp, lb_rawsock *rs, lb_l2 *l2)
    uint32_t lb_rawsock_misses(lb_rawsock *rs, lb_raw_miss *out, uint32_t max)

cdef extern from "lb_rawsock.h" nogil:
    const uint32_t LB_RAW_FRAME
    struct sock_filter:
        uint16_t code
        uint8_t jt
        uint8_t jf
        uint32_t k
    struct lb_raw_sock:
        int fd
        uint32_t ifindex
        uint8_t *ring
        size_t ring_len
        uint32_t frame_size
        uint32_t frame_nr
        uint32_t cur
    int lb_raw_open(lb_raw_sock *s, uint32_t ifindex, uint16_t fanout_id,
                    const sock_filter *filter, uint16_t n_filter,
                    uint32_t frame_nr, int qdisc_bypass)
    void lb_raw_close(lb_raw_sock *s)
    int lb_raw_ring_stats(lb_raw_sock *s, uint32_t *packets, uint32_t *drops)
    int lb_raw_set_filter(lb_raw_sock *s, const sock_filter *filter, uint16_t n_filter)
    int lb_rawsock_run(lb_worker *w, lb_rawsock *rs, lb_raw_sock *socks, uint32_t n_socks)
