/* lb_out.c - a worker's out list, see lb_out.h. */
#include "lb_dp.h"
#include "lb_frag.h"
#include "lb_out.h"

uint8_t *lb_out_scratch(struct lb_worker *w)
{
    struct lb_out *o = &w->out;

    if (!o->scratch || o->n_scratch >= LB_OUT_SCRATCH)
        return NULL;
    return o->scratch + (size_t)o->n_scratch++ * LB_OUT_SLOT + LB_OUT_HEADROOM;
}

int lb_out_add(struct lb_worker *w, uint8_t *data, uint32_t len, uint32_t slot, uint8_t kind)
{
    struct lb_out *o = &w->out;

    if (o->n >= LB_OUT_MAX) {
        w->stats.out_dropped++;
        if (slot != LB_OUT_NO_SLOT)
            lb_frag_put_slot(w->dp->frag, slot);
        return -1;
    }
    o->pkt[o->n].data = data;
    o->pkt[o->n].len = len;
    o->pkt[o->n].slot = slot;
    o->pkt[o->n].kind = kind;
    o->n++;
    w->stats.tx++;
    w->stats.tx_bytes += len;
    return 0;
}

void lb_out_done(struct lb_worker *w)
{
    struct lb_out *o = &w->out;

    for (uint32_t i = 0; i < o->n; i++)
        if (o->pkt[i].slot != LB_OUT_NO_SLOT)
            lb_frag_put_slot(w->dp->frag, o->pkt[i].slot);
    o->n = 0;
    o->n_scratch = 0;
}
