/* lb_tun.c - mode "tun": the worker loop on one TUN queue, see lb_tun.h.
 *
 * poll() -> read() up to LB_TUN_BATCH packets (one per read on a TUN fd) ->
 * virtio_net_hdr check (lb_vnet.h) -> lb_pipeline_run over the batch ->
 * write() back each packet it sends, header and all (an answer, LB_REPLY,
 * with a zeroed header: its checksums are complete), then the batch's extra
 * packets (lb_out.h), each with a zeroed header in its headroom.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/virtio_net.h>

#include "lb_pipeline.h"
#include "lb_tun.h"
#include "lb_vnet.h"

_Static_assert(LB_TUN_BATCH <= LB_BATCH, "lb_pipeline_run takes at most LB_BATCH packets");
_Static_assert(sizeof(struct virtio_net_hdr) <= LB_OUT_HEADROOM, "extras have room for the header");

/* The virtio_net_hdr in front of a packet read from the TUN (hdr bytes, 0
 * without IFF_VNET_HDR): 0 with *csum_start as lb_vnet_csum_start gives it,
 * -1 when malformed. */
static inline int vnet_csum(const uint8_t *buf, size_t n, size_t hdr, uint16_t *csum_start)
{
    struct virtio_net_hdr vh;

    *csum_start = 0;
    if (!hdr)
        return 0;
    if (n < hdr)
        return -1;
    memcpy(&vh, buf, sizeof(vh));
    return lb_vnet_csum_start(&vh, 0, (uint32_t)(n - hdr), csum_start);
}

static inline void tun_write(struct lb_worker *w, const uint8_t *buf, size_t n)
{
    for (;;) {
        if (write(w->fd, buf, n) >= 0)
            return;
        if (errno != EINTR) {
            w->stats.tx_errors++;
            return;
        }
    }
}

int lb_tun_run(struct lb_worker *w)
{
    struct lb_dataplane *dp = w->dp;
    struct pollfd pfd = { .fd = w->fd, .events = POLLIN, .revents = 0 };
    size_t hdr = w->vnet_hdr ? sizeof(struct virtio_net_hdr) : 0;
    uint8_t *bufs, *data[LB_TUN_BATCH];
    uint32_t len[LB_TUN_BATCH];
    size_t raw[LB_TUN_BATCH];
    uint16_t csum[LB_TUN_BATCH];
    uint8_t verdicts[LB_TUN_BATCH], reasons[LB_TUN_BATCH];
    int rc = 0, busy = 0;

    if (w->fd < 0)
        return -EBADF;
    /* LB_TUN_BATCH packet buffers (GSO super-packets up to 64 KiB), allocated
     * once per worker run, never per packet */
    bufs = malloc((size_t)LB_TUN_BATCH * LB_PKT_MAX);
    if (!bufs)
        return -ENOMEM;
    while (!__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
        const struct lb_table *t;
        uint32_t now, got = 0, n = 0;

        w->stats.loops++;
        if (!busy) {
            /* holding no table while asleep: a publish need not wait for us */
            __atomic_store_n(&w->qs, LB_QS_OFFLINE, __ATOMIC_SEQ_CST);
            int pr = poll(&pfd, 1, 100);
            if (pr < 0) {
                if (errno == EINTR)
                    continue;
                rc = -errno;
                break;
            }
            if (pr == 0)
                continue;
            if (pfd.revents & (POLLERR | POLLHUP | POLLNVAL)) {
                rc = -EIO;
                break;
            }
        }
        t = lb_dp_enter(w);
        now = lb_now_ms();
        /* 1. read a batch (a TUN fd gives one packet per read) */
        for (got = 0; got < LB_TUN_BATCH; got++) {
            uint8_t *b = bufs + (size_t)n * LB_PKT_MAX;
            ssize_t r = read(w->fd, b, LB_PKT_MAX);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                rc = -errno;
                goto out;
            }
            if (vnet_csum(b, (size_t)r, hdr, &csum[n]) < 0) {
                w->stats.rx++;
                w->stats.drops[LB_DROP_BAD_VNET]++;
                continue;
            }
            raw[n] = (size_t)r;
            data[n] = b + hdr;
            len[n] = (uint32_t)((size_t)r - hdr);
            n++;
        }
        /* 2. the pipeline over the batch, 3. write back what it sends */
        if (n) {
            lb_pipeline_run(w, t, data, len, csum, verdicts, reasons, n, now);
            for (uint32_t i = 0; i < n; i++) {
                uint8_t *b = bufs + (size_t)i * LB_PKT_MAX;
                if (verdicts[i] == LB_TX) {
                    tun_write(w, b, raw[i]);
                } else if (verdicts[i] == LB_REPLY) {
                    memset(b, 0, hdr);
                    tun_write(w, b, hdr + len[i]);
                }
            }
            for (uint32_t i = 0; i < w->out.n; i++) {
                uint8_t *d = w->out.pkt[i].data - hdr;
                memset(d, 0, hdr);
                tun_write(w, d, hdr + w->out.pkt[i].len);
            }
            lb_out_done(w);
            w->stats.batches++;
        }
        /* a full batch means more is likely queued: go on without poll() */
        busy = got == LB_TUN_BATCH;
    }
out:
    lb_dp_leave(w);
    free(bufs);
    return rc;
}
