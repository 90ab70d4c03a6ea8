/* lb_sync.h - flow sync between gateways: the workers' event rings and the
 * wire records.
 *
 * Workers never run Python and never make a syscall for sync: each worker
 * slot has a bounded single-producer/single-consumer ring that new_flow
 * pushes a copy of every flow it creates into (a full ring drops the event
 * and counts it). The control plane drains all rings every few ms
 * (lb_sync_drain), encodes the entries as wire records (lb_sync_encode),
 * and sends them in authenticated datagrams (lbcore/sync.py builds the
 * datagram header and its MAC). A receiver checks the datagram (MAC,
 * replay window) in Python and hands its records to lb_sync_apply, which
 * checks every field as hostile input before anything touches the table.
 *
 * Wire record (LB_SYNC_REC_SIZE = 64 bytes, multi-byte fields big-endian):
 *    0 type     LB_SYNC_NEW / LB_SYNC_REFRESH / LB_SYNC_END
 *    1 family   4 / 6
 *    2 proto    6 (TCP) / 17 (UDP)
 *    3 state    enum lb_flow_state (must agree with proto)
 *    4 flags    F_FLOW_* bits
 *    5 zero     must be 0
 *    6 cport    client port
 *    8 vport    VIP port
 *   10 bport    backend port
 *   12 age      ms since the flow's last packet at the sender (< 2^31)
 *   16 client   16 bytes (IPv4: 4 bytes, then zeros)
 *   32 vip      16 bytes
 *   48 backend  16 bytes
 */
#ifndef LB_SYNC_H
#define LB_SYNC_H
#include <stddef.h>
#include <stdint.h>
#include "lb_types.h"

struct lb_flowtable;
struct lb_dataplane;

#define LB_SYNC_REC_SIZE 64u
#define LB_SYNC_NEW      1u      /* a flow this gateway created */
#define LB_SYNC_REFRESH  2u      /* a flow still active here (periodic) */
#define LB_SYNC_END      3u      /* a flow this gateway removed */

/* A ring of flow entries, one producer (its worker), one consumer (the
 * control plane). size is a power of two. */
struct lb_sync_ring {
    uint32_t size, mask;
    _Alignas(64) uint32_t head;          /* producer's; atomic */
    uint64_t drops;                      /* producer's; atomic: ring was full */
    _Alignas(64) uint32_t tail;          /* consumer's; atomic */
    _Alignas(64) struct lb_flow_entry ev[];
};

/* size: a power of two 2..2^20. NULL on bad size / ENOMEM. */
struct lb_sync_ring *lb_sync_ring_new(uint32_t size);
void lb_sync_ring_free(struct lb_sync_ring *r);

/* Producer side (a worker, hot path): no lock, no syscall, no allocation. */
static inline void lb_sync_ring_push(struct lb_sync_ring *r, const struct lb_flow_entry *e)
{
    uint32_t h = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
    uint32_t t = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);

    if (h - t >= r->size) {
        __atomic_store_n(&r->drops, __atomic_load_n(&r->drops, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELAXED);
        return;
    }
    r->ev[h & r->mask] = *e;
    __atomic_store_n(&r->head, h + 1, __ATOMIC_RELEASE);
}

/* Consumer side: move up to max entries of r to out. Returns how many. */
uint32_t lb_sync_ring_pop(struct lb_sync_ring *r, struct lb_flow_entry *out, uint32_t max);

/* Give every worker slot of dp (the control slot included) a ring of size
 * entries: before the workers start. 0 or -errno. */
int lb_sync_attach(struct lb_dataplane *dp, uint32_t size);
/* Free the rings: after the workers stopped. */
void lb_sync_detach(struct lb_dataplane *dp);
/* Drain every ring of dp into out (at most max). *drops: events lost to a
 * full ring so far, over all rings. */
uint32_t lb_sync_drain(struct lb_dataplane *dp, struct lb_flow_entry *out, uint32_t max,
                       uint64_t *drops);

/* The flows the table removed on its own (lb_flow.h, LB_FLOW_END_*): lb_sync_attach gives
 * dp's flow table an end ring of the same size, lb_sync_detach takes it away. Move up to max
 * of them to out (the reason in each one's pad1); *drops: events lost to the full ring so
 * far. */
uint32_t lb_sync_drain_ends(struct lb_dataplane *dp, struct lb_flow_entry *out, uint32_t max,
                            uint64_t *drops);

/* Encode n entries as records of `type` (ages against now) into out;
 * returns the bytes written (whole records only, at most cap). */
size_t lb_sync_encode(const struct lb_flow_entry *e, uint32_t n, uint8_t type,
                      uint32_t now, uint8_t *out, size_t cap);

/* Decode one record into *e (stats zero). 0, or -EINVAL if a field is out
 * of range; *type gets its type. */
int lb_sync_decode(const uint8_t *rec, uint32_t now, struct lb_flow_entry *e, uint8_t *type);

/* lb_flow_bind_fn over a forwarding table (ctx: const struct lb_table *):
 * the entry's VIP must exist and its backend be one of that VIP's. */
int lb_sync_bind(void *ctx, struct lb_flow_entry *e);

/* What lb_sync_apply did with each record. */
struct lb_sync_rx_stats {
    uint64_t inserted;        /* a new flow in the table */
    uint64_t refreshed;       /* already there with this backend: age updated */
    uint64_t ended;           /* END: removed */
    uint64_t not_found;       /* END of a flow not here: nothing to do */
    uint64_t bad_record;      /* a field out of range */
    uint64_t unknown_vip;     /* no such VIP here */
    uint64_t unknown_backend; /* the VIP here has no such backend */
    uint64_t conflict;        /* here with another backend: the local one stays */
    uint64_t full;            /* the table is full */
};

/* Apply the records of body[0..len) (len a multiple of LB_SYNC_REC_SIZE,
 * else -EINVAL and nothing applied) to ft, binding each to table t (NULL:
 * every flow is unknown_vip). Adds to *st; 0 or -EINVAL. */
int lb_sync_apply(struct lb_flowtable *ft, const struct lb_table *t, const uint8_t *body,
                  size_t len, uint32_t now, struct lb_sync_rx_stats *st);
#endif
