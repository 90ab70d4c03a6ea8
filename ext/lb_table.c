/* STUB - being written (table). */
#include <errno.h>
#include <stdlib.h>
#include "lb_table.h"
struct lb_table *lb_table_new(uint32_t n, uint64_t s) { (void)n; (void)s; return NULL; }
int lb_table_set_vip(struct lb_table *t, uint32_t i, const struct lb_vip *v, const struct lb_backend *b, uint32_t n) { (void)t; (void)i; (void)v; (void)b; (void)n; return -ENOSYS; }
int lb_table_seal(struct lb_table *t) { (void)t; return -ENOSYS; }
void lb_table_free(struct lb_table *t) { (void)t; }
const struct lb_vip *lb_table_find_vip(const struct lb_table *t, const struct lb_flow_key *k) { (void)t; (void)k; return NULL; }
const struct lb_backend *lb_table_find_backend(const struct lb_table *t, const struct lb_flow_key *k, const struct lb_vip **v) { (void)t; (void)k; (void)v; return NULL; }
