/* STUB - replaced by the parse/NAT work. */
#include "lb_parse.h"
enum lb_drop_reason lb_parse(uint8_t *data, uint32_t len, struct lb_pkt *p) { (void)data; (void)len; (void)p; return LB_DROP_UNSUPPORTED; }
