/* lb_pipeline.h - the packet path, the same for every mode:
 *
 *   parse -> VIP? -> flow lookup -> (miss: Maglev pick -> insert) -> NAT
 *
 * run over a batch of IP packets in three stages (lb_pipeline.c), each
 * packet rewritten in place, one verdict per packet. The worker loops
 * (lb_tun.c, lb_rawsock.c) and the control side (Dataplane.process) call it;
 * lb_process_packet and lb_process_batch are thin wrappers for one packet
 * and for a strided buffer. */
#ifndef LB_PIPELINE_H
#define LB_PIPELINE_H
#include <stdint.h>
#include "lb_types.h"
#include "lb_dp.h"

/* The pipeline over n <= LB_BATCH packets with table t (may be NULL: every
 * packet is then no_vip): packet i is data[i][0..lens[i]), IP header first.
 * verdicts[i] gets the verdict, reasons[i] the drop reason (LB_DROP_NONE
 * unless dropped; a refusal answered with an RST is LB_REPLY with the
 * refusal's reason). LB_REPLY: data[i] now holds the answer, lens[i] is
 * its length (never more than before). Extra packets to send (released
 * fragments, ICMP errors) are on w->out (lb_out.h): the caller sends them
 * after the batch and calls lb_out_done(). csum_partial[i] nonzero: the L4 checksum is
 * CHECKSUM_PARTIAL (virtio NEEDS_CSUM) and csum_partial[i] is its
 * csum_start, which must be the L4 offset (csum_partial NULL: none).
 * The caller holds t between lb_dp_enter and lb_dp_leave. Returns the
 * number of LB_TX and LB_REPLY. */
uint32_t lb_pipeline_run(struct lb_worker *w, const struct lb_table *t, uint8_t *const *data,
                         uint32_t *lens, const uint16_t *csum_partial,
                         uint8_t *verdicts, uint8_t *reasons, uint32_t n, uint32_t now);

/* lb_pipeline_run for one packet in data[0..len). On LB_DROP *reason says
 * why. csum_partial: as above (0 = none; out of range = bad_vnet). An
 * LB_REPLY shorter than len is followed by zeroes up to len (IP receivers
 * ignore bytes past the IP length). */
enum lb_verdict lb_process_packet(struct lb_worker *w, const struct lb_table *t,
                                  uint8_t *data, uint32_t len, uint32_t now,
                                  int csum_partial, enum lb_drop_reason *reason);

/* lb_pipeline_run over n packets of a strided buffer: packet i is
 * bufs[i*stride ..] with length lens[i]; verdicts[i], reasons[i], lens[i]
 * as above. Enters and leaves the currently published table itself. Starts
 * with lb_out_done(w): the extras of the previous call are forgotten, this
 * call's are on w->out until the next. Returns the number sent. */
uint32_t lb_process_batch(struct lb_worker *w, uint8_t *bufs, uint32_t stride,
                          uint32_t *lens, uint8_t *verdicts,
                          uint8_t *reasons, uint32_t n, uint32_t now);
#endif
