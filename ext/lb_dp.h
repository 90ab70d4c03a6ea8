/* lb_dp.h - the data plane object: workers, the flow table, and the
 * publication of read-mostly tables (RCU-like).
 *
 * Publication: the control side swaps a table pointer and bumps dp->epoch
 * (lb_dp_publish for the forwarding table, lb_dp_bump_epoch for any other
 * table the workers load after lb_dp_enter, e.g. rawsock's L2 table); it
 * frees the old table once lb_dp_synchronize() saw every worker's quiescent
 * counter reach that epoch (or the worker idle in poll()). */
#ifndef LB_DP_H
#define LB_DP_H
#include <stdint.h>
#include "lb_types.h"
#include "lb_flow.h"
#include "lb_out.h"

#define LB_QS_OFFLINE UINT64_MAX   /* worker blocked in poll(): holds no table */

struct lb_dataplane;
struct lb_sync_ring;

struct lb_worker {
    struct lb_dataplane *dp;
    uint64_t qs;                  /* atomic: last epoch seen at a quiescent point */
    struct lb_stats stats;        /* written by this worker only */
    int fd;                       /* TUN queue fd (-1 when unused) */
    int vnet_hdr;                 /* fd carries a virtio_net_hdr before each packet */
    uint32_t id;
    uint32_t pad;
    struct lb_sync_ring *sync;    /* atomic: flow events for peers, NULL = no sync */
    struct lb_out out;            /* extra packets of the current batch (lb_out.h) */
};

struct lb_dataplane {
    struct lb_table *table;       /* atomic: current table, may be NULL */
    struct lb_flowtable *ft;
    uint64_t epoch;               /* atomic: bumped at every publish */
    int stop;                     /* atomic: workers exit when set */
    uint32_t n_workers;
    struct lb_worker *workers;
    struct lb_frag *frag;         /* fragment cache (lb_frag.h); NULL: fragments dropped */
    struct lb_limits *lim;        /* new-flow admission, persistence (lb_limit.h); may be NULL */
    uint32_t reject_rate;         /* rejects per second, whole data plane (lb_icmp.h) */
    uint32_t reject_burst;
    uint32_t busy_poll_us;        /* a worker polls this long after its last packet before it
                                   * sleeps (0: sleeps at once); read atomically by the
                                   * workers, so it may change while they run */
};

struct lb_dataplane *lb_dp_new(uint32_t n_workers, uint32_t flow_capacity,
                               uint64_t flow_seed, const struct lb_timeouts *tmo);
/* The same with the flow table's slots in the caller's memory (lb_flow_new_at). */
struct lb_dataplane *lb_dp_new_at(uint32_t n_workers, uint32_t flow_capacity,
                                  uint64_t flow_seed, const struct lb_timeouts *tmo,
                                  void *flow_slots);
void lb_dp_free(struct lb_dataplane *dp);
/* Replace the fragment cache and the admission tables (lb_dp_new makes them
 * with the defaults of lb_consts.h) by ones of these sizes (frag_entries 0:
 * no fragment cache, fragments are dropped), and set the reject rate. Only
 * before any worker runs. 0 or -EINVAL (bad sizes; nothing changed). */
int lb_dp_set_traffic(struct lb_dataplane *dp, uint32_t frag_entries, uint32_t frag_buffers,
                      uint32_t frag_timeout_ms, uint32_t clients, uint32_t reject_rate,
                      uint32_t reject_burst, uint64_t seed);

/* Publish t (may be NULL) and return the previous table; the caller frees it
 * after lb_dp_synchronize() returns. */
struct lb_table *lb_dp_publish(struct lb_dataplane *dp, struct lb_table *t);
/* Start a grace period for a table swapped by the caller (not the forwarding
 * table): the next lb_dp_synchronize() waits for every worker that may still
 * hold the old one. */
static inline void lb_dp_bump_epoch(struct lb_dataplane *dp)
{
    __atomic_add_fetch(&dp->epoch, 1, __ATOMIC_SEQ_CST);
}
/* Wait (sleeping, bounded by timeout_ms) until every worker passed a
 * quiescent point after the latest publish. 0 or -ETIMEDOUT. */
int lb_dp_synchronize(struct lb_dataplane *dp, uint32_t timeout_ms);

/* Small accessors for the control side (Cython), with the right atomics. */
static inline struct lb_worker *lb_dp_worker(struct lb_dataplane *dp, uint32_t i)
{
    return &dp->workers[i];
}
static inline struct lb_flowtable *lb_dp_flows(struct lb_dataplane *dp) { return dp->ft; }
static inline void lb_dp_set_stop(struct lb_dataplane *dp, int stop)
{
    __atomic_store_n(&dp->stop, stop, __ATOMIC_RELEASE);
}
static inline void lb_dp_set_busy_poll(struct lb_dataplane *dp, uint32_t us)
{
    __atomic_store_n(&dp->busy_poll_us, us, __ATOMIC_RELAXED);
}
static inline uint32_t lb_dp_busy_poll(const struct lb_dataplane *dp)
{
    return __atomic_load_n(&dp->busy_poll_us, __ATOMIC_RELAXED);
}
/* Enter a read-side section on worker w: returns the current table, which
 * stays valid until lb_dp_leave(w). */
static inline const struct lb_table *lb_dp_enter(struct lb_worker *w)
{
    __atomic_store_n(&w->qs, __atomic_load_n(&w->dp->epoch, __ATOMIC_SEQ_CST), __ATOMIC_SEQ_CST);
    return __atomic_load_n(&w->dp->table, __ATOMIC_SEQ_CST);
}
static inline void lb_dp_leave(struct lb_worker *w)
{
    __atomic_store_n(&w->qs, LB_QS_OFFLINE, __ATOMIC_SEQ_CST);
}

/* Monotonic milliseconds (CLOCK_MONOTONIC_COARSE), the flow table's clock. */
uint32_t lb_now_ms(void);
#endif
