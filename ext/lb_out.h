/* lb_out.h - the packets a batch sends besides its own.
 *
 * Most verdicts rewrite a packet in place. Two things cannot: fragments that
 * came before their first fragment and were held (lb_frag.h) go out when the
 * first one has been decided, and an ICMP error (port unreachable) is longer
 * than the packet it answers. The pipeline appends those to its worker's out
 * list; the worker loop sends them after the batch and then calls
 * lb_out_done(), which gives held-fragment buffers back to the cache. Every
 * packet on the list has LB_OUT_HEADROOM writable bytes in front of it, so a
 * loop can put its virtio_net_hdr and Ethernet header there.
 *
 * The list is bounded (LB_OUT_MAX); what does not fit is dropped and counted
 * (stats.out_dropped). The scratch area for generated packets is allocated
 * once per worker (lb_dp_new), never per packet.
 */
#ifndef LB_OUT_H
#define LB_OUT_H
#include <stdint.h>
#include "lb_consts.h"

enum lb_out_kind {
    LB_OUT_FWD = 0,      /* routed by its destination, like an LB_TX packet */
    LB_OUT_REPLY = 1,    /* an answer: back the way the batch came, like LB_REPLY */
};

#define LB_OUT_NO_SLOT 0xFFFFFFFFu

struct lb_out_pkt {
    uint8_t *data;       /* first byte of the IP header */
    uint32_t len;
    uint32_t slot;       /* fragment-cache buffer to give back, or LB_OUT_NO_SLOT */
    uint8_t  kind;       /* enum lb_out_kind */
    uint8_t  src;        /* index in its batch of the packet it came with (lb_pipeline_run) */
    uint8_t  pad[6];
};

struct lb_out {
    uint32_t n;                          /* packets on the list */
    uint32_t n_scratch;                  /* scratch slots used */
    uint8_t *scratch;                    /* LB_OUT_SCRATCH * LB_OUT_SLOT bytes */
    uint64_t reject_tokens;              /* this worker's reject bucket, milli-tokens */
    uint32_t reject_last;                /* ... last refilled, ms */
    uint32_t pad;
    struct lb_out_pkt pkt[LB_OUT_MAX];
};

struct lb_worker;

/* A scratch buffer for a generated packet of at most LB_OUT_SLOT -
 * LB_OUT_HEADROOM bytes (its IP header goes at the returned pointer), or
 * NULL when the batch has used them all. */
uint8_t *lb_out_scratch(struct lb_worker *w);

/* Append a packet; 0, or -1 when the list is full (counted in out_dropped;
 * a fragment-cache slot is given back). */
int lb_out_add(struct lb_worker *w, uint8_t *data, uint32_t len, uint32_t slot, uint8_t kind);

/* The list has been sent (or thrown away): give held-fragment buffers back,
 * empty the list and the scratch area. */
void lb_out_done(struct lb_worker *w);
#endif
