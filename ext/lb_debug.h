/* lb_debug.h - debug checks, compiled out unless LB_DEBUG=1 at build time. */
#ifndef LB_DEBUG_H
#define LB_DEBUG_H
#ifndef LB_DEBUG
#define LB_DEBUG 0
#endif
#if LB_DEBUG
#include <stdio.h>
#include <stdlib.h>
#define LB_ASSERT(c) do { if (!(c)) { fprintf(stderr, "LB_ASSERT %s:%d: %s\n", __FILE__, __LINE__, #c); abort(); } } while (0)
#else
#define LB_ASSERT(c) do { } while (0)
#endif
#endif
