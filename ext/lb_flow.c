/* STUB - replaced by the flow-table work. */
#include <errno.h>
#include <stdlib.h>
#include "lb_flow.h"
struct lb_flowtable { int x; };
struct lb_flowtable *lb_flow_new(uint32_t c, uint64_t s, const struct lb_timeouts *t) { (void)c; (void)s; (void)t; return NULL; }
void lb_flow_free(struct lb_flowtable *ft) { (void)ft; }
void lb_flow_set_timeouts(struct lb_flowtable *ft, const struct lb_timeouts *t) { (void)ft; (void)t; }
void lb_flow_default_timeouts(struct lb_timeouts *t) { (void)t; }
int lb_flow_lookup(struct lb_flowtable *ft, const struct lb_flow_key *k, enum lb_dir d, uint8_t f, uint32_t now, struct lb_flow_entry *o) { (void)ft; (void)k; (void)d; (void)f; (void)now; (void)o; return 0; }
int lb_flow_insert(struct lb_flowtable *ft, struct lb_flow_entry *e, uint32_t now) { (void)ft; (void)e; (void)now; return -ENOSPC; }
int lb_flow_delete(struct lb_flowtable *ft, const struct lb_flow_key *k) { (void)ft; (void)k; return 0; }
uint32_t lb_flow_expire(struct lb_flowtable *ft, uint32_t now, uint32_t max) { (void)ft; (void)now; (void)max; return 0; }
uint32_t lb_flow_purge_backend(struct lb_flowtable *ft, const uint8_t *a, uint16_t p, uint8_t pr) { (void)ft; (void)a; (void)p; (void)pr; return 0; }
uint32_t lb_flow_walk(struct lb_flowtable *ft, uint32_t *c, struct lb_flow_entry *o, uint32_t m) { (void)ft; (void)c; (void)o; (void)m; return 0; }
uint32_t lb_flow_count(const struct lb_flowtable *ft) { (void)ft; return 0; }
uint32_t lb_flow_capacity(const struct lb_flowtable *ft) { (void)ft; return 0; }
size_t lb_flow_memory(const struct lb_flowtable *ft) { (void)ft; return 0; }
void lb_flow_get_counters(const struct lb_flowtable *ft, struct lb_flow_counters *o) { (void)ft; (void)o; }
uint32_t lb_flow_active_backend(const struct lb_flowtable *ft, uint32_t s) { (void)ft; (void)s; return 0; }
uint32_t lb_flow_active_vip(const struct lb_flowtable *ft, uint32_t s) { (void)ft; (void)s; return 0; }
