/* lb_flow.h - the connection table, shared by all workers.
 *
 * Fixed capacity, allocated once. One entry per connection, reachable from
 * both directions through two hash indexes (forward key client->VIP and
 * reverse key backend->client). Lookups copy the entry out under the lock, so
 * no worker ever holds a pointer into the table after the call returns. */
#ifndef LB_FLOW_H
#define LB_FLOW_H
#include <stdint.h>
#include <stddef.h>
#include "lb_types.h"

/* flag bits of lb_flow_entry.flags */
#define F_FLOW_REV_SEEN (1u << 0)  /* backend has answered */
#define F_FLOW_EST_SEEN (1u << 1)  /* was established once: a later FIN state
                                      is not evictable (see lb_flow.c) */

/* The key fields of an entry (client, vip, backend, ports, proto, family):
 * the bytes before state, compared and copied as one block. 56. */
#define LB_FLOW_KEYBYTES offsetof(struct lb_flow_entry, state)

struct lb_flowtable;

/* Why inserts were refused or entries removed. */
struct lb_flow_counters {
    uint64_t inserted;
    uint64_t refused_full;      /* no free, expired or half-open entry */
    uint64_t refused_exists;    /* a racing insert of the same key won */
    uint64_t evicted_expired;   /* reclaimed on insert: idle past its timeout */
    uint64_t evicted_halfopen;  /* reclaimed on insert: half-open (SYN flood) */
    uint64_t evicted_udp;       /* reclaimed on insert: answered UDP (spoofable) */
    uint64_t expired;           /* removed by lb_flow_expire */
    uint64_t deleted;           /* removed by lb_flow_delete / purge */
};

/* Flows the table removes on its own - idle past their timeout and reclaimed by an insert,
 * evicted by an insert under pressure, purged with their backend - are reported to flow
 * sync peers as END records; otherwise a peer keeps its copy until it expires there (and
 * may carry the flow to the old backend meanwhile). The reason travels in the pad1 field of
 * the copy pushed to the end ring (never in the table). Expiry by lb_flow_expire_report is
 * reported by its caller instead (every removal, no ring). */
#define LB_FLOW_END_EXPIRED 1u
#define LB_FLOW_END_EVICTED 2u
#define LB_FLOW_END_PURGED  3u

struct lb_sync_ring;

/* Push the flows removed on their own to r (NULL: to nowhere). Several threads produce (each
 * worker's inserts, the control plane's purges): a spin lock held for one entry's copy
 * serializes them; a full ring drops the event and counts it (r->drops), never waits for
 * the consumer. Set it before the workers run, clear it after they stopped. */
void lb_flow_set_end_ring(struct lb_flowtable *ft, struct lb_sync_ring *r);
struct lb_sync_ring *lb_flow_end_ring(struct lb_flowtable *ft);

/* capacity 1..LB_FLOW_MAX; tmo NULL = defaults. NULL on bad args / ENOMEM. */
struct lb_flowtable *lb_flow_new(uint32_t capacity, uint64_t seed,
                                 const struct lb_timeouts *tmo);
/* The same, with the slots (capacity * lb_flow_slot_size() zeroed bytes) in
 * the caller's memory, e.g. a file mapping that outlives the process; the
 * caller unmaps it after lb_flow_free. slots NULL = lb_flow_new. */
struct lb_flowtable *lb_flow_new_at(uint32_t capacity, uint64_t seed,
                                    const struct lb_timeouts *tmo, void *slots);
void lb_flow_free(struct lb_flowtable *ft);
void lb_flow_set_timeouts(struct lb_flowtable *ft, const struct lb_timeouts *tmo);
void lb_flow_default_timeouts(struct lb_timeouts *tmo);

/* Find the flow of key k seen in direction dir. On a hit: refresh last_seen
 * to now, advance the TCP/UDP state by this packet's tcp_flags and dir, copy
 * the entry to *out and return 1. On a miss return 0. */
int lb_flow_lookup(struct lb_flowtable *ft, const struct lb_flow_key *k,
                   enum lb_dir dir, uint8_t tcp_flags, uint32_t now,
                   struct lb_flow_entry *out);

/* n lookups at once, as n calls of lb_flow_lookup in order (keys[i], dirs[i],
 * tcp_flags[i] -> hit[i] 0/1, out[i] on a hit), but with the memory accesses
 * of the batch overlapped by prefetching: at tables far bigger than the cache
 * this is several times faster per lookup. Returns the number of hits. */
uint32_t lb_flow_lookup_batch(struct lb_flowtable *ft, const struct lb_flow_key *const *keys,
                              const uint8_t *dirs, const uint8_t *tcp_flags, uint32_t n,
                              uint32_t now, struct lb_flow_entry *out, uint8_t *hit);

/* Insert e (last_seen is set to now). Returns 0, -EEXIST (*e is overwritten
 * with the entry that won, so the caller NATs consistently), or -ENOSPC. */
int lb_flow_insert(struct lb_flowtable *ft, struct lb_flow_entry *e, uint32_t now);

/* lb_flow_insert with last_seen = seen instead of now (an adopted or synced
 * flow keeps its age; seen must not be ahead of now). */
int lb_flow_insert_seen(struct lb_flowtable *ft, struct lb_flow_entry *e, uint32_t now,
                        uint32_t seen);

/* Remove the flow whose forward key is k. 1 if removed, 0 if absent. */
int lb_flow_delete(struct lb_flowtable *ft, const struct lb_flow_key *k);

/* Remove up to max idle entries. Returns how many were removed. */
uint32_t lb_flow_expire(struct lb_flowtable *ft, uint32_t now, uint32_t max);
/* The same, copying each removed entry to gone[] (at most gone_cap, and then
 * no more are removed: every removal is reported), *n_gone = how many. */
uint32_t lb_flow_expire_report(struct lb_flowtable *ft, uint32_t now, uint32_t max,
                               struct lb_flow_entry *gone, uint32_t gone_cap,
                               uint32_t *n_gone);

/* Remove every flow pinned to backend (addr, port, proto). Returns count. */
uint32_t lb_flow_purge_backend(struct lb_flowtable *ft, const uint8_t *addr16,
                               uint16_t port_be, uint8_t proto);

/* Copy up to max live entries into out, starting at *cursor (0 to start);
 * *cursor is advanced. Returns the number copied; 0 = done. */
uint32_t lb_flow_walk(struct lb_flowtable *ft, uint32_t *cursor,
                      struct lb_flow_entry *out, uint32_t max);

/* What lb_flow_walk_filter keeps: entries of VIP address vip (family; 0 =
 * any VIP), of VIP port vport (network order; 0 = any) and protocol proto
 * (0 = any). */
struct lb_flow_filter {
    uint8_t vip[16];
    uint16_t vport;
    uint8_t proto;
    uint8_t family;
};

/* lb_flow_walk, keeping only the entries that pass f (NULL: all). The
 * filter runs in the scan, so a page of a VIP's flows costs no copies of
 * the others; *cursor says where the next page starts (done once it reaches
 * the table's high-water mark: a call returns 0 and *cursor stops moving). */
uint32_t lb_flow_walk_filter(struct lb_flowtable *ft, uint32_t *cursor,
                             struct lb_flow_entry *out, uint32_t max,
                             const struct lb_flow_filter *f);

uint32_t lb_flow_count(const struct lb_flowtable *ft);
uint32_t lb_flow_capacity(const struct lb_flowtable *ft);
size_t   lb_flow_memory(const struct lb_flowtable *ft);   /* bytes allocated */
void     lb_flow_get_counters(const struct lb_flowtable *ft, struct lb_flow_counters *out);
/* active flows per stats slot (the entry's be_stat / vip_stat) */
uint32_t lb_flow_active_backend(const struct lb_flowtable *ft, uint32_t be_stat);
uint32_t lb_flow_active_vip(const struct lb_flowtable *ft, uint32_t vip_stat);

/* Consistency check for tests and debugging: every live entry reachable
 * from both indexes exactly once and in its right bucket, free list + live +
 * never-used = capacity, live / reclaimable / per-stats-slot counts match.
 * Locks the whole table while it runs (not for the packet path).
 * 0 = consistent, > 0 = number of the broken invariant, -ENOMEM. */
int lb_flow_check(struct lb_flowtable *ft);

/* ---- persistence (see "persistence" in lb_flow.c) ---- */

/* Bumped whenever the slot layout or the meaning of a field changes: a table
 * of another version is never adopted. */
#define LB_FLOW_LAYOUT_VERSION 1u

/* Bytes per slot of the memory given to lb_flow_new_at. */
uint32_t lb_flow_slot_size(void);
/* A digest of the slot layout (sizes, offsets, state numbers, the version):
 * two builds whose signatures differ cannot read each other's slots. */
uint64_t lb_flow_layout_sig(void);
/* 1 if every field of e is in range (family, protocol and state agree, no
 * unknown flag, IPv4 addresses zero-padded), else 0. */
int lb_flow_entry_valid(const struct lb_flow_entry *e);

/* Binds an entry to the running configuration: sets vip_stat/be_stat and
 * returns 0, or < 0 when the entry's VIP or backend is not configured. */
typedef int (*lb_flow_bind_fn)(void *ctx, struct lb_flow_entry *e);

struct lb_flow_adopt_stats {
    uint32_t adopted;     /* inserted with their backend, state and age */
    uint32_t invalid;     /* a field out of range: skipped */
    uint32_t expired;     /* idle past its timeout already */
    uint32_t unbound;     /* its VIP or backend is no longer configured */
    uint32_t duplicate;   /* a second slot with the same flow */
    uint32_t full;        /* the new table is full */
};

/* Insert every valid entry of old_slots[0..old_capacity) (the slots of a
 * table of this layout, e.g. a file mapping left by the previous process)
 * into ft, keeping backend, state, flags and last_seen; bind (may be NULL)
 * is asked about each first. Never follows the old links. 0 or -EINVAL. */
int lb_flow_adopt(struct lb_flowtable *ft, const void *old_slots, uint32_t old_capacity,
                  uint32_t now, lb_flow_bind_fn bind, void *ctx,
                  struct lb_flow_adopt_stats *st);

/* The flow of forward key k: last_seen = seen if that is later (no state
 * change), copy to *out (may be NULL); 1, or 0 if absent. For a peer's
 * report of activity: only ever moves last_seen forward to a real packet's
 * time, so two peers reporting to each other never keep a flow alive. */
int lb_flow_touch(struct lb_flowtable *ft, const struct lb_flow_key *k, uint32_t seen,
                  struct lb_flow_entry *out);

/* The two keys of an entry. */
static inline void lb_flow_key_fwd(const struct lb_flow_entry *e, struct lb_flow_key *k)
{
    __builtin_memcpy(k->src, e->client, 16);
    __builtin_memcpy(k->dst, e->vip, 16);
    k->sport = e->cport; k->dport = e->vport;
    k->proto = e->proto; k->family = e->family; k->pad[0] = k->pad[1] = 0;
}
static inline void lb_flow_key_rev(const struct lb_flow_entry *e, struct lb_flow_key *k)
{
    __builtin_memcpy(k->src, e->backend, 16);
    __builtin_memcpy(k->dst, e->client, 16);
    k->sport = e->bport; k->dport = e->cport;
    k->proto = e->proto; k->family = e->family; k->pad[0] = k->pad[1] = 0;
}
#endif
