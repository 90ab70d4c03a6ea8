/* lb_frag.c - the fragment cache, see lb_frag.h for what it does and why.
 *
 * Layout: nsets (a power of two) sets of FRAG_WAYS entries, each set with
 * its own lock; a pool of `buffers` slots of LB_FRAG_SLOT bytes (the packet
 * at LB_OUT_HEADROOM, so a worker loop can put its L2 header in front) with
 * next[] links, shared by the free list and the per-entry chains of held
 * fragments, and len[] the held packet's length.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lb_dp.h"
#include "lb_frag.h"
#include "lb_hash.h"
#include "lb_lock.h"
#include "lb_nat.h"
#include "lb_out.h"

#define FRAG_WAYS 4u
#define NO_SLOT 0xFFFFFFFFu
#define FRAG_HOLD_BYTES (LB_FRAG_SLOT - LB_OUT_HEADROOM)

enum frag_state {
    FS_FREE = 0,
    FS_PENDING = 1,    /* later fragments seen, first not yet: some may be held */
    FS_FWD = 2,        /* first fragment forwarded: flow + dir apply */
    FS_DROP = 3,       /* first fragment dropped: reason applies */
    FS_PASS = 4,       /* first fragment passed (LB_PASS): so are the others */
};

struct frag_ent {
    uint8_t  src[16];
    uint8_t  dst[16];
    uint32_t id;                 /* as stored in the packet */
    uint8_t  nh;
    uint8_t  family;
    uint8_t  state;              /* enum frag_state */
    uint8_t  reason;             /* FS_DROP: enum lb_drop_reason */
    uint32_t created;            /* ms */
    uint32_t seen;               /* fragment data bytes counted */
    uint32_t total;              /* datagram data bytes (0: last fragment not seen) */
    uint32_t held;               /* chain of held slots, NO_SLOT = none */
    uint16_t n_held;
    uint8_t  dir;                /* FS_FWD: enum lb_dir */
    uint8_t  pad[5];
    struct lb_flow_entry flow;   /* FS_FWD: the translation */
};

struct frag_set {
    uint32_t lock;
    uint32_t pad[3];
    struct frag_ent e[FRAG_WAYS];
};

struct lb_frag {
    uint32_t nsets, mask, timeout_ms, buffers;
    uint64_t seed;
    uint32_t cursor;             /* lb_frag_expire's, atomic */
    uint32_t pool_lock;
    uint32_t free_head;
    uint32_t n_free;
    struct frag_set *sets;
    uint32_t *next;              /* [buffers] */
    uint16_t *len;               /* [buffers] */
    uint8_t  *buf;               /* [buffers * LB_FRAG_SLOT] */
    struct lb_frag_counters c;
};

/* ------------------------------------------------------------ buffer pool */

static uint32_t slot_get(struct lb_frag *fc)
{
    uint32_t s;

    lb_spin_lock(&fc->pool_lock);
    s = fc->free_head;
    if (s != NO_SLOT) {
        fc->free_head = fc->next[s];
        fc->n_free--;
    }
    lb_spin_unlock(&fc->pool_lock);
    return s;
}

void lb_frag_put_slot(struct lb_frag *fc, uint32_t s)
{
    if (!fc || s >= fc->buffers)
        return;
    lb_spin_lock(&fc->pool_lock);
    fc->next[s] = fc->free_head;
    fc->free_head = s;
    fc->n_free++;
    lb_spin_unlock(&fc->pool_lock);
}

static inline uint8_t *slot_data(struct lb_frag *fc, uint32_t s)
{
    return fc->buf + (size_t)s * LB_FRAG_SLOT + LB_OUT_HEADROOM;
}

/* Give every held fragment of e back; returns how many. Set lock held. */
static uint32_t drop_held(struct lb_frag *fc, struct frag_ent *e)
{
    uint32_t n = 0, s = e->held;

    while (s != NO_SLOT && n <= LB_FRAG_HOLD_MAX) {
        uint32_t nx = fc->next[s];
        lb_frag_put_slot(fc, s);
        s = nx;
        n++;
    }
    e->held = NO_SLOT;
    e->n_held = 0;
    return n;
}

/* ---------------------------------------------------------------- entries */

struct frag_key {
    uint8_t  src[16];
    uint8_t  dst[16];
    uint32_t id;
    uint8_t  nh, family, pad[2];
};

static inline void key_of(const struct lb_pkt *p, struct frag_key *k)
{
    memcpy(k->src, p->key.src, 16);
    memcpy(k->dst, p->key.dst, 16);
    k->id = p->frag_id;
    k->nh = p->frag_nh;
    k->family = p->family;
    k->pad[0] = k->pad[1] = 0;
}

static inline struct frag_set *set_of(struct lb_frag *fc, const struct frag_key *k)
{
    return &fc->sets[lb_hash_bytes(k, sizeof(*k), fc->seed) & fc->mask];
}

static inline int ent_is(const struct frag_ent *e, const struct frag_key *k)
{
    return e->state != FS_FREE && e->id == k->id && e->nh == k->nh && e->family == k->family
        && memcmp(e->src, k->src, 16) == 0 && memcmp(e->dst, k->dst, 16) == 0;
}

static inline int expired(const struct lb_frag *fc, const struct frag_ent *e, uint32_t now)
{
    return (int32_t)(now - e->created) >= (int32_t)fc->timeout_ms;
}

/* The live entry of k in set s, or NULL; a timed-out one is forgotten on
 * the way. Set lock held. */
static struct frag_ent *find(struct lb_frag *fc, struct frag_set *s, const struct frag_key *k,
                             uint32_t now)
{
    for (uint32_t i = 0; i < FRAG_WAYS; i++) {
        struct frag_ent *e = &s->e[i];
        if (!ent_is(e, k))
            continue;
        if (expired(fc, e, now)) {
            LB_CNT_INC(&fc->c.timeouts);
            __atomic_fetch_add(&fc->c.timeout_held, drop_held(fc, e), __ATOMIC_RELAXED);
            e->state = FS_FREE;
            return NULL;
        }
        return e;
    }
    return NULL;
}

/* A fresh entry for k in set s: a free way, else an expired one, else the
 * oldest undecided, else the oldest decided. Set lock held. */
static struct frag_ent *alloc(struct lb_frag *fc, struct frag_set *s, const struct frag_key *k,
                              uint32_t now)
{
    struct frag_ent *pick = NULL, *old_pending = NULL, *old_any = NULL;

    for (uint32_t i = 0; i < FRAG_WAYS && !pick; i++) {
        struct frag_ent *e = &s->e[i];
        if (e->state == FS_FREE) {
            pick = e;
        } else if (expired(fc, e, now)) {
            LB_CNT_INC(&fc->c.timeouts);
            __atomic_fetch_add(&fc->c.timeout_held, drop_held(fc, e), __ATOMIC_RELAXED);
            pick = e;
        } else {
            if (e->state == FS_PENDING
                && (!old_pending || (int32_t)(e->created - old_pending->created) < 0))
                old_pending = e;
            if (!old_any || (int32_t)(e->created - old_any->created) < 0)
                old_any = e;
        }
    }
    if (!pick) {
        pick = old_pending ? old_pending : old_any;
        LB_CNT_INC(&fc->c.evicted);
        __atomic_fetch_add(&fc->c.dropped, drop_held(fc, pick), __ATOMIC_RELAXED);
    }
    memset(pick, 0, sizeof(*pick));
    memcpy(pick->src, k->src, 16);
    memcpy(pick->dst, k->dst, 16);
    pick->id = k->id;
    pick->nh = k->nh;
    pick->family = k->family;
    pick->state = FS_PENDING;
    pick->created = now;
    pick->held = NO_SLOT;
    return pick;
}

/* Count p's bytes into e; 1 when the datagram is now complete. */
static int account(struct frag_ent *e, const struct lb_pkt *p)
{
    e->seen += p->frag_len;
    if (p->frag_last)
        e->total = (uint32_t)p->frag_off + p->frag_len;
    return e->total && e->seen >= e->total;
}

/* ------------------------------------------------------------ public API */

struct lb_frag *lb_frag_new(uint32_t entries, uint32_t buffers, uint32_t timeout_ms,
                            uint64_t seed)
{
    struct lb_frag *fc;
    uint32_t nsets = 1;

    if (entries < FRAG_WAYS || entries > (1u << 24) || buffers > (1u << 20) || timeout_ms == 0
        || timeout_ms > (1u << 30))
        return NULL;
    while (nsets * FRAG_WAYS < entries)
        nsets <<= 1;
    fc = calloc(1, sizeof(*fc));
    if (!fc)
        return NULL;
    fc->nsets = nsets;
    fc->mask = nsets - 1;
    fc->timeout_ms = timeout_ms;
    fc->buffers = buffers;
    fc->seed = seed;
    fc->free_head = NO_SLOT;
    fc->sets = calloc(nsets, sizeof(struct frag_set));
    if (buffers) {
        fc->next = malloc((size_t)buffers * sizeof(uint32_t));
        fc->len = calloc(buffers, sizeof(uint16_t));
        fc->buf = malloc((size_t)buffers * LB_FRAG_SLOT);
    }
    if (!fc->sets || (buffers && (!fc->next || !fc->len || !fc->buf))) {
        lb_frag_free(fc);
        return NULL;
    }
    for (uint32_t i = buffers; i-- > 0;) {
        fc->next[i] = fc->free_head;
        fc->free_head = i;
    }
    fc->n_free = buffers;
    return fc;
}

void lb_frag_free(struct lb_frag *fc)
{
    if (!fc)
        return;
    free(fc->sets);
    free(fc->next);
    free(fc->len);
    free(fc->buf);
    free(fc);
}

size_t lb_frag_memory(const struct lb_frag *fc)
{
    return sizeof(*fc) + (size_t)fc->nsets * sizeof(struct frag_set)
        + (size_t)fc->buffers * (LB_FRAG_SLOT + sizeof(uint32_t) + sizeof(uint16_t));
}

void lb_frag_get_counters(const struct lb_frag *fc, struct lb_frag_counters *out)
{
    const uint64_t *src = (const uint64_t *)&fc->c;
    uint64_t *dst = (uint64_t *)out;

    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

void lb_frag_usage(struct lb_frag *fc, uint32_t *entries, uint32_t *buffers,
                   uint32_t *cap_entries, uint32_t *cap_buffers)
{
    uint32_t n = 0;

    for (uint32_t i = 0; i < fc->nsets; i++)
        for (uint32_t j = 0; j < FRAG_WAYS; j++)
            n += __atomic_load_n(&fc->sets[i].e[j].state, __ATOMIC_RELAXED) != FS_FREE;
    *entries = n;
    *buffers = fc->buffers - __atomic_load_n(&fc->n_free, __ATOMIC_RELAXED);
    *cap_entries = fc->nsets * FRAG_WAYS;
    *cap_buffers = fc->buffers;
}

void lb_frag_decide(struct lb_worker *w, const struct lb_pkt *p, const struct lb_flow_entry *e,
                    enum lb_dir dir, enum lb_drop_reason drop, uint32_t now)
{
    struct lb_frag *fc = w->dp->frag;
    struct frag_key k;
    struct frag_set *s;
    struct frag_ent *ent;
    uint32_t sl;

    if (!fc)
        return;
    key_of(p, &k);
    s = set_of(fc, &k);
    lb_spin_lock(&s->lock);
    ent = find(fc, s, &k, now);
    if (!ent) {
        ent = alloc(fc, s, &k, now);
    } else if (ent->state != FS_PENDING) {
        /* the ID came round again (or a duplicate first fragment): start over */
        ent->seen = ent->total = 0;
        ent->created = now;
    }
    LB_CNT_INC(&fc->c.first);
    if (drop == LB_DROP_NONE && !e) {
        /* passed: the later fragments follow it unchanged; held ones are
         * dropped (out of order and no reply: not worth a copy back) */
        ent->state = FS_PASS;
        __atomic_fetch_add(&fc->c.dropped, drop_held(fc, ent), __ATOMIC_RELAXED);
    } else if (drop != LB_DROP_NONE || !e) {
        ent->state = FS_DROP;
        ent->reason = (uint8_t)(drop != LB_DROP_NONE ? drop : LB_DROP_FRAGMENT);
        __atomic_fetch_add(&fc->c.dropped, drop_held(fc, ent), __ATOMIC_RELAXED);
    } else {
        ent->state = FS_FWD;
        ent->dir = (uint8_t)dir;
        ent->flow = *e;
        sl = ent->held;
        for (uint32_t n = 0; sl != NO_SLOT && n <= LB_FRAG_HOLD_MAX; n++) {
            uint32_t nx = fc->next[sl];
            uint8_t *d = slot_data(fc, sl);
            lb_nat_rewrite_ip(d, ent->family, e, dir);
            if (lb_out_add(w, d, fc->len[sl], sl, LB_OUT_FWD) == 0)
                LB_CNT_INC(&fc->c.released);
            else
                LB_CNT_INC(&fc->c.dropped);
            sl = nx;
        }
        ent->held = NO_SLOT;
        ent->n_held = 0;
    }
    if (account(ent, p)) {
        ent->state = FS_FREE;
        LB_CNT_INC(&fc->c.completed);
    }
    lb_spin_unlock(&s->lock);
}

enum lb_verdict lb_frag_later(struct lb_worker *w, struct lb_pkt *p, int may_hold, uint32_t now,
                              struct lb_flow_entry *e, enum lb_dir *dir,
                              enum lb_drop_reason *reason)
{
    struct lb_frag *fc = w->dp->frag;
    struct frag_key k;
    struct frag_set *s;
    struct frag_ent *ent;
    uint32_t sl;

    if (!fc) {
        *reason = LB_DROP_FRAGMENT;
        return LB_DROP;
    }
    key_of(p, &k);
    s = set_of(fc, &k);
    lb_spin_lock(&s->lock);
    ent = find(fc, s, &k, now);
    if (ent && ent->state == FS_FWD) {
        lb_nat_rewrite(p, &ent->flow, (enum lb_dir)ent->dir);
        *e = ent->flow;
        *dir = (enum lb_dir)ent->dir;
        if (account(ent, p) && !ent->n_held) {
            ent->state = FS_FREE;
            LB_CNT_INC(&fc->c.completed);
        }
        lb_spin_unlock(&s->lock);
        LB_CNT_INC(&fc->c.forwarded);
        *reason = LB_DROP_NONE;
        return LB_TX;
    }
    if (ent && ent->state == FS_DROP) {
        *reason = (enum lb_drop_reason)ent->reason;
        if (account(ent, p))
            ent->state = FS_FREE;
        lb_spin_unlock(&s->lock);
        LB_CNT_INC(&fc->c.dropped);
        return LB_DROP;
    }
    if (ent && ent->state == FS_PASS) {
        if (account(ent, p))
            ent->state = FS_FREE;
        lb_spin_unlock(&s->lock);
        *reason = LB_DROP_NONE;
        return LB_PASS;
    }
    if (!may_hold) {
        lb_spin_unlock(&s->lock);
        *reason = LB_DROP_NO_VIP;
        return LB_DROP;
    }
    if (p->len > FRAG_HOLD_BYTES || (ent && ent->n_held >= LB_FRAG_HOLD_MAX)
        || (sl = slot_get(fc)) == NO_SLOT) {
        lb_spin_unlock(&s->lock);
        LB_CNT_INC(&fc->c.early_dropped);
        *reason = LB_DROP_FRAG_EARLY;
        return LB_DROP;
    }
    if (!ent)
        ent = alloc(fc, s, &k, now);
    memcpy(slot_data(fc, sl), p->data, p->len);
    fc->len[sl] = (uint16_t)p->len;
    fc->next[sl] = ent->held;
    ent->held = sl;
    ent->n_held++;
    account(ent, p);
    lb_spin_unlock(&s->lock);
    LB_CNT_INC(&fc->c.held);
    *reason = LB_DROP_NONE;
    return LB_HOLD;
}

uint32_t lb_frag_expire(struct lb_frag *fc, uint32_t now, uint32_t max_sets)
{
    uint32_t gone = 0;

    if (!fc)
        return 0;
    if (max_sets > fc->nsets)
        max_sets = fc->nsets;
    for (uint32_t i = 0; i < max_sets; i++) {
        struct frag_set *s = &fc->sets[__atomic_fetch_add(&fc->cursor, 1u, __ATOMIC_RELAXED)
                                       & fc->mask];
        lb_spin_lock(&s->lock);
        for (uint32_t j = 0; j < FRAG_WAYS; j++) {
            struct frag_ent *e = &s->e[j];
            if (e->state != FS_FREE && expired(fc, e, now)) {
                LB_CNT_INC(&fc->c.timeouts);
                __atomic_fetch_add(&fc->c.timeout_held, drop_held(fc, e), __ATOMIC_RELAXED);
                e->state = FS_FREE;
                gone++;
            }
        }
        lb_spin_unlock(&s->lock);
    }
    return gone;
}
