/* lb_frag.h - the fragment cache: the first fragment's decision, applied to
 * the other fragments of its datagram, in any arrival order.
 *
 * Only the first fragment of an IP datagram carries the ports, so only it
 * can be balanced (flow lookup, Maglev pick, NAT). The cache remembers, per
 * datagram, what was decided for it - the flow's translation and direction,
 * or "drop" with its reason - under the key (source, destination, protocol,
 * IPv4 ID / IPv6 fragment id), and the pipeline applies that to every later
 * fragment: the NAT of a later fragment is the IP header alone (addresses,
 * IPv4 header checksum), because the transport checksum lives in the first
 * fragment only, and NAT changes only addresses and ports, which the
 * incremental update of that one checksum covers without reassembly.
 *
 * A later fragment that arrives before its first one is copied into a
 * buffer of the cache (held) and sent, translated, when the first fragment
 * has been decided (lb_out.h), or thrown away when it is dropped or the
 * datagram times out. Holding rather than reassembling: nothing is ever
 * refragmented, a datagram's fragments leave as they came (sizes, DF, IDs),
 * in-order traffic - nearly all of it - never copies a byte, and the memory
 * for out-of-order traffic is one fixed pool of small buffers.
 *
 * Memory bound, all allocated at start (lb_frag_new), nothing per packet:
 *   entries * 144 bytes (datagrams in flight) + buffers * LB_FRAG_SLOT (2 KiB,
 *   held fragments) + buffers * 8 (links, lengths);
 * with the defaults (4096 entries, 1024 buffers) 2.7 MiB, whatever arrives.
 * An entry lives until its datagram is complete (the last fragment seen and
 * every byte counted) or for the timeout (LB_FRAG_TIMEOUT_MS by default);
 * the entries form 4-way sets under a keyed hash (random seed per start), a
 * full set gives up its expired entry first, then its oldest undecided one
 * (a flood of later fragments with random IDs only ever competes with
 * itself), then its oldest decided one; a held fragment is refused (counted
 * early_dropped) when the pool is empty or its datagram already holds
 * LB_FRAG_HOLD_MAX. So a fragment flood fills the cache and the pool and no
 * more: it never reaches the flow table except through first fragments,
 * which are new flows like any other packet.
 *
 * Concurrency: every worker uses the one cache (a reply's fragments may
 * reach another worker than its request's). A set is read and written only
 * under its own spinlock; the buffer pool's free list has its own lock, a
 * leaf lock (taken while a set lock is held, never the other way round).
 * Held buffers are owned by exactly one entry, or by one worker's out list
 * between release and lb_out_done.
 */
#ifndef LB_FRAG_H
#define LB_FRAG_H
#include <stddef.h>
#include <stdint.h>
#include "lb_types.h"

struct lb_frag;
struct lb_worker;

/* Counters (shared, relaxed atomics). */
struct lb_frag_counters {
    uint64_t first;          /* first fragments decided */
    uint64_t forwarded;      /* later fragments sent on a known decision */
    uint64_t held;           /* later fragments held (came before the first) */
    uint64_t released;       /* held fragments sent once their first came */
    uint64_t early_dropped;  /* later fragments refused: pool or datagram full */
    uint64_t dropped;        /* fragments dropped on a drop decision (held ones too) */
    uint64_t timeouts;       /* datagrams forgotten at their timeout */
    uint64_t timeout_held;   /* held fragments thrown away with them */
    uint64_t evicted;        /* datagrams forgotten to make room (set full) */
    uint64_t completed;      /* datagrams seen whole and forgotten */
};

/* entries >= 4, buffers >= 0 (0: out-of-order fragments are dropped),
 * timeout_ms >= 1, seed: random per start. NULL on bad args / ENOMEM. */
struct lb_frag *lb_frag_new(uint32_t entries, uint32_t buffers, uint32_t timeout_ms,
                            uint64_t seed);
void lb_frag_free(struct lb_frag *fc);
size_t lb_frag_memory(const struct lb_frag *fc);
void lb_frag_get_counters(const struct lb_frag *fc, struct lb_frag_counters *out);
/* datagrams remembered, buffers in use (a racy snapshot, for status) */
void lb_frag_usage(struct lb_frag *fc, uint32_t *entries, uint32_t *buffers,
                   uint32_t *cap_entries, uint32_t *cap_buffers);

/* The first fragment p (parsed, F_PKT_FRAGMENT, frag_off 0) has been
 * decided: forwarded with flow e in direction dir (drop == LB_DROP_NONE;
 * p is already rewritten), passed (LB_PASS: e NULL, drop LB_DROP_NONE), or
 * dropped for drop. Records it and releases the datagram's held fragments:
 * translated onto w's out list, or freed (dropped, passed). */
void lb_frag_decide(struct lb_worker *w, const struct lb_pkt *p, const struct lb_flow_entry *e,
                    enum lb_dir dir, enum lb_drop_reason drop, uint32_t now);

/* A later fragment p (frag_off > 0). With a decision: translated in place,
 * LB_TX (*e, *dir the flow, for the counters), LB_PASS (untouched, as its
 * first fragment), or LB_DROP with its reason.
 * Without: held (LB_HOLD) when may_hold, else or when there is no room
 * LB_DROP (*reason frag_early, or no_vip when !may_hold). */
enum lb_verdict lb_frag_later(struct lb_worker *w, struct lb_pkt *p, int may_hold, uint32_t now,
                              struct lb_flow_entry *e, enum lb_dir *dir,
                              enum lb_drop_reason *reason);

/* Forget up to max_sets sets' timed-out datagrams (their held fragments are
 * freed), from a cursor that goes round; the control side calls it now and
 * then so held buffers of abandoned datagrams come back without traffic.
 * Returns the datagrams forgotten. */
uint32_t lb_frag_expire(struct lb_frag *fc, uint32_t now, uint32_t max_sets);

/* Give a held buffer back (lb_out_done). */
void lb_frag_put_slot(struct lb_frag *fc, uint32_t slot);
#endif
