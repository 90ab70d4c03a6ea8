/* lb_tun.h - mode "tun": a worker on one queue of a multiqueue TUN device.
 *
 * Reads packets from the queue fd (w->fd; with w->vnet_hdr a virtio_net_hdr
 * before each packet), runs lb_pipeline_run over a batch, writes back; runs
 * with the GIL released until the data plane's stop flag is set.
 *
 * Two I/O paths, chosen once in lb_tun_open: io_uring (built with liburing,
 * LB_HAVE_URING: reads stay armed on the fd and a batch's writes leave in one
 * submission, so one system call covers many packets), or plain read()/write()
 * (one system call per packet each way) where io_uring is not built in, fails
 * to start (e.g. kernel.io_uring_disabled) or is not wanted. */
#ifndef LB_TUN_H
#define LB_TUN_H
#include "lb_dp.h"

enum lb_tun_io {
    LB_TUN_IO_RW = 0,      /* poll() + read()/write() */
    LB_TUN_IO_URING = 1,   /* io_uring */
};

struct lb_tun;

/* Prepare worker w's loop on w->fd (w->fd and w->vnet_hdr set): its buffers,
 * allocated once here and never per packet, and the ring when want_uring and
 * io_uring works. NULL with *err = -errno when nothing could be prepared
 * (-ENOMEM, -EBADF). The path taken: lb_tun_io(). */
struct lb_tun *lb_tun_open(struct lb_worker *w, int want_uring, int *err);
/* The path lb_tun_open took (enum lb_tun_io). */
int lb_tun_io(const struct lb_tun *t);
/* Why it is not io_uring: 0 when it is, -ENOSYS when built without
 * liburing, -ECANCELED when not wanted, else -errno of the ring's set-up. */
int lb_tun_fallback(const struct lb_tun *t);
/* The worker loop until dp->stop. 0 or -errno. */
int lb_tun_run(struct lb_tun *t);
/* Undo lb_tun_open (the fd is the caller's and stays open). */
void lb_tun_close(struct lb_tun *t);
#endif
