/* STUB - replaced by the hash/maglev work. */
#include <errno.h>
#include "lb_maglev.h"
int lb_maglev_is_prime(uint32_t n) { (void)n; return 0; }
int lb_maglev_populate(uint16_t *ring, uint32_t M, const struct lb_backend *b, uint32_t n, uint64_t seed)
{ (void)ring; (void)M; (void)b; (void)n; (void)seed; return -ENOSYS; }
