/* STUB - being written (loop). */
#include <errno.h>
#include <stdlib.h>
#include "lb_loop.h"
struct lb_dataplane *lb_dp_new(uint32_t n, uint32_t c, uint64_t s, const struct lb_timeouts *t) { (void)n; (void)c; (void)s; (void)t; return NULL; }
void lb_dp_free(struct lb_dataplane *dp) { (void)dp; }
struct lb_table *lb_dp_publish(struct lb_dataplane *dp, struct lb_table *t) { (void)dp; return t; }
int lb_dp_synchronize(struct lb_dataplane *dp, uint32_t t) { (void)dp; (void)t; return 0; }
uint32_t lb_now_ms(void) { return 0; }
enum lb_verdict lb_process_packet(struct lb_worker *w, const struct lb_table *t, uint8_t *d, uint32_t l, uint32_t now, int cp, enum lb_drop_reason *r) { (void)w; (void)t; (void)d; (void)l; (void)now; (void)cp; *r = LB_DROP_UNSUPPORTED; return LB_DROP; }
uint32_t lb_process_batch(struct lb_worker *w, uint8_t *b, uint32_t s, const uint32_t *l, uint8_t *v, uint8_t *r, uint32_t n, uint32_t now) { (void)w; (void)b; (void)s; (void)l; (void)v; (void)r; (void)n; (void)now; return 0; }
int lb_loop_run_tun(struct lb_worker *w) { (void)w; return -ENOSYS; }
