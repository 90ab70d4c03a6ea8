/* lb_tun.c - mode "tun": the worker loop on one TUN queue, see lb_tun.h.
 *
 * Both I/O paths share the batch step: virtio_net_hdr check (lb_vnet.h) ->
 * lb_pipeline_run over the batch -> send back each packet it sends, header
 * and all (an answer, LB_REPLY, with a zeroed header: its checksums are
 * complete; a passed packet, LB_PASS, exactly as it was read: the kernel
 * routes it by the main table this time, rule `iif TUN lookup main`), then the batch's extra packets (lb_out.h), each with a zeroed
 * header in its headroom. The extras always leave by plain write(): they are
 * rare, and their memory is only valid until lb_out_done.
 *
 * read/write: poll() -> read() up to LB_TUN_BATCH packets (one per read on a
 * TUN fd) -> the batch -> one write() per packet.
 *
 * io_uring: LB_TUN_BUFS buffers, each free, being read into or being
 * written from. A look at the queue is one io_uring_submit carrying the last
 * batch's writes, then a few reads (more while they all find a packet, up to
 * LB_TUN_BATCH); the reads are RWF_NOWAIT, so each completes at once with a
 * packet or -EAGAIN. Nothing waits on the queue but one poll for
 * readability, armed only when the worker goes to sleep: reads left waiting
 * would all be woken by every packet (each a task-work item in the sender's
 * softirq, then a failed read and a re-armed poll in the worker). The ring is
 * sized for one operation per buffer and the poll, so it never overflows.
 *
 * Busy poll: after its last packet a worker keeps looking for more (a
 * non-blocking read, or a peek at the completion queue) for dp->busy_poll_us
 * before it sleeps, so that a packet arriving within the window does not pay
 * a wake-up. The clock is read only while spinning.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/virtio_net.h>

#include "lb_pipeline.h"
#include "lb_tun.h"
#include "lb_vnet.h"

#ifndef LB_HAVE_URING
#define LB_HAVE_URING 0
#endif
#if LB_HAVE_URING
#include <liburing.h>
#endif

_Static_assert(LB_TUN_BATCH <= LB_BATCH, "lb_pipeline_run takes at most LB_BATCH packets");
_Static_assert(sizeof(struct virtio_net_hdr) <= LB_OUT_HEADROOM, "extras have room for the header");

/* io_uring: buffers, so that reads stay armed while a batch's writes are in flight */
#define LB_TUN_BUFS (2u * LB_TUN_BATCH)
#define LB_TUN_WRITE (1ull << 32)            /* user_data: a write (else a read) of buffer low bits */
#define LB_TUN_POLL (1ull << 33)             /* user_data: the poll for readability */
#define LB_TUN_READS_MIN 4u                  /* reads per look on a quiet queue */
#define LB_TUN_SLEEP_MS 100                  /* longest sleep: dp->stop is seen within it */

struct lb_tun {
    struct lb_worker *w;
    uint8_t *bufs;                /* nbufs * LB_PKT_MAX */
    uint32_t nbufs;
    int io;                       /* enum lb_tun_io */
    int fallback;                 /* lb_tun_fallback() */
    int spin;                     /* busy poll: 0 asleep or idle, 1 traffic seen, 2 spinning */
    uint64_t spin_start_ns, spin_end_ns;
#if LB_HAVE_URING
    struct io_uring ring;
    uint32_t inflight;            /* reads and writes submitted or queued, not yet completed */
    uint32_t len[LB_TUN_BUFS];    /* bytes read into, or being written from, each buffer */
    uint32_t freeb[LB_TUN_BUFS];  /* buffers with no operation: a stack */
    uint32_t nfree;
    int polling;                  /* the poll for readability is in flight */
#endif
};

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

static inline size_t vnet_len(const struct lb_worker *w)
{
    return w->vnet_hdr ? sizeof(struct virtio_net_hdr) : 0;
}

static inline uint8_t *tun_buf(const struct lb_tun *t, uint32_t i)
{
    return t->bufs + (size_t)i * LB_PKT_MAX;
}

/* The batch's extras, then forget them (lb_out.h). */
static void send_extras(struct lb_worker *w, size_t hdr)
{
    for (uint32_t i = 0; i < w->out.n; i++) {
        uint8_t *d = w->out.pkt[i].data - hdr;
        memset(d, 0, hdr);
        tun_write(w, d, hdr + w->out.pkt[i].len);
    }
    lb_out_done(w);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t mono_ns(void)
{
    struct timespec ts;

    /* CLOCK_MONOTONIC is served by the vDSO: no system call */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A batch just had packets: the next empty look starts a busy-poll window
 * (and the window it ended, if any, is counted). */
static inline void spin_traffic(struct lb_tun *t)
{
    if (t->spin == 2)
        t->w->stats.spin_ns += mono_ns() - t->spin_start_ns;
    t->spin = 1;
}

/* Nothing to do: 1 to look again at once (within the busy-poll window that
 * started at the first empty look after traffic), 0 to sleep. */
static inline int spin_more(struct lb_tun *t)
{
    uint32_t us = lb_dp_busy_poll(t->w->dp);
    uint64_t now;

    if (!us || !t->spin)
        return 0;
    now = mono_ns();
    if (t->spin == 1) {
        t->spin = 2;
        t->spin_start_ns = now;
        t->spin_end_ns = now + (uint64_t)us * 1000u;
        return 1;
    }
    if (now < t->spin_end_ns) {
        cpu_relax();
        return 1;
    }
    t->w->stats.spin_ns += now - t->spin_start_ns;
    t->spin = 0;
    return 0;
}

/* ---- read/write ----------------------------------------------------------- */

static int rw_run(struct lb_tun *tun)
{
    struct lb_worker *w = tun->w;
    struct lb_dataplane *dp = w->dp;
    struct pollfd pfd = { .fd = w->fd, .events = POLLIN, .revents = 0 };
    size_t hdr = vnet_len(w);
    uint8_t *data[LB_TUN_BATCH];
    uint32_t len[LB_TUN_BATCH];
    size_t raw[LB_TUN_BATCH];
    uint16_t csum[LB_TUN_BATCH];
    uint8_t verdicts[LB_TUN_BATCH], reasons[LB_TUN_BATCH];
    int rc = 0, busy = 0;

    while (!__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
        const struct lb_table *t;
        uint32_t now, got = 0, n = 0;

        w->stats.loops++;
        if (!busy && !spin_more(tun)) {
            /* holding no table while asleep: a publish need not wait for us */
            __atomic_store_n(&w->qs, LB_QS_OFFLINE, __ATOMIC_SEQ_CST);
            int pr = poll(&pfd, 1, LB_TUN_SLEEP_MS);
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
            uint8_t *b = tun_buf(tun, n);
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
        if (got)
            spin_traffic(tun);
        /* 2. the pipeline over the batch, 3. write back what it sends */
        if (n) {
            lb_pipeline_run(w, t, data, len, csum, verdicts, reasons, n, now);
            for (uint32_t i = 0; i < n; i++) {
                uint8_t *b = tun_buf(tun, i);
                if (verdicts[i] == LB_TX || verdicts[i] == LB_PASS) {
                    tun_write(w, b, raw[i]);
                } else if (verdicts[i] == LB_REPLY) {
                    memset(b, 0, hdr);
                    tun_write(w, b, hdr + len[i]);
                }
            }
            send_extras(w, hdr);
            w->stats.batches++;
        }
        /* a full batch means more is likely queued: go on without poll() */
        busy = got == LB_TUN_BATCH;
    }
out:
    lb_dp_leave(w);
    return rc;
}

/* ---- io_uring ------------------------------------------------------------- */

#if LB_HAVE_URING
static struct io_uring_sqe *ring_sqe(struct lb_tun *t)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);

    if (!sqe) {
        /* not expected (one operation per buffer, one poll, fit the ring): make room */
        io_uring_submit(&t->ring);
        sqe = io_uring_get_sqe(&t->ring);
    }
    return sqe;
}

/* A read into a free buffer that never waits: it completes at submission with
 * a packet or -EAGAIN. A read left waiting would sit on the queue's wait list,
 * and every packet would wake every waiting read. */
static int ring_read(struct lb_tun *t)
{
    struct io_uring_sqe *sqe;
    uint32_t i;

    if (!t->nfree)
        return 0;
    if (!(sqe = ring_sqe(t)))
        return -EBUSY;
    i = t->freeb[--t->nfree];
    io_uring_prep_read(sqe, t->w->fd, tun_buf(t, i), LB_PKT_MAX, 0);
    sqe->rw_flags = RWF_NOWAIT;
    io_uring_sqe_set_data64(sqe, i);
    t->inflight++;
    return 0;
}

static int ring_write(struct lb_tun *t, uint32_t i, uint32_t n)
{
    struct io_uring_sqe *sqe = ring_sqe(t);

    if (!sqe)
        return -EBUSY;
    t->len[i] = n;
    io_uring_prep_write(sqe, t->w->fd, tun_buf(t, i), n, 0);
    io_uring_sqe_set_data64(sqe, LB_TUN_WRITE | i);
    t->inflight++;
    return 0;
}

/* One poll for readability, armed only when the worker is about to sleep. */
static int ring_poll(struct lb_tun *t)
{
    struct io_uring_sqe *sqe;

    if (t->polling)
        return 0;
    if (!(sqe = ring_sqe(t)))
        return -EBUSY;
    io_uring_prep_poll_add(sqe, t->w->fd, POLLIN);
    io_uring_sqe_set_data64(sqe, LB_TUN_POLL);
    t->polling = 1;
    return 0;
}

static inline void ring_free(struct lb_tun *t, uint32_t i)
{
    t->freeb[t->nfree++] = i;
}

/* Submit what is queued. 0, or -errno when the ring is broken (a busy or
 * interrupted submission leaves the entries queued for the next one). */
static int ring_submit(struct lb_tun *t)
{
    int r;

    if (!io_uring_sq_ready(&t->ring))
        return 0;
    r = io_uring_submit(&t->ring);
    if (r >= 0 || r == -EINTR || r == -EAGAIN || r == -EBUSY)
        return 0;
    return r;
}

/* The pipeline over the buffers idx[0..n) (reads of t->len[] bytes), their
 * writes queued (sent with the next submission, ahead of its reads), the
 * buffers of what it drops freed, then the extras. */
static int ring_batch(struct lb_tun *tun, const struct lb_table *t, uint32_t *idx,
                      uint32_t n, uint32_t now)
{
    struct lb_worker *w = tun->w;
    size_t hdr = vnet_len(w);
    uint8_t *data[LB_TUN_BATCH];
    uint32_t len[LB_TUN_BATCH];
    uint16_t csum[LB_TUN_BATCH];
    uint8_t verdicts[LB_TUN_BATCH], reasons[LB_TUN_BATCH];
    uint32_t m = 0;
    int rc = 0;

    for (uint32_t j = 0; j < n; j++) {
        uint8_t *b = tun_buf(tun, idx[j]);
        if (vnet_csum(b, tun->len[idx[j]], hdr, &csum[m]) < 0) {
            w->stats.rx++;
            w->stats.drops[LB_DROP_BAD_VNET]++;
            ring_free(tun, idx[j]);
            continue;
        }
        data[m] = b + hdr;
        len[m] = (uint32_t)(tun->len[idx[j]] - hdr);
        idx[m] = idx[j];              /* compacted to the packets the pipeline gets */
        m++;
    }
    if (m)
        lb_pipeline_run(w, t, data, len, csum, verdicts, reasons, m, now);
    for (uint32_t j = 0; j < m; j++) {
        uint32_t i = idx[j];
        if (verdicts[j] == LB_TX || verdicts[j] == LB_PASS) {
            rc |= ring_write(tun, i, tun->len[i]);
        } else if (verdicts[j] == LB_REPLY) {
            memset(tun_buf(tun, i), 0, hdr);
            rc |= ring_write(tun, i, (uint32_t)hdr + len[j]);
        } else {
            ring_free(tun, i);
        }
    }
    if (rc)
        return -EBUSY;
    if (w->out.n)                     /* the extras leave behind the batch's own writes */
        rc = ring_submit(tun);
    send_extras(w, hdr);
    w->stats.batches++;
    return rc;
}

/* Reads to ask for in the next look: twice what the last one found, within
 * [LB_TUN_READS_MIN, LB_TUN_BATCH], so that a quiet queue costs a few failed
 * reads per look and a busy one a full batch per system call. */
static inline uint32_t ring_want(uint32_t got)
{
    uint32_t k = 2 * got;

    return k < LB_TUN_READS_MIN ? LB_TUN_READS_MIN : k > LB_TUN_BATCH ? LB_TUN_BATCH : k;
}

/* The completions on the ring: writes free their buffers, reads with a packet
 * go through the pipeline (in batches of at most LB_TUN_BATCH), a read that
 * found the queue empty sets *empty. 0 or -errno. */
static int ring_reap(struct lb_tun *tun, uint32_t *got, int *empty)
{
    struct lb_worker *w = tun->w;
    struct io_uring_cqe *cqes[LB_TUN_BUFS + 1];
    uint32_t idx[LB_TUN_BATCH];
    const struct lb_table *t = NULL;
    uint32_t now = 0, nb = 0;
    unsigned n;
    int rc = 0;

    n = io_uring_peek_batch_cqe(&tun->ring, cqes, LB_TUN_BUFS + 1);
    for (unsigned k = 0; k < n; k++) {
        uint64_t ud = io_uring_cqe_get_data64(cqes[k]);
        int res = cqes[k]->res;
        uint32_t i = (uint32_t)(ud & 0xffffffffu);

        if (ud == LB_TUN_POLL) {
            tun->polling = 0;         /* readable, or failed: the next look tells */
            continue;
        }
        if (i >= tun->nbufs)          /* not ours: nothing else submits on this ring */
            continue;
        tun->inflight--;
        if (ud & LB_TUN_WRITE) {
            /* a TUN write is whole or failed: short counts as failed */
            if (res < 0 || (uint32_t)res != tun->len[i])
                w->stats.tx_errors++;
            ring_free(tun, i);
        } else if (res <= 0 || rc) {
            ring_free(tun, i);
            if (res == -EAGAIN || res == 0)
                *empty = 1;
            else if (res != -EINTR && res != -ENOBUFS && res < 0 && !rc)
                rc = res;             /* the queue is gone (detached, closed): as read() */
        } else {
            (*got)++;
            tun->len[i] = (uint32_t)res;   /* <= LB_PKT_MAX, the size asked */
            if (!t) {
                t = lb_dp_enter(w);
                now = lb_now_ms();
            }
            idx[nb++] = i;
            if (nb == LB_TUN_BATCH) {
                rc = ring_batch(tun, t, idx, nb, now);
                nb = 0;
            }
        }
    }
    io_uring_cq_advance(&tun->ring, n);
    if (nb) {
        int r = ring_batch(tun, t, idx, nb, now);
        if (!rc)
            rc = r;
    }
    return rc;
}

static int ring_run(struct lb_tun *tun)
{
    struct lb_worker *w = tun->w;
    struct lb_dataplane *dp = w->dp;
    uint32_t want = LB_TUN_READS_MIN;
    int rc = 0;

    while (!__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
        uint32_t got = 0, asked = 0;
        int empty = 0;

        /* 1. the last batch's writes, then reads, in one system call */
        while (asked < want && tun->nfree) {
            if ((rc = ring_read(tun)) < 0)
                break;
            asked++;
        }
        if (rc < 0 || (rc = ring_submit(tun)) < 0)
            break;
        /* 2. what completed: the pipeline over the packets read */
        if ((rc = ring_reap(tun, &got, &empty)) < 0)
            break;
        if (got) {
            spin_traffic(tun);
            want = ring_want(got);
        }
        /* every read found a packet: more is likely queued, look again at once */
        if (asked && !empty)
            continue;
        /* holding no table while spinning or asleep: a publish need not wait for us */
        __atomic_store_n(&w->qs, LB_QS_OFFLINE, __ATOMIC_SEQ_CST);
        if (spin_more(tun))
            continue;                 /* a look, not a loop: not counted */
        w->stats.loops++;
        /* 3. sleep until the queue has a packet (or a write completes, when
         * every buffer is being written) */
        if (tun->nfree && (rc = ring_poll(tun)) < 0)
            break;
        struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = LB_TUN_SLEEP_MS * 1000000ll };
        struct io_uring_cqe *c;
        int r = io_uring_submit_and_wait_timeout(&tun->ring, &c, 1, &ts, NULL);
        if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
            rc = r;
            break;
        }
    }
    lb_dp_leave(w);
    return rc;
}

/* Cancel every operation and wait (bounded) for their completions: only then
 * may the buffers be freed. 0, or -1 when some are still in flight. */
static int ring_drain(struct lb_tun *t)
{
    struct io_uring_sqe *sqe;
    uint64_t end = mono_ns() + 2000000000ull;

    ring_submit(t);
    if ((t->inflight || t->polling) && (sqe = ring_sqe(t)) != NULL) {
        io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
        io_uring_sqe_set_data64(sqe, ~0ull);
        ring_submit(t);
    }
    while (t->inflight && mono_ns() < end) {
        struct io_uring_cqe *c;
        struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = 100000000ll };
        int r = io_uring_wait_cqe_timeout(&t->ring, &c, &ts);
        if (r < 0)
            continue;
        if ((io_uring_cqe_get_data64(c) & 0xffffffffu) < t->nbufs)
            t->inflight--;
        io_uring_cqe_seen(&t->ring, c);
    }
    return t->inflight ? -1 : 0;
}

/* The ring, or -errno why not. */
static int ring_open(struct lb_tun *t)
{
    struct io_uring_params p;
    struct io_uring_sqe *sqe;
    struct io_uring_cqe *c;
    int r;

    /* completions are posted when this thread next enters the kernel (it
     * always does before it sleeps, and a peek enters when the flag says
     * work is pending): no interrupt of a worker in the middle of a batch */
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    r = io_uring_queue_init_params(LB_TUN_BUFS + 2, &t->ring, &p);
    if (r == -EINVAL) {
        memset(&p, 0, sizeof(p));
        r = io_uring_queue_init_params(LB_TUN_BUFS + 2, &t->ring, &p);
    }
    if (r < 0)
        return r;
    if (!(p.features & IORING_FEAT_EXT_ARG)) {
        /* the timed wait would need an SQE of its own in a full ring */
        r = -EOPNOTSUPP;
        goto fail;
    }
    /* a read that never waits needs RWF_NOWAIT on the TUN: a zero-length read
     * answers 0 where it is supported, -EOPNOTSUPP where not */
    sqe = io_uring_get_sqe(&t->ring);
    io_uring_prep_read(sqe, t->w->fd, NULL, 0, 0);
    sqe->rw_flags = RWF_NOWAIT;
    io_uring_sqe_set_data64(sqe, 0);
    r = io_uring_submit_and_wait(&t->ring, 1);
    if (r >= 0)
        r = io_uring_peek_cqe(&t->ring, &c);
    if (r < 0)
        goto fail;
    r = c->res;
    io_uring_cqe_seen(&t->ring, c);
    if (r != 0) {
        r = r < 0 ? r : -EIO;
        goto fail;
    }
    return 0;
fail:
    io_uring_queue_exit(&t->ring);
    return r;
}
#endif

/* ---- life cycle ----------------------------------------------------------- */

struct lb_tun *lb_tun_open(struct lb_worker *w, int want_uring, int *err)
{
    struct lb_tun *t;

    *err = 0;
    if (w->fd < 0) {
        *err = -EBADF;
        return NULL;
    }
    t = calloc(1, sizeof(*t));
    if (!t) {
        *err = -ENOMEM;
        return NULL;
    }
    t->w = w;
    t->io = LB_TUN_IO_RW;
    t->nbufs = LB_TUN_BATCH;
#if LB_HAVE_URING
    t->fallback = want_uring ? ring_open(t) : -ECANCELED;
    if (!t->fallback) {
        t->io = LB_TUN_IO_URING;
        t->nbufs = LB_TUN_BUFS;
        for (uint32_t i = 0; i < t->nbufs; i++)
            ring_free(t, i);
    }
#else
    t->fallback = want_uring ? -ENOSYS : -ECANCELED;
#endif
    /* GSO super-packets up to 64 KiB each, allocated once per worker run */
    t->bufs = malloc((size_t)t->nbufs * LB_PKT_MAX);
    if (!t->bufs) {
        lb_tun_close(t);
        *err = -ENOMEM;
        return NULL;
    }
    return t;
}

int lb_tun_io(const struct lb_tun *t)
{
    return t->io;
}

int lb_tun_fallback(const struct lb_tun *t)
{
    return t->fallback;
}

int lb_tun_run(struct lb_tun *t)
{
#if LB_HAVE_URING
    if (t->io == LB_TUN_IO_URING)
        return ring_run(t);
#endif
    return rw_run(t);
}

void lb_tun_close(struct lb_tun *t)
{
    int keep = 0;

    if (!t)
        return;
#if LB_HAVE_URING
    if (t->io == LB_TUN_IO_URING) {
        /* a buffer a read may still land in is never freed (kept, not reused) */
        keep = ring_drain(t) < 0;
        io_uring_queue_exit(&t->ring);
    }
#endif
    if (!keep)
        free(t->bufs);
    free(t);
}
