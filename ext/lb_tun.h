/* lb_tun.h - mode "tun": a worker on one queue of a multiqueue TUN device.
 *
 * Batched reads from the queue fd (w->fd; with w->vnet_hdr a virtio_net_hdr
 * before each packet), lb_pipeline_run over the batch, writes back; runs
 * with the GIL released until the data plane's stop flag is set. */
#ifndef LB_TUN_H
#define LB_TUN_H
#include "lb_dp.h"

/* Worker loop on w->fd until dp->stop. 0 or -errno. */
int lb_tun_run(struct lb_worker *w);
#endif
