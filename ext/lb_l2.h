/* lb_l2.h - rawsock mode's L2 state: the next-hop table and the miss ring.
 *
 * The L2 table (routes of each egress link, next hop -> MAC, source MAC per
 * link) is immutable once published and swapped as a whole, with the same
 * epoch/quiescent-state scheme as the forwarding table (lb_dp.h): lookups
 * touch a small hash table that must never be seen half-updated, and it
 * changes only when a neighbour entry does (rarely), so copying it is cheap
 * and readers pay nothing but one atomic load per batch. Next hops a worker
 * found no MAC for go to a small ring the control side polls.
 */
#ifndef LB_L2_H
#define LB_L2_H
#include <stdint.h>
#include "lb_types.h"
#include "lb_dp.h"

#define LB_RAW_LINKS 2           /* 0: client side, 1: backend side */
#ifndef LB_RAW_MISS
#define LB_RAW_MISS 16u          /* unresolved next hops remembered for the control side */
#endif

/* A route of an egress link: dst in prefix/plen -> next hop gw (or dst itself
 * when on-link). */
struct lb_l2_route {
    uint8_t prefix[16];          /* be */
    uint8_t gw[16];              /* be; unused unless has_gw */
    uint8_t plen;
    uint8_t family;              /* LB_AF_INET / LB_AF_INET6 */
    uint8_t link;
    uint8_t has_gw;
    uint32_t order;              /* its index as given (lb_l2_set_route): ties in the sort */
};

/* A resolved neighbour of a link. */
struct lb_l2_neigh {
    uint8_t addr[16];            /* be */
    uint8_t family;
    uint8_t link;
    uint8_t used;                /* slot taken */
    uint8_t mac[6];
    uint8_t pad[3];
};

/* The L2 state: routes (sorted by prefix length, longest first) and an
 * open-addressing neighbour hash (power-of-two slots, at most half full). */
struct lb_l2 {
    uint8_t src_mac[LB_RAW_LINKS][6];
    uint32_t n_routes;
    uint32_t mask;               /* slots - 1 */
    uint32_t used;               /* slots taken */
    struct lb_l2_route *routes;
    struct lb_l2_neigh *slots;
};

/* A next hop a worker found no MAC for: a seqlock'ed slot of a small ring
 * that the control side polls to resolve it on demand. */
struct lb_raw_miss {
    uint32_t seq;                /* atomic: 0 = empty, odd = being written */
    uint8_t addr[16];
    uint8_t family;
    uint8_t link;
    uint8_t pad[2];
};

/* Frames held while their next hop resolves (lb_l2_hold): a few per next
 * hop, for a few next hops, each frame copied out of the receive ring (which
 * goes back to the kernel at once). A frame bigger than a hold slot (a GSO
 * super-packet) is not held: no_neigh, as before. */
#ifndef LB_L2_HOLD_NEIGH
#define LB_L2_HOLD_NEIGH 16u     /* next hops with frames waiting */
#endif
#define LB_L2_HOLD_PER 4u        /* frames held per next hop */
#define LB_L2_HOLD_BYTES 2048u   /* largest held frame, virtio_net_hdr included */
#define LB_L2_HOLD_MS 2000u      /* a frame not released by then: hold_timeout */

struct lb_l2_held {
    uint32_t len;                /* bytes of data: virtio_net_hdr + Ethernet + IP */
    uint32_t iplen;              /* bytes of IP (the tx_bytes it counts once sent) */
    uint32_t since;              /* lb_now_ms() when held */
    uint32_t passed;             /* a passed packet (LB_PASS): counted passed, not tx */
    uint8_t data[LB_L2_HOLD_BYTES];
};

struct lb_l2_holdq {
    uint8_t addr[16];            /* the next hop (be) */
    uint8_t family;
    uint8_t link;
    uint8_t n;                   /* frames held, oldest first; 0 = slot free */
    uint8_t pad;
    struct lb_l2_held f[LB_L2_HOLD_PER];
};

struct lb_l2_hold {
    uint32_t lock;               /* spinlock; taken only on a miss and to release */
    uint32_t n_held;             /* atomic: frames held (0: release returns at once) */
    struct lb_l2_holdq q[LB_L2_HOLD_NEIGH];
};

/* Shared by the workers of one data plane. */
struct lb_rawsock {
    struct lb_l2 *l2;            /* atomic; may be NULL (every frame: no_neigh) */
    uint32_t miss_head;          /* atomic */
    uint32_t pad;
    struct lb_raw_miss miss[LB_RAW_MISS];
    struct lb_l2_hold *hold;     /* frames waiting for their next hop's MAC */
};

struct lb_l2 *lb_l2_new(uint32_t n_routes, uint32_t n_neigh);
void lb_l2_free(struct lb_l2 *l2);
/* Route i; 0 or -EINVAL (index, plen, family or link out of range). */
int lb_l2_set_route(struct lb_l2 *l2, uint32_t i, const struct lb_l2_route *r);
/* Add or replace a neighbour; 0, -EINVAL or -ENOSPC (more than n_neigh). */
int lb_l2_add_neigh(struct lb_l2 *l2, uint8_t link, uint8_t family, const uint8_t *addr16,
                    const uint8_t *mac6);
/* Sort the routes longest prefix first, routes of one prefix length in the
 * order they were given (stable); call once before publishing. */
void lb_l2_seal(struct lb_l2 *l2);
/* The next hop of dst16 leaving on link (its route's gateway, or dst16
 * itself on-link) into nh16; 1, or 0 when no route of the link covers it. */
int lb_l2_nexthop(const struct lb_l2 *l2, uint8_t link, uint8_t family,
                  const uint8_t *dst16, uint8_t *nh16);
/* The route of dst16 over links 0..n_links-1 (longest prefix; of equal
 * ones the first given): its link into *link, the next hop into nh16; 1, or
 * 0 when no route of those links covers it. For a passed packet, which
 * leaves by whichever link the kernel would have routed it to. */
int lb_l2_route_any(const struct lb_l2 *l2, uint8_t n_links, uint8_t family,
                    const uint8_t *dst16, uint8_t *link, uint8_t *nh16);
/* The MAC of next hop nh16 on link, or NULL. */
const uint8_t *lb_l2_mac(const struct lb_l2 *l2, uint8_t link, uint8_t family,
                         const uint8_t *nh16);
/* The MAC for dst16 leaving on link (NULL: no route or no neighbour); the
 * next hop it looked for is copied to nh16. */
const uint8_t *lb_l2_lookup(const struct lb_l2 *l2, uint8_t link, uint8_t family,
                            const uint8_t *dst16, uint8_t *nh16);

struct lb_rawsock *lb_rawsock_new(void);
/* The published L2 table; valid between lb_dp_enter and lb_dp_leave. */
static inline const struct lb_l2 *lb_rawsock_l2(struct lb_rawsock *rs)
{
    return __atomic_load_n(&rs->l2, __ATOMIC_SEQ_CST);
}
void lb_rawsock_free(struct lb_rawsock *rs);
/* Swap in l2 and start a grace period (lb_dp_bump_epoch); returns the old
 * table, to be freed after lb_dp_synchronize(dp). */
struct lb_l2 *lb_rawsock_publish(struct lb_dataplane *dp, struct lb_rawsock *rs,
                                 struct lb_l2 *l2);
/* Remember that a worker found no MAC for next hop nh16 on link (a hint for
 * the control side; lossy under contention). */
void lb_rawsock_record_miss(struct lb_rawsock *rs, uint8_t link, uint8_t family,
                            const uint8_t *nh16);
struct lb_raw_sock;
/* A rewritten frame found no MAC for its next hop on link (dst16: the IP
 * destination): keep a copy until the neighbour resolves, or drop it. vframe
 * is the virtio_net_hdr in front of the frame, vlen their length, iplen the
 * IP bytes the pipeline counted as sent (taken back: it is sent only on
 * release); passed: a passed frame (LB_PASS), counted passed instead of
 * sent. Counts: no_neigh (no route, or too big to hold), hold_overflow
 * (the next hop's queue or every queue is full); records the miss so that
 * the control side asks the kernel to resolve it. The worker loop's one call
 * where it used to drop the frame. */
void lb_l2_hold(struct lb_worker *w, struct lb_rawsock *rs, const struct lb_l2 *l2,
                uint8_t link, uint8_t family, const uint8_t *dst16, const uint8_t *vframe,
                uint32_t vlen, uint32_t iplen, int passed, uint32_t now);
/* Send the held frames whose next hop has a MAC in the published L2 table
 * (on socks[link], or socks[0] with one socket) and drop the ones held longer
 * than LB_L2_HOLD_MS (hold_timeout). Cheap when nothing is held (one atomic
 * load); another worker already releasing makes it return at once. Called by
 * the worker loop once per iteration (at least every poll timeout); enters
 * the worker's read-side section itself when there is work. */
void lb_l2_release(struct lb_worker *w, struct lb_rawsock *rs, struct lb_raw_sock *socks,
                   uint32_t n_socks, uint32_t now);
/* Copy out up to max distinct recorded misses; returns how many. */
uint32_t lb_rawsock_misses(struct lb_rawsock *rs, struct lb_raw_miss *out, uint32_t max);
#endif
