/* lb_table.h - the forwarding table: VIPs, their backends and Maglev rings.
 *
 * Built off the hot path (control side), published by one atomic pointer
 * store (lb_dp_publish), never modified after that, freed after every worker has
 * passed a quiescent point. */
#ifndef LB_TABLE_H
#define LB_TABLE_H
#include <stdint.h>
#include "lb_types.h"

/* A table with n_vips zeroed VIP slots. NULL on ENOMEM / bad args. */
struct lb_table *lb_table_new(uint32_t n_vips, uint64_t sel_seed);

/* Fill VIP slot i: copies *vip's key fields (addr, port, proto, family,
 * stat_id, ring_size), its traffic settings (closed_port .. persist_ms) and backends[0..n), builds the Maglev ring.
 * Returns 0 or -errno. */
int lb_table_set_vip(struct lb_table *t, uint32_t i, const struct lb_vip *vip,
                     const struct lb_backend *backends, uint32_t n);

/* Build the lookup indexes; call once after every slot is set. 0 / -errno. */
int lb_table_seal(struct lb_table *t);

void lb_table_free(struct lb_table *t);

/* The VIP that k's destination (dst, dport, proto) names, or NULL. */
const struct lb_vip *lb_table_find_vip(const struct lb_table *t, const struct lb_flow_key *k);

/* Stateless reply path: the backend that k's source (src, sport, proto)
 * names, if it serves exactly one VIP (then *vip_out is that VIP); else NULL. */
const struct lb_backend *lb_table_find_backend(const struct lb_table *t,
                                               const struct lb_flow_key *k,
                                               const struct lb_vip **vip_out);
/* The first VIP (in table order) whose address is addr (any port and
 * protocol), or NULL: addr is no VIP address. */
const struct lb_vip *lb_table_vip_addr(const struct lb_table *t, uint8_t family,
                                       const uint8_t *addr);

/* 1 if addr is the address of a backend of some VIP. */
int lb_table_backend_addr(const struct lb_table *t, uint8_t family, const uint8_t *addr);
/* 1 if addr is the address of a backend of some VIP of protocol proto (TCP
 * or UDP): the reply path has rules for exactly those (address, protocol). */
int lb_table_backend_proto(const struct lb_table *t, uint8_t family, const uint8_t *addr,
                           uint8_t proto);
#endif
