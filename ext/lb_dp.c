/* lb_dp.c - the data plane object and table publication, see lb_dp.h.
 *
 * Publication (RCU-like, as ip_vs_mh's call_rcu): the control side swaps
 * dp->table and bumps dp->epoch; each worker stores the epoch it saw in
 * w->qs before it loads the table pointer, and stores LB_QS_OFFLINE while it
 * sleeps in poll(). Once every worker's qs has reached the new epoch or is
 * offline, no worker can still hold the old table, and it is freed.
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "lb_dp.h"
#include "lb_flow.h"
#include "lb_sync.h"
#include "lb_frag.h"
#include "lb_limit.h"
#include "lb_table.h"

uint32_t lb_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

struct lb_dataplane *lb_dp_new(uint32_t n_workers, uint32_t flow_capacity,
                               uint64_t flow_seed, const struct lb_timeouts *tmo)
{
    return lb_dp_new_at(n_workers, flow_capacity, flow_seed, tmo, NULL);
}

struct lb_dataplane *lb_dp_new_at(uint32_t n_workers, uint32_t flow_capacity,
                                  uint64_t flow_seed, const struct lb_timeouts *tmo,
                                  void *flow_slots)
{
    struct lb_dataplane *dp;

    if (n_workers == 0 || n_workers > 256)
        return NULL;
    dp = calloc(1, sizeof(*dp));
    if (!dp)
        return NULL;
    dp->n_workers = n_workers;
    /* one more worker than asked: the last one is the control side's
     * (Dataplane.process/pick/l2_lookup: tests, `lbcore pick`, benchmarks) */
    dp->workers = calloc(n_workers + 1, sizeof(struct lb_worker));
    dp->ft = lb_flow_new_at(flow_capacity, flow_seed, tmo, flow_slots);
    if (!dp->workers || !dp->ft)
        goto fail;
    for (uint32_t i = 0; i <= n_workers; i++) {
        struct lb_worker *w = &dp->workers[i];
        w->dp = dp;
        w->id = i;
        w->fd = -1;
        w->qs = LB_QS_OFFLINE;
        w->stats.vip = calloc(LB_MAX_STAT_IDS, sizeof(struct lb_counter));
        w->stats.backend = calloc(LB_MAX_STAT_IDS, sizeof(struct lb_counter));
        w->out.scratch = malloc((size_t)LB_OUT_SCRATCH * LB_OUT_SLOT);
        if (!w->stats.vip || !w->stats.backend || !w->out.scratch)
            goto fail;
    }
    dp->reject_rate = LB_REJECT_RATE;
    dp->reject_burst = LB_REJECT_BURST;
    dp->frag = lb_frag_new(LB_FRAG_ENTRIES, LB_FRAG_BUFFERS, LB_FRAG_TIMEOUT_MS, flow_seed);
    dp->lim = lb_limit_new(LB_CLIENT_ENTRIES, flow_seed ^ 0x9E3779B97F4A7C15ull);
    if (!dp->frag || !dp->lim)
        goto fail;
    return dp;
fail:
    lb_dp_free(dp);
    return NULL;
}

void lb_dp_free(struct lb_dataplane *dp)
{
    if (!dp)
        return;
    if (dp->workers) {
        lb_sync_detach(dp);
        for (uint32_t i = 0; i <= dp->n_workers; i++) {
            free(dp->workers[i].stats.vip);
            free(dp->workers[i].stats.backend);
            free(dp->workers[i].out.scratch);
        }
        free(dp->workers);
    }
    if (dp->ft)
        lb_flow_free(dp->ft);
    lb_table_free(dp->table);
    lb_frag_free(dp->frag);
    lb_limit_free(dp->lim);
    free(dp);
}

int lb_dp_set_traffic(struct lb_dataplane *dp, uint32_t frag_entries, uint32_t frag_buffers,
                      uint32_t frag_timeout_ms, uint32_t clients, uint32_t reject_rate,
                      uint32_t reject_burst, uint64_t seed)
{
    struct lb_frag *fc = NULL;
    struct lb_limits *l = NULL;

    if (frag_entries) {
        fc = lb_frag_new(frag_entries, frag_buffers, frag_timeout_ms, seed);
        if (!fc)
            return -EINVAL;
    }
    l = lb_limit_new(clients, seed ^ 0x9E3779B97F4A7C15ull);
    if (!l) {
        lb_frag_free(fc);
        return -EINVAL;
    }
    lb_frag_free(dp->frag);
    lb_limit_free(dp->lim);
    dp->frag = fc;
    dp->lim = l;
    dp->reject_rate = reject_rate;
    dp->reject_burst = reject_burst;
    return 0;
}

struct lb_table *lb_dp_publish(struct lb_dataplane *dp, struct lb_table *t)
{
    struct lb_table *old = __atomic_exchange_n(&dp->table, t, __ATOMIC_SEQ_CST);

    lb_dp_bump_epoch(dp);
    return old;
}

int lb_dp_synchronize(struct lb_dataplane *dp, uint32_t timeout_ms)
{
    uint64_t target = __atomic_load_n(&dp->epoch, __ATOMIC_SEQ_CST);
    struct timespec nap = { 0, 500 * 1000 };     /* 0.5 ms */
    uint32_t waited_us = 0;

    for (;;) {
        int pending = 0;
        for (uint32_t i = 0; i <= dp->n_workers; i++) {
            uint64_t qs = __atomic_load_n(&dp->workers[i].qs, __ATOMIC_SEQ_CST);
            if (qs != LB_QS_OFFLINE && qs < target)
                pending = 1;
        }
        if (!pending)
            return 0;
        if (waited_us / 1000 >= timeout_ms)
            return -ETIMEDOUT;
        nanosleep(&nap, NULL);
        waited_us += 500;
    }
}
