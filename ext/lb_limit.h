/* lb_limit.h - per-VIP admission of new flows: the overload guard (a token
 * bucket of new flows per VIP), the per-client new-flow rate and source
 * persistence (a small bounded per-client table), shared by all workers.
 *
 * Only new flows (a flow-table miss towards a VIP) come here: packets of
 * tracked flows never do, so a flood of new flows is refused before it costs
 * a Maglev pick, an insert or a write, and established flows keep their
 * share of the worker. Per-VIP max_flows is not here: the flow table counts
 * each VIP's tracked flows already (lb_flow_active_vip).
 *
 * The per-client table: 4-way sets of (keyed hash of client address + VIP)
 * entries, random seed per start, least recently used way replaced. Bounded
 * (clients * 48 bytes, allocated at start): when more clients are active
 * than it holds, the least recent ones are forgotten, which resets their
 * rate bucket to full and drops their persistence record (a forgotten client
 * still gets the same backend while the VIP's backends are unchanged: the
 * persistent pick is a hash of the client address alone). Each set has its
 * own spinlock; the per-VIP buckets (indexed by the VIP's stat id) each have
 * one too. */
#ifndef LB_LIMIT_H
#define LB_LIMIT_H
#include <stddef.h>
#include <stdint.h>
#include "lb_types.h"

struct lb_limits;

/* clients >= 4: per-client entries. NULL on bad args / ENOMEM. */
struct lb_limits *lb_limit_new(uint32_t clients, uint64_t seed);
void lb_limit_free(struct lb_limits *l);
size_t lb_limit_memory(const struct lb_limits *l);

/* The VIP's overload guard: 1 if a new flow may start now (always 1 when
 * new_flow_rate is 0). */
int lb_limit_vip_admit(struct lb_limits *l, const struct lb_vip *v, uint32_t now);

/* The per-client part for a new flow from src (16 bytes) to v: 0 admitted,
 * -1 over the client's rate. With persistence, *be is the index of the
 * backend the client is pinned to (still in v, not draining), else
 * LB_RING_EMPTY. */
int lb_limit_client(struct lb_limits *l, const struct lb_vip *v, const uint8_t *src,
                    uint32_t now, uint16_t *be);

/* Persistence: remember that src now uses backend b of v. */
void lb_limit_persist(struct lb_limits *l, const struct lb_vip *v, const uint8_t *src,
                      const struct lb_backend *b, uint32_t now);
#endif
