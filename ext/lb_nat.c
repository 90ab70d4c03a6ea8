/* STUB - replaced by the parse/NAT work. */
#include "lb_nat.h"
#include "lb_csum.h"
uint32_t lb_csum_partial(const uint8_t *p, size_t n, uint32_t sum) { (void)p; (void)n; return sum; }
void lb_nat_rewrite(struct lb_pkt *p, const struct lb_flow_entry *e, enum lb_dir dir) { (void)p; (void)e; (void)dir; }
