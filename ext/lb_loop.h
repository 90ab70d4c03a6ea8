/* lb_loop.h - the per-packet pipeline and the worker loops.
 *
 *   lb_process_packet: parse -> flow lookup -> (miss: maglev pick -> insert)
 *                      -> NAT rewrite; one verdict per packet.
 *   lb_loop_run_tun:   batched reads from a TUN queue, process, writes back;
 *                      runs with the GIL released until the stop flag is set.
 *
 * Table publication is RCU-like: the control side swaps dp->table, bumps
 * dp->epoch and frees the old table once every worker's quiescent counter has
 * reached that epoch (or the worker is idle in poll()). */
#ifndef LB_LOOP_H
#define LB_LOOP_H
#include <stdint.h>
#include "lb_types.h"
#include "lb_flow.h"

#define LB_QS_OFFLINE UINT64_MAX   /* worker blocked in poll(): holds no table */

struct lb_dataplane;

struct lb_worker {
    struct lb_dataplane *dp;
    uint64_t qs;                  /* atomic: last epoch seen at a quiescent point */
    struct lb_stats stats;        /* written by this worker only */
    int fd;                       /* TUN queue fd (-1 when unused) */
    int vnet_hdr;                 /* fd carries a virtio_net_hdr before each packet */
    uint32_t id;
    uint32_t pad;
};

struct lb_dataplane {
    struct lb_table *table;       /* atomic: current table, may be NULL */
    struct lb_flowtable *ft;
    uint64_t epoch;               /* atomic: bumped at every publish */
    int stop;                     /* atomic: workers exit when set */
    uint32_t n_workers;
    struct lb_worker *workers;
};

struct lb_dataplane *lb_dp_new(uint32_t n_workers, uint32_t flow_capacity,
                               uint64_t flow_seed, const struct lb_timeouts *tmo);
void lb_dp_free(struct lb_dataplane *dp);

/* Publish t (may be NULL) and return the previous table; the caller frees it
 * after lb_dp_synchronize() returns. */
struct lb_table *lb_dp_publish(struct lb_dataplane *dp, struct lb_table *t);
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

/* The pipeline for one packet in data[0..len) (IP header first). The packet
 * is rewritten in place on LB_TX; on LB_DROP *reason says why. csum_partial:
 * nonzero: the L4 checksum is CHECKSUM_PARTIAL (virtio NEEDS_CSUM) and its
 * value is the header's csum_start, which must be the L4 offset. */
enum lb_verdict lb_process_packet(struct lb_worker *w, const struct lb_table *t,
                                  uint8_t *data, uint32_t len, uint32_t now,
                                  int csum_partial, enum lb_drop_reason *reason);

/* Run lb_process_packet over n packets: packet i is bufs[i*stride ..] with
 * length lens[i]; verdicts[i] gets the verdict, reasons[i] the drop reason.
 * Uses the currently published table. Returns the number sent (LB_TX). */
uint32_t lb_process_batch(struct lb_worker *w, uint8_t *bufs, uint32_t stride,
                          const uint32_t *lens, uint8_t *verdicts,
                          uint8_t *reasons, uint32_t n, uint32_t now);

/* Worker loop on w->fd until dp->stop. 0 or -errno. */
int lb_loop_run_tun(struct lb_worker *w);
#endif
