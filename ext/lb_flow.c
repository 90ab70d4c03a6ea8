/* lb_flow.c - the connection (flow) table, shared by all workers.
 *
 * Layout (everything allocated once in lb_flow_new, nothing afterwards):
 *
 *   slot[capacity]       struct ft_slot, 80 bytes: the 72-byte struct
 *                        lb_flow_entry of one connection + its two chain
 *                        links, next[0] in the forward index (client -> VIP
 *                        key; for a free slot: the free-list link) and next[1]
 *                        in the reverse index (backend -> client key).
 *                        Links live next to the entry rather than in parallel
 *                        arrays: reaching an entry then brings its link along
 *                        (80 bytes at a 16-byte stride span two cache lines,
 *                        never three), one DRAM miss less per chain step.
 *   head_fwd[nbuckets]   bucket heads of the forward index
 *   head_rev[nbuckets]   bucket heads of the reverse index
 *   sfwd[], srev[]       striped spinlocks, one cache line each, over the
 *                        buckets of each index (stripe = bucket & smask)
 *   act_be[], act_vip[]  active flows per stats slot (LB_MAX_STAT_IDS each)
 *
 * Links and heads hold "slot numbers" = index + 1, so 0 is the end of a chain
 * and zeroed memory is an empty table: pages of a large table are committed
 * only as flows arrive. nbuckets is the power of two >= capacity (load factor
 * <= 1, chains of ~1 entry). Slots above the high-water mark `hw` have never
 * been used and are free without being on the free list.
 *
 * Memory per connection: 80 (slot) + 8..16 (two bucket heads, depending on
 * how far capacity is below its power of two) = 88..96 bytes, plus a fixed
 * ~0.6 MiB (stats slots, stripes); lb_flow_memory() is exact: at a capacity
 * of 2^20 it is 88.6 bytes per connection.
 *
 * Speed: a lookup in a table much bigger than the cache is 2-3 dependent DRAM
 * misses (bucket head, slot, maybe the next slot), and the lock's atomic
 * keeps the CPU from overlapping them with the next packet's; so the data
 * plane should use lb_flow_lookup_batch, which prefetches a whole group of
 * lookups stage by stage (see there).
 *
 * The hash is a private, keyed wyhash-style multiply-fold over the five 64-bit
 * words of the 40-byte key; the six 64-bit secrets are derived from the
 * random per-start seed (splitmix64), so outsiders cannot aim keys at one
 * bucket. (On 2^20 structured keys, sequential addresses and ports, its chain
 * lengths follow Poisson(1) in both indexes, as a random function's would.)
 *
 * Concurrency (a reply may reach another worker than its request):
 *
 *  - A chain of the forward index is read and written only under the forward
 *    stripe lock of its bucket, a chain of the reverse index only under the
 *    reverse stripe lock of its bucket.
 *  - Linking and unlinking an entry (insert, delete, expire, evict, purge)
 *    takes its forward stripe, then its reverse stripe: every thread takes at
 *    most one stripe of each kind and always forward first, so there is no
 *    lock cycle (deadlock-free). An entry is therefore linked in both indexes
 *    or in neither, as seen by anyone holding either of its stripes.
 *  - The key fields of an entry change only while it is unlinked (between
 *    removal and re-insertion), so they are stable for anyone holding one of
 *    its stripes and finding it in the matching chain.
 *  - A lookup takes ONE stripe (of the index it searches), so a forward and a
 *    reverse lookup of the same flow can run at the same time. They touch only
 *    state+flags (one 16-bit word, compare-and-swap) and last_seen (32-bit
 *    atomic store); everything else is read-only while linked. The lookup
 *    copies the entry out before unlocking: callers never keep a pointer
 *    into the table, so an entry can be reused as soon as it is unlinked.
 *  - Scans (expire, evict, purge, walk) go by slot number, not by bucket:
 *    they read a racy snapshot of the slot, lock the stripes its key hashes
 *    to, and then confirm under the lock that the slot is in that forward
 *    chain with exactly the snapshot's key (ft_grab). A slot that changed
 *    meanwhile fails the check and is skipped.
 *  - The free list has its own lock, a leaf lock (never held while taking a
 *    stripe). Counters are relaxed atomics on their own cache lines.
 *  - Locks are test-and-test-and-set spinlocks that yield the CPU after a
 *    bounded spin (critical sections are a few hundred ns; yielding keeps a
 *    preempted holder from stalling spinners on an oversubscribed machine).
 *
 * Why not lock-free readers (seqlock/RCU)? Every lookup writes (last_seen,
 * state), so readers dirty the entry's cache line anyway; a stripe lock costs
 * one uncontended atomic on a line that 1024 stripes spread thin, and keeps
 * every invariant provable by lb_flow_check.
 *
 * State machine (lb_flow_lookup; the caller inserts TCP as SYN, UDP as UDP):
 * RST in either direction -> CLOSE; FIN in either direction -> FIN (unless
 * CLOSE); in SYN, a backend packet that is not RST sets F_FLOW_REV_SEEN and a
 * later client ACK without SYN then makes it EST (so a SYN flood whose
 * clients never ACK stays half-open, and a flow picked up mid-stream becomes
 * EST once both sides have spoken); UDP becomes UDP_STREAM at the first
 * backend packet. One more rule: a client's bare SYN on a FIN or
 * CLOSE entry starts the tuple over as SYN (port reuse after TIME_WAIT), so a
 * reused tuple is not stuck with the short CLOSE timeout.
 *
 * Timeouts: an entry idle past its state's timeout stays findable until
 * lb_flow_expire or an evicting insert removes it; a packet that finds it
 * first revives it (same backend, which is what the connection needs).
 *
 * Insert clashes: -EEXIST with the entry in place copied back, both when the
 * forward key exists (two workers racing on a flow's first packets) and when
 * the reverse key does (client:cport reaching one backend:bport via two
 * VIPs is one connection to the backend; replies could not be told apart).
 *
 * Eviction when full: an expired entry first, then the oldest "reclaimable"
 * one seen in the scan window. Reclaimable = state SYN (half-open), UDP with
 * no reply yet (a spoofed UDP flood is the UDP form of a SYN flood), CLOSE
 * (RST seen: the connection is over), and FIN of a connection that never got
 * established (SYN then FIN, so a flood cannot escape eviction by sending FIN).
 * A window also offers its least recently seen answered-UDP entry
 * (UDP_STREAM, counted as evicted_udp), taken when the window has no
 * reclaimable one or when it was seen longer ago than the window's oldest
 * reclaimable one (a legitimate handshake in progress is only milliseconds
 * idle, and must not give way to a flood's older answered entries): a backend answers whatever
 * source a datagram claims, so a spoofer with a UDP service behind the VIP
 * makes answered entries as fast as it sends, and with them protected it
 * could fill the table (then no new TCP connection would be tracked, and a
 * reload would break the ones it carries). Established TCP cannot be made
 * without seeing the backend's SYN-ACK, so established flows and FIN of
 * established connections are never evicted on insert: with no candidate
 * left, insert is refused with -ENOSPC (counted; the caller still forwards by
 * Maglev). Taking the victim from the first window that has a candidate
 * keeps an insert under a flood at one window of work; an evicted
 * UDP flow that is still alive is re-picked by Maglev on its next packet
 * (the same backend while the table is unchanged). The scan runs from a
 * shared clock cursor in windows of FT_EVICT_BUDGET slots and does not give
 * up while the atomic count of evictable entries (reclaimable or answered
 * UDP) is non-zero (bounded by two laps of the table against races).
 */
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "lb_flow.h"
#include "lb_debug.h"
#include "lb_proto.h"
#include "lb_sync.h"

#define FT_NSTRIPES     1024u   /* stripes per index (power of two) */
#define FT_EVICT_BUDGET 64u     /* slots per eviction scan window */
#define FT_SPIN_YIELD   128u    /* spins before sched_yield() */
#define FT_PF_GROUP     16u     /* lookups whose cache misses overlap */
#define FT_STATE_FREE   0xFFu   /* state byte of an unused slot */
#define FT_CACHELINE    64u
#define FT_HUGE         (2u << 20)  /* arrays this big get their own mapping */

_Static_assert(sizeof(struct lb_flow_entry) == 72, "lb_flow_entry layout");
_Static_assert(sizeof(struct lb_flow_key) == 40, "lb_flow_key layout");
_Static_assert(sizeof(struct lb_flow_entry) % 8 == 0, "slot stride");
_Static_assert(offsetof(struct lb_flow_entry, state) % 8 == 0, "key words");
_Static_assert(offsetof(struct lb_flow_entry, flags) ==
               offsetof(struct lb_flow_entry, state) + 1, "state word");
_Static_assert(offsetof(struct lb_flow_entry, state) % 2 == 0, "state word alignment");
_Static_assert(LB_FS_SYN == 0 && LB_FS_EST == 1 && LB_FS_FIN == 2 && LB_FS_CLOSE == 3 &&
               LB_FS_UDP == 4 && LB_FS_UDP_STREAM == 5,
               "timeouts are indexed by state in the order of struct lb_timeouts");

typedef uint16_t ft_u16 __attribute__((may_alias));
typedef uint64_t ft_u64 __attribute__((may_alias));

/* Links and key words that lock-free hint readers (the prefetch passes of
 * lb_flow_lookup_batch, the snapshots of scans) may read while a lock holder
 * writes them are stored with relaxed atomics: plain moves on x86-64 and
 * arm64, but no data race in the C11 sense (ThreadSanitizer stays quiet). */
#define FT_ST(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define FT_LD(p) __atomic_load_n((p), __ATOMIC_RELAXED)

struct ft_stripe {
    uint32_t lock;
    uint8_t  pad[FT_CACHELINE - sizeof(uint32_t)];
} __attribute__((aligned(FT_CACHELINE)));

/* An entry with its two chain links: a lookup that reaches the entry has its
 * link in the same two cache lines (80 bytes at a 16-byte stride never span
 * three), so walking a chain costs one miss per element. */
struct ft_slot {
    struct lb_flow_entry e;
    uint32_t next[2];              /* [0] forward chain (or free list), [1] reverse */
} __attribute__((aligned(8)));     /* key words are loaded as atomic uint64 */

struct lb_flowtable {
    /* read-only after lb_flow_new (timeouts: relaxed atomics) */
    uint32_t capacity;
    uint32_t nbuckets;
    uint32_t bmask;
    uint32_t smask;
    uint64_t k[6];                 /* hash secrets */
    uint32_t tmo[6];               /* idle timeout by state, ms */
    struct ft_slot *slot;
    uint32_t *head_fwd, *head_rev;
    uint32_t *act_be, *act_vip;
    struct ft_stripe *sfwd, *srev;
    size_t memory;
    size_t sz_slot, sz_head;   /* byte sizes, for munmap */
    int slot_ext;                  /* slot[] is the caller's (a file mapping) */

    /* free list: lock + head + high-water mark */
    _Alignas(FT_CACHELINE) uint32_t free_lock;
    uint32_t free_head;            /* slot number, 0 = empty */
    uint32_t hw;                   /* slots 1..hw have been used */

    _Alignas(FT_CACHELINE) uint32_t n_live;
    uint32_t n_reclaim;            /* live entries that eviction may take (ft_evictable) */

    _Alignas(FT_CACHELINE) uint32_t clock;       /* eviction cursor */
    uint32_t exp_cursor;                         /* lb_flow_expire cursor */

    _Alignas(FT_CACHELINE) struct lb_flow_counters cnt;

    /* flows removed on their own, for sync peers (lb_flow_set_end_ring) */
    _Alignas(FT_CACHELINE) uint32_t end_lock;
    struct lb_sync_ring *end_ring;               /* atomic; NULL = not reported */
};

/* ---- small helpers ---------------------------------------------------- */

static inline void
ft_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline void
ft_lock(uint32_t *l)
{
    for (;;) {
        if (!__atomic_exchange_n(l, 1u, __ATOMIC_ACQUIRE))
            return;
        uint32_t spins = 0;
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
            ft_relax();
            if (++spins >= FT_SPIN_YIELD) {
                sched_yield();
                spins = 0;
            }
        }
    }
}

static inline void
ft_unlock(uint32_t *l)
{
    __atomic_store_n(l, 0u, __ATOMIC_RELEASE);
}

#define FT_INC(p, n) __atomic_fetch_add((p), (n), __ATOMIC_RELAXED)
#define FT_DEC(p, n) __atomic_fetch_sub((p), (n), __ATOMIC_RELAXED)

static inline uint64_t
ft_splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t
ft_mum(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

/* Keyed hash of a 40-byte flow key (five 64-bit words). */
static inline uint64_t
ft_hash(const struct lb_flowtable *ft, const struct lb_flow_key *key)
{
    uint64_t w[5];
    memcpy(w, key, sizeof(w));
    uint64_t h = ft_mum(w[0] ^ ft->k[0], w[1] ^ ft->k[1]);
    h ^= ft_mum(w[2] ^ ft->k[2], w[3] ^ ft->k[3]);
    return ft_mum(h ^ w[4] ^ ft->k[4], ft->k[5]);
}

static inline uint64_t
ft_ld64(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint32_t
ft_ld32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* The 4 bytes sport,dport of a key vs. two ports of an entry. */
static inline uint32_t
ft_ports(uint16_t a, uint16_t b)
{
    uint16_t two[2] = {a, b};
    return ft_ld32(two);
}

static inline int
ft_match_fwd(const struct lb_flow_entry *e, const struct lb_flow_key *k)
{
    uint64_t d = (ft_ld64(e->client) ^ ft_ld64(k->src)) |
                 (ft_ld64(e->client + 8) ^ ft_ld64(k->src + 8)) |
                 (ft_ld64(e->vip) ^ ft_ld64(k->dst)) |
                 (ft_ld64(e->vip + 8) ^ ft_ld64(k->dst + 8));
    return d == 0 && ft_ports(e->cport, e->vport) == ft_ld32(&k->sport) &&
           e->proto == k->proto && e->family == k->family;
}

static inline int
ft_match_rev(const struct lb_flow_entry *e, const struct lb_flow_key *k)
{
    uint64_t d = (ft_ld64(e->backend) ^ ft_ld64(k->src)) |
                 (ft_ld64(e->backend + 8) ^ ft_ld64(k->src + 8)) |
                 (ft_ld64(e->client) ^ ft_ld64(k->dst)) |
                 (ft_ld64(e->client + 8) ^ ft_ld64(k->dst + 8));
    return d == 0 && ft_ports(e->bport, e->cport) == ft_ld32(&k->sport) &&
           e->proto == k->proto && e->family == k->family;
}

/* state (low byte in memory order) and flags as one atomic word */
static inline ft_u16 *
ft_stw(struct lb_flow_entry *e)
{
    return (ft_u16 *)(void *)&e->state;
}

static inline uint16_t
ft_sw_make(uint8_t state, uint8_t flags)
{
    uint8_t b[2] = {state, flags};
    uint16_t v;
    memcpy(&v, b, sizeof(v));
    return v;
}

static inline uint8_t
ft_sw_state(uint16_t v)
{
    uint8_t b[2];
    memcpy(b, &v, sizeof(b));
    return b[0];
}

static inline uint8_t
ft_sw_flags(uint16_t v)
{
    uint8_t b[2];
    memcpy(b, &v, sizeof(b));
    return b[1];
}

/* May eviction take an entry in this state? (see the file header) */
static inline int
ft_reclaimable(uint8_t state, uint8_t flags)
{
    switch (state) {
    case LB_FS_SYN:
    case LB_FS_UDP:
    case LB_FS_CLOSE:
        return 1;
    case LB_FS_FIN:
        return !(flags & F_FLOW_EST_SEEN);
    default:
        return 0;
    }
}

/* May eviction take it at all: reclaimable, or answered UDP (see the file
 * header for which one a scan window gives up). n_reclaim counts these. */
static inline int
ft_evictable(uint8_t state, uint8_t flags)
{
    return state == LB_FS_UDP_STREAM || ft_reclaimable(state, flags);
}

static inline int
ft_expired(const struct lb_flowtable *ft, uint8_t state, uint32_t last_seen, uint32_t now)
{
    if (state > LB_FS_UDP_STREAM)
        return 0;
    int32_t idle = (int32_t)(now - last_seen);
    return idle > (int32_t)__atomic_load_n(&ft->tmo[state], __ATOMIC_RELAXED);
}

/* The TCP/UDP state machine: the (state, flags) after one packet. */
static inline uint16_t
ft_advance(uint16_t sw, enum lb_dir dir, uint8_t tcp)
{
    uint8_t st = ft_sw_state(sw), fl = ft_sw_flags(sw);

    if (st == LB_FS_UDP || st == LB_FS_UDP_STREAM) {
        if (dir == LB_DIR_REV) {
            st = LB_FS_UDP_STREAM;
            fl |= F_FLOW_REV_SEEN;
        }
        return ft_sw_make(st, fl);
    }
    if (tcp & LB_TCP_RST)
        return ft_sw_make(LB_FS_CLOSE, fl);
    /* A client's fresh SYN on the tuple of a finished connection opens a
     * new one (port reuse after TIME_WAIT): start over as half-open. */
    if (dir == LB_DIR_FWD && (tcp & (LB_TCP_SYN | LB_TCP_ACK | LB_TCP_FIN)) == LB_TCP_SYN &&
        (st == LB_FS_FIN || st == LB_FS_CLOSE))
        return ft_sw_make(LB_FS_SYN, 0);
    if (dir == LB_DIR_REV)
        fl |= F_FLOW_REV_SEEN;
    if (tcp & LB_TCP_FIN) {
        if (st != LB_FS_CLOSE)
            st = LB_FS_FIN;
        return ft_sw_make(st, fl);
    }
    if (st == LB_FS_SYN && dir == LB_DIR_FWD && (fl & F_FLOW_REV_SEEN) &&
        (tcp & (LB_TCP_ACK | LB_TCP_SYN)) == LB_TCP_ACK) {
        st = LB_FS_EST;
        fl |= F_FLOW_EST_SEEN;
    }
    return ft_sw_make(st, fl);
}

/* The 56 key bytes (client, vip, backend, ports, proto, family) as seven
 * atomic 64-bit words. */
static inline void
ft_key_store(struct lb_flow_entry *dst, const struct lb_flow_entry *src)
{
    ft_u64 *d = (ft_u64 *)(void *)dst;
    for (size_t i = 0; i < LB_FLOW_KEYBYTES / 8; i++) {
        uint64_t w;
        memcpy(&w, (const uint8_t *)src + 8 * i, 8);
        FT_ST(&d[i], w);
    }
}

static inline void
ft_key_load(struct lb_flow_entry *dst, const struct lb_flow_entry *src)
{
    const ft_u64 *s = (const ft_u64 *)(const void *)src;
    for (size_t i = 0; i < LB_FLOW_KEYBYTES / 8; i++) {
        uint64_t w = FT_LD(&s[i]);
        memcpy((uint8_t *)dst + 8 * i, &w, 8);
    }
}

/* Copy a linked entry out; state word and last_seen may be changing under a
 * lookup through the other index, so they are read atomically. */
static inline void
ft_copy_out(struct lb_flow_entry *out, struct lb_flow_entry *e)
{
    memcpy(out, e, LB_FLOW_KEYBYTES);
    uint16_t sw = __atomic_load_n(ft_stw(e), __ATOMIC_RELAXED);
    out->state = ft_sw_state(sw);
    out->flags = ft_sw_flags(sw);
    out->pad1 = 0;
    out->vip_stat = e->vip_stat;
    out->be_stat = e->be_stat;
    out->last_seen = __atomic_load_n(&e->last_seen, __ATOMIC_RELAXED);
}

/* Racy snapshot of a slot for scans; confirmed later by ft_grab. */
static inline void
ft_snapshot(struct lb_flow_entry *snap, struct lb_flow_entry *e)
{
    ft_key_load(snap, e);           /* may be torn: ft_grab re-checks */
    uint16_t sw = __atomic_load_n(ft_stw(e), __ATOMIC_RELAXED);
    snap->state = ft_sw_state(sw);
    snap->flags = ft_sw_flags(sw);
    snap->last_seen = __atomic_load_n(&e->last_seen, __ATOMIC_RELAXED);
}

static inline uint32_t *
ft_fwd_lock(struct lb_flowtable *ft, uint32_t bucket)
{
    return &ft->sfwd[bucket & ft->smask].lock;
}

static inline uint32_t *
ft_rev_lock(struct lb_flowtable *ft, uint32_t bucket)
{
    return &ft->srev[bucket & ft->smask].lock;
}

static inline void
ft_stat_add(uint32_t *arr, uint32_t id, int up)
{
    if (id >= LB_MAX_STAT_IDS)
        return;
    if (up)
        FT_INC(&arr[id], 1u);
    else
        FT_DEC(&arr[id], 1u);
}

/* ---- free list -------------------------------------------------------- */

static uint32_t
ft_alloc(struct lb_flowtable *ft)
{
    uint32_t s = 0;
    ft_lock(&ft->free_lock);
    if (ft->free_head) {
        s = ft->free_head;
        ft->free_head = FT_LD(&ft->slot[s - 1].next[0]);
    } else if (ft->hw < ft->capacity) {
        s = ft->hw + 1;
        __atomic_store_n(&ft->hw, s, __ATOMIC_RELEASE);
    }
    ft_unlock(&ft->free_lock);
    return s;
}

static void
ft_release(struct lb_flowtable *ft, uint32_t s)
{
    ft_lock(&ft->free_lock);
    FT_ST(&ft->slot[s - 1].next[0], ft->free_head);
    ft->free_head = s;
    ft_unlock(&ft->free_lock);
}

/* ---- chains (caller holds the stripe) ---------------------------------- */

static inline uint32_t
ft_find_fwd(const struct lb_flowtable *ft, uint32_t b, const struct lb_flow_key *k)
{
    for (uint32_t s = ft->head_fwd[b]; s; s = ft->slot[s - 1].next[0])
        if (ft_match_fwd(&ft->slot[s - 1].e, k))
            return s;
    return 0;
}

static inline uint32_t
ft_find_rev(const struct lb_flowtable *ft, uint32_t b, const struct lb_flow_key *k)
{
    for (uint32_t s = ft->head_rev[b]; s; s = ft->slot[s - 1].next[1])
        if (ft_match_rev(&ft->slot[s - 1].e, k))
            return s;
    return 0;
}

static inline void
ft_chain_del(struct lb_flowtable *ft, uint32_t *head, int rev, uint32_t s)
{
    uint32_t *pp = head;
    while (*pp && *pp != s)
        pp = &ft->slot[*pp - 1].next[rev];
    LB_ASSERT(*pp == s);
    if (*pp == s)
        FT_ST(pp, ft->slot[s - 1].next[rev]);
}

/* Unlink slot s (both stripes held) and mark it free. The slot is not put
 * on the free list: the caller reuses or releases it. */
static void
ft_unlink(struct lb_flowtable *ft, uint32_t s, uint32_t bf, uint32_t br)
{
    struct lb_flow_entry *e = &ft->slot[s - 1].e;
    ft_chain_del(ft, &ft->head_fwd[bf], 0, s);
    ft_chain_del(ft, &ft->head_rev[br], 1, s);
    uint16_t sw = __atomic_load_n(ft_stw(e), __ATOMIC_RELAXED);
    if (ft_evictable(ft_sw_state(sw), ft_sw_flags(sw)))
        FT_DEC(&ft->n_reclaim, 1u);
    FT_DEC(&ft->n_live, 1u);
    ft_stat_add(ft->act_be, e->be_stat, 0);
    ft_stat_add(ft->act_vip, e->vip_stat, 0);
    __atomic_store_n(ft_stw(e), ft_sw_make(FT_STATE_FREE, 0), __ATOMIC_RELAXED);
}

/* Snapshot slot s, lock its forward stripe (and its reverse stripe if
 * `both`), and confirm under the lock(s) that s is linked with exactly the
 * snapshot's key. Returns 1 with the lock(s) held and *snap's state,
 * flags and last_seen fresh; 0 with no lock held. */
static int
ft_grab(struct lb_flowtable *ft, uint32_t s, int both, struct lb_flow_entry *snap,
        uint32_t *bf, uint32_t *br)
{
    struct lb_flow_entry *e = &ft->slot[s - 1].e;
    struct lb_flow_key kf, kr;

    ft_snapshot(snap, e);
    if (snap->state == FT_STATE_FREE)
        return 0;
    lb_flow_key_fwd(snap, &kf);
    *bf = (uint32_t)ft_hash(ft, &kf) & ft->bmask;
    if (both) {
        lb_flow_key_rev(snap, &kr);
        *br = (uint32_t)ft_hash(ft, &kr) & ft->bmask;
    }
    ft_lock(ft_fwd_lock(ft, *bf));
    if (both)
        ft_lock(ft_rev_lock(ft, *br));
    uint32_t x = ft->head_fwd[*bf];
    while (x && x != s)
        x = ft->slot[x - 1].next[0];
    if (x == s && memcmp(snap, e, LB_FLOW_KEYBYTES) == 0) {
        ft_copy_out(snap, e);
        return 1;
    }
    if (both)
        ft_unlock(ft_rev_lock(ft, *br));
    ft_unlock(ft_fwd_lock(ft, *bf));
    return 0;
}

static inline void
ft_ungrab(struct lb_flowtable *ft, int both, uint32_t bf, uint32_t br)
{
    if (both)
        ft_unlock(ft_rev_lock(ft, br));
    ft_unlock(ft_fwd_lock(ft, bf));
}

enum ft_take_why { FT_TAKE_EXPIRED, FT_TAKE_RECLAIM, FT_TAKE_ANSWERED };

/* Unlink slot s if it is still live and still qualifies; 1 if unlinked,
 * with the entry as it was copied to *snap. */
static int
ft_take_snap(struct lb_flowtable *ft, uint32_t s, uint32_t now, enum ft_take_why why,
             struct lb_flow_entry *snap)
{
    uint32_t bf, br;
    if (!ft_grab(ft, s, 1, snap, &bf, &br))
        return 0;
    int ok = 1;
    if (why == FT_TAKE_EXPIRED)
        ok = ft_expired(ft, snap->state, snap->last_seen, now);
    else if (why == FT_TAKE_RECLAIM)
        ok = ft_reclaimable(snap->state, snap->flags) ||
             ft_expired(ft, snap->state, snap->last_seen, now);
    else if (why == FT_TAKE_ANSWERED)
        ok = ft_evictable(snap->state, snap->flags) ||
             ft_expired(ft, snap->state, snap->last_seen, now);
    if (ok)
        ft_unlink(ft, s, bf, br);
    ft_ungrab(ft, 1, bf, br);
    return ok;
}

void
lb_flow_set_end_ring(struct lb_flowtable *ft, struct lb_sync_ring *r)
{
    __atomic_store_n(&ft->end_ring, r, __ATOMIC_RELEASE);
}

struct lb_sync_ring *
lb_flow_end_ring(struct lb_flowtable *ft)
{
    return __atomic_load_n(&ft->end_ring, __ATOMIC_ACQUIRE);
}

/* Report a flow removed on its own (see lb_flow.h); bounded: a full ring counts a drop. */
static void
ft_end(struct lb_flowtable *ft, const struct lb_flow_entry *snap, uint16_t reason)
{
    struct lb_sync_ring *r = __atomic_load_n(&ft->end_ring, __ATOMIC_ACQUIRE);
    if (!r)
        return;
    struct lb_flow_entry ev = *snap;
    ev.pad1 = reason;
    ft_lock(&ft->end_lock);
    lb_sync_ring_push(r, &ev);
    ft_unlock(&ft->end_lock);
}

/* ft_take, reporting what it took as ended for `reason` (expired if it was). */
static int
ft_take_end(struct lb_flowtable *ft, uint32_t s, uint32_t now, enum ft_take_why why,
            uint16_t reason)
{
    struct lb_flow_entry snap;
    if (!ft_take_snap(ft, s, now, why, &snap))
        return 0;
    ft_end(ft, &snap, ft_expired(ft, snap.state, snap.last_seen, now) ? LB_FLOW_END_EXPIRED
                                                                         : reason);
    return 1;
}

/* ---- creation --------------------------------------------------------- */

void
lb_flow_default_timeouts(struct lb_timeouts *tmo)
{
    tmo->tcp_syn = LB_TMO_TCP_SYN_MS;
    tmo->tcp_est = LB_TMO_TCP_EST_MS;
    tmo->tcp_fin = LB_TMO_TCP_FIN_MS;
    tmo->tcp_close = LB_TMO_TCP_CLOSE_MS;
    tmo->udp = LB_TMO_UDP_MS;
    tmo->udp_stream = LB_TMO_UDP_STREAM_MS;
}

void
lb_flow_set_timeouts(struct lb_flowtable *ft, const struct lb_timeouts *tmo)
{
    struct lb_timeouts d;
    if (!tmo) {
        lb_flow_default_timeouts(&d);
        tmo = &d;
    }
    const uint32_t v[6] = {tmo->tcp_syn, tmo->tcp_est, tmo->tcp_fin,
                           tmo->tcp_close, tmo->udp, tmo->udp_stream};
    for (int i = 0; i < 6; i++)   /* wrap-safe compares need < 2^31 ms */
        __atomic_store_n(&ft->tmo[i], v[i] > INT32_MAX ? (uint32_t)INT32_MAX : v[i],
                         __ATOMIC_RELAXED);
}

/* Zeroed memory for one array. Big arrays get an anonymous mapping of their
 * own, 2 MiB aligned and marked MADV_HUGEPAGE: at 1M flows a lookup touches
 * ~80 MB at random, and with 4 KiB pages nearly every access would also miss
 * the TLB. Pages are committed only when first written. */
static void *
ft_mem_alloc(size_t size, size_t *total)
{
    *total += size;
    if (size < FT_HUGE)
        return calloc(1, size);
    size_t len = size + FT_HUGE;
    uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    uintptr_t a = ((uintptr_t)p + FT_HUGE - 1) & ~(uintptr_t)(FT_HUGE - 1);
    size_t head = (size_t)(a - (uintptr_t)p);
    if (head)
        munmap(p, head);
    size_t tail = len - head - size;
    if (tail)
        munmap((uint8_t *)a + size, tail);
#ifdef MADV_HUGEPAGE
    madvise((void *)a, size, MADV_HUGEPAGE);   /* a hint: fine if refused */
#endif
    return (void *)a;
}

static void
ft_mem_free(void *p, size_t size)
{
    if (!p)
        return;
    if (size < FT_HUGE)
        free(p);
    else
        munmap(p, size);
}

struct lb_flowtable *
lb_flow_new(uint32_t capacity, uint64_t seed, const struct lb_timeouts *tmo)
{
    return lb_flow_new_at(capacity, seed, tmo, NULL);
}

struct lb_flowtable *
lb_flow_new_at(uint32_t capacity, uint64_t seed, const struct lb_timeouts *tmo, void *slots)
{
    if (capacity < 1 || capacity > LB_FLOW_MAX)
        return NULL;
    struct lb_flowtable *ft = NULL;
    if (posix_memalign((void **)&ft, FT_CACHELINE, sizeof(*ft)))
        return NULL;
    memset(ft, 0, sizeof(*ft));
    size_t mem = sizeof(*ft);

    uint32_t nb = 1;
    while (nb < capacity)
        nb <<= 1;
    ft->capacity = capacity;
    ft->nbuckets = nb;
    ft->bmask = nb - 1;
    ft->smask = (nb < FT_NSTRIPES ? nb : FT_NSTRIPES) - 1;
    uint32_t nstripes = ft->smask + 1;

    uint64_t x = seed;
    for (int i = 0; i < 6; i++)
        ft->k[i] = ft_splitmix(&x) | 1u;
    lb_flow_set_timeouts(ft, tmo);

    ft->sz_slot = (size_t)capacity * sizeof(struct ft_slot);
    ft->sz_head = (size_t)nb * sizeof(uint32_t);
    if (slots) {
        /* zeroed by the caller (a fresh file), like ft_mem_alloc's memory */
        ft->slot = slots;
        ft->slot_ext = 1;
        mem += ft->sz_slot;
    } else {
        ft->slot = ft_mem_alloc(ft->sz_slot, &mem);
    }
    ft->head_fwd = ft_mem_alloc(ft->sz_head, &mem);
    ft->head_rev = ft_mem_alloc(ft->sz_head, &mem);
    ft->act_be = ft_mem_alloc(LB_MAX_STAT_IDS * sizeof(uint32_t), &mem);
    ft->act_vip = ft_mem_alloc(LB_MAX_STAT_IDS * sizeof(uint32_t), &mem);
    void *sf = NULL, *sr = NULL;
    if (posix_memalign(&sf, FT_CACHELINE, nstripes * sizeof(struct ft_stripe)))
        sf = NULL;
    if (posix_memalign(&sr, FT_CACHELINE, nstripes * sizeof(struct ft_stripe)))
        sr = NULL;
    ft->sfwd = sf;
    ft->srev = sr;
    mem += 2 * (size_t)nstripes * sizeof(struct ft_stripe);
    ft->memory = mem;
    if (!ft->slot || !ft->head_fwd || !ft->head_rev ||
        !ft->act_be || !ft->act_vip || !ft->sfwd || !ft->srev) {
        lb_flow_free(ft);
        return NULL;
    }
    memset(ft->sfwd, 0, nstripes * sizeof(struct ft_stripe));
    memset(ft->srev, 0, nstripes * sizeof(struct ft_stripe));
    return ft;
}

void
lb_flow_free(struct lb_flowtable *ft)
{
    if (!ft)
        return;
    if (!ft->slot_ext)
        ft_mem_free(ft->slot, ft->sz_slot);
    ft_mem_free(ft->head_fwd, ft->sz_head);
    ft_mem_free(ft->head_rev, ft->sz_head);
    ft_mem_free(ft->act_be, LB_MAX_STAT_IDS * sizeof(uint32_t));
    ft_mem_free(ft->act_vip, LB_MAX_STAT_IDS * sizeof(uint32_t));
    free(ft->sfwd);
    free(ft->srev);
    free(ft);
}

/* ---- the per-packet operations ---------------------------------------- */

static inline void
ft_prefetch_slot(const struct lb_flowtable *ft, uint32_t s)
{
    const uint8_t *p = (const uint8_t *)&ft->slot[s - 1];
    __builtin_prefetch(p, 1, 3);
    __builtin_prefetch(p + sizeof(struct ft_slot) - 1, 1, 3);
}

/* lb_flow_lookup with the key's bucket b already known. */
static inline int
ft_lookup_bucket(struct lb_flowtable *ft, const struct lb_flow_key *k, uint32_t b,
                 enum lb_dir dir, uint8_t tcp_flags, uint32_t now, struct lb_flow_entry *out)
{
    uint32_t *lock, s;

    if (dir == LB_DIR_FWD) {
        lock = ft_fwd_lock(ft, b);
        ft_lock(lock);
        s = ft_find_fwd(ft, b, k);
    } else {
        dir = LB_DIR_REV;
        lock = ft_rev_lock(ft, b);
        ft_lock(lock);
        s = ft_find_rev(ft, b, k);
    }
    if (!s) {
        ft_unlock(lock);
        return 0;
    }
    struct lb_flow_entry *e = &ft->slot[s - 1].e;
    ft_u16 *w = ft_stw(e);
    uint16_t old = __atomic_load_n(w, __ATOMIC_RELAXED), nw;
    for (;;) {
        nw = ft_advance(old, dir, tcp_flags);
        if (nw == old ||
            __atomic_compare_exchange_n(w, &old, nw, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            break;
    }
    if (nw != old) {
        int r0 = ft_evictable(ft_sw_state(old), ft_sw_flags(old));
        int r1 = ft_evictable(ft_sw_state(nw), ft_sw_flags(nw));
        if (r0 != r1) {
            if (r1)
                FT_INC(&ft->n_reclaim, 1u);
            else
                FT_DEC(&ft->n_reclaim, 1u);
        }
    }
    if (__atomic_load_n(&e->last_seen, __ATOMIC_RELAXED) != now)
        __atomic_store_n(&e->last_seen, now, __ATOMIC_RELAXED);
    memcpy(out, e, LB_FLOW_KEYBYTES);
    out->state = ft_sw_state(nw);
    out->flags = ft_sw_flags(nw);
    out->pad1 = 0;
    out->vip_stat = e->vip_stat;
    out->be_stat = e->be_stat;
    out->last_seen = now;
    ft_unlock(lock);
    return 1;
}

int
lb_flow_lookup(struct lb_flowtable *ft, const struct lb_flow_key *k, enum lb_dir dir,
               uint8_t tcp_flags, uint32_t now, struct lb_flow_entry *out)
{
    return ft_lookup_bucket(ft, k, (uint32_t)ft_hash(ft, k) & ft->bmask, dir, tcp_flags,
                            now, out);
}

/* A batch in three passes so that the cache misses of different packets
 * overlap instead of following one another (a lookup is otherwise 2-3
 * dependent DRAM misses; the lock's atomic also keeps the CPU from running
 * ahead into the next packet's): 1. hash every key, prefetch its bucket head
 * and stripe; 2. read each head without the lock (only a hint) and prefetch
 * that slot; 3. peek at it, and when it is not the key, prefetch the next
 * slot of the chain; 4. the real, locked lookups, in order, so the result is
 * the same as n calls of lb_flow_lookup. */
uint32_t
lb_flow_lookup_batch(struct lb_flowtable *ft, const struct lb_flow_key *const *keys,
                     const uint8_t *dirs, const uint8_t *tcp_flags, uint32_t n,
                     uint32_t now, struct lb_flow_entry *out, uint8_t *hit)
{
    uint32_t b[FT_PF_GROUP], sl[FT_PF_GROUP];
    uint32_t hits = 0;

    for (uint32_t base = 0; base < n; base += FT_PF_GROUP) {
        uint32_t m = n - base < FT_PF_GROUP ? n - base : FT_PF_GROUP;
        for (uint32_t j = 0; j < m; j++) {
            uint32_t i = base + j;
            b[j] = (uint32_t)ft_hash(ft, keys[i]) & ft->bmask;
            if (dirs[i] == LB_DIR_FWD) {
                __builtin_prefetch(&ft->head_fwd[b[j]], 0, 3);
                __builtin_prefetch(ft_fwd_lock(ft, b[j]), 1, 3);
            } else {
                __builtin_prefetch(&ft->head_rev[b[j]], 0, 3);
                __builtin_prefetch(ft_rev_lock(ft, b[j]), 1, 3);
            }
        }
        for (uint32_t j = 0; j < m; j++) {
            const uint32_t *head = dirs[base + j] == LB_DIR_FWD ? ft->head_fwd : ft->head_rev;
            uint32_t s = __atomic_load_n(&head[b[j]], __ATOMIC_RELAXED);
            sl[j] = s <= ft->capacity ? s : 0;
            if (sl[j])
                ft_prefetch_slot(ft, sl[j]);
        }
        for (uint32_t j = 0; j < m; j++) {
            /* racy peek (a hint only): not the first in its chain? then
             * prefetch the second one too */
            uint32_t s = sl[j], i = base + j;
            if (!s)
                continue;
            const struct ft_slot *x = &ft->slot[s - 1];
            struct lb_flow_entry peek;
            ft_key_load(&peek, &x->e);
            int rev = dirs[i] != LB_DIR_FWD;
            if (rev ? ft_match_rev(&peek, keys[i]) : ft_match_fwd(&peek, keys[i]))
                continue;
            s = FT_LD(&x->next[rev]);
            if (s && s <= ft->capacity)
                ft_prefetch_slot(ft, s);
        }
        for (uint32_t j = 0; j < m; j++) {
            uint32_t i = base + j;
            hit[i] = (uint8_t)ft_lookup_bucket(ft, keys[i], b[j], (enum lb_dir)dirs[i],
                                               tcp_flags[i], now, &out[i]);
            hits += hit[i];
        }
    }
    return hits;
}

/* Find the slot for a new entry: free list, then eviction. 0 = none. */
static uint32_t
ft_evict(struct lb_flowtable *ft, uint32_t now)
{
    uint32_t cap = ft->capacity;
    uint64_t limit = 2ull * cap + FT_EVICT_BUDGET;

    for (uint64_t scanned = 0; scanned < limit; scanned += FT_EVICT_BUDGET) {
        uint32_t best = 0, answered = 0;
        int32_t best_idle = INT32_MIN, answered_idle = INT32_MIN;
        for (uint32_t j = 0; j < FT_EVICT_BUDGET; j++) {
            uint32_t i = __atomic_fetch_add(&ft->clock, 1u, __ATOMIC_RELAXED) % cap;
            struct lb_flow_entry *e = &ft->slot[i].e;
            uint16_t sw = __atomic_load_n(ft_stw(e), __ATOMIC_RELAXED);
            uint8_t st = ft_sw_state(sw);
            if (st == FT_STATE_FREE)
                continue;
            uint32_t seen = __atomic_load_n(&e->last_seen, __ATOMIC_RELAXED);
            if (ft_expired(ft, st, seen, now)) {
                if (ft_take_end(ft, i + 1, now, FT_TAKE_EXPIRED, LB_FLOW_END_EXPIRED)) {
                    FT_INC(&ft->cnt.evicted_expired, 1u);
                    return i + 1;
                }
            } else if (ft_reclaimable(st, ft_sw_flags(sw))) {
                int32_t idle = (int32_t)(now - seen);
                if (!best || idle > best_idle) {
                    best = i + 1;
                    best_idle = idle;
                }
            } else if (st == LB_FS_UDP_STREAM) {
                int32_t idle = (int32_t)(now - seen);
                if (!answered || idle > answered_idle) {
                    answered = i + 1;
                    answered_idle = idle;
                }
            }
        }
        /* Of the two kinds, the one seen longer ago goes (half-open on a tie): a
         * handshake in progress, a few ms idle, outlives the older entries of a
         * flood that the backends answer, and under a SYN flood the oldest
         * half-open entries still go first. */
        int udp_first = answered && best && answered_idle > best_idle;
        if (udp_first &&
            ft_take_end(ft, answered, now, FT_TAKE_ANSWERED, LB_FLOW_END_EVICTED)) {
            FT_INC(&ft->cnt.evicted_udp, 1u);
            return answered;
        }
        if (best && ft_take_end(ft, best, now, FT_TAKE_RECLAIM, LB_FLOW_END_EVICTED)) {
            FT_INC(&ft->cnt.evicted_halfopen, 1u);
            return best;
        }
        if (!best && answered &&
            ft_take_end(ft, answered, now, FT_TAKE_ANSWERED, LB_FLOW_END_EVICTED)) {
            FT_INC(&ft->cnt.evicted_udp, 1u);
            return answered;
        }
        uint32_t s = ft_alloc(ft);      /* freed by someone meanwhile? */
        if (s)
            return s;
        if (!__atomic_load_n(&ft->n_reclaim, __ATOMIC_RELAXED))
            return 0;
    }
    return 0;
}

int
lb_flow_insert(struct lb_flowtable *ft, struct lb_flow_entry *e, uint32_t now)
{
    return lb_flow_insert_seen(ft, e, now, now);
}

int
lb_flow_insert_seen(struct lb_flowtable *ft, struct lb_flow_entry *e, uint32_t now,
                    uint32_t seen)
{
    if (e->state > LB_FS_UDP_STREAM ||
        (e->family != LB_AF_INET && e->family != LB_AF_INET6))
        return -EINVAL;

    struct lb_flow_key kf, kr;
    lb_flow_key_fwd(e, &kf);
    lb_flow_key_rev(e, &kr);
    uint32_t bf = (uint32_t)ft_hash(ft, &kf) & ft->bmask;
    uint32_t br = (uint32_t)ft_hash(ft, &kr) & ft->bmask;
    uint32_t *lf = ft_fwd_lock(ft, bf), *lr = ft_rev_lock(ft, br);

    uint32_t s = ft_alloc(ft);
    if (!s) {
        /* Full. Do not evict anything for a flow that is already there. */
        ft_lock(lf);
        uint32_t x = ft_find_fwd(ft, bf, &kf);
        if (x)
            ft_copy_out(e, &ft->slot[x - 1].e);
        ft_unlock(lf);
        if (x) {
            FT_INC(&ft->cnt.refused_exists, 1u);
            return -EEXIST;
        }
        s = ft_evict(ft, now);
        if (!s) {
            FT_INC(&ft->cnt.refused_full, 1u);
            return -ENOSPC;
        }
    }

    uint8_t st = e->state;
    uint8_t fl = e->flags & (F_FLOW_REV_SEEN | F_FLOW_EST_SEEN);
    if (st == LB_FS_EST)
        fl |= F_FLOW_EST_SEEN;
    if (st == LB_FS_UDP_STREAM)
        fl |= F_FLOW_REV_SEEN;
    struct lb_flow_entry *ne = &ft->slot[s - 1].e;
    ft_key_store(ne, e);
    ne->pad1 = 0;
    ne->vip_stat = e->vip_stat;
    ne->be_stat = e->be_stat;
    __atomic_store_n(&ne->last_seen, seen, __ATOMIC_RELAXED);
    __atomic_store_n(ft_stw(ne), ft_sw_make(st, fl), __ATOMIC_RELAXED);

    ft_lock(lf);
    ft_lock(lr);
    /* The forward key is one flow; the reverse key is the tuple the backend
     * sees, which two flows cannot share either (client:cport reaching the
     * same backend:bport through two VIPs). Both clashes answer with the
     * entry in place, so the caller NATs consistently with it. */
    uint32_t x = ft_find_fwd(ft, bf, &kf);
    if (!x)
        x = ft_find_rev(ft, br, &kr);
    if (x) {
        ft_copy_out(e, &ft->slot[x - 1].e);
        __atomic_store_n(ft_stw(ne), ft_sw_make(FT_STATE_FREE, 0), __ATOMIC_RELAXED);
        ft_unlock(lr);
        ft_unlock(lf);
        ft_release(ft, s);
        FT_INC(&ft->cnt.refused_exists, 1u);
        return -EEXIST;
    }
    FT_ST(&ft->slot[s - 1].next[0], ft->head_fwd[bf]);
    FT_ST(&ft->head_fwd[bf], s);
    FT_ST(&ft->slot[s - 1].next[1], ft->head_rev[br]);
    FT_ST(&ft->head_rev[br], s);
    FT_INC(&ft->n_live, 1u);
    if (ft_evictable(st, fl))
        FT_INC(&ft->n_reclaim, 1u);
    ft_stat_add(ft->act_be, ne->be_stat, 1);
    ft_stat_add(ft->act_vip, ne->vip_stat, 1);
    ft_unlock(lr);
    ft_unlock(lf);

    FT_INC(&ft->cnt.inserted, 1u);
    e->state = st;
    e->flags = fl;
    e->pad1 = 0;
    e->last_seen = seen;
    return 0;
}

int
lb_flow_delete(struct lb_flowtable *ft, const struct lb_flow_key *k)
{
    uint32_t bf = (uint32_t)ft_hash(ft, k) & ft->bmask;
    uint32_t *lf = ft_fwd_lock(ft, bf);

    ft_lock(lf);
    uint32_t s = ft_find_fwd(ft, bf, k);
    if (!s) {
        ft_unlock(lf);
        return 0;
    }
    struct lb_flow_key kr;
    lb_flow_key_rev(&ft->slot[s - 1].e, &kr);   /* stable: we hold its fwd stripe */
    uint32_t br = (uint32_t)ft_hash(ft, &kr) & ft->bmask;
    uint32_t *lr = ft_rev_lock(ft, br);
    ft_lock(lr);                               /* forward, then reverse */
    ft_unlink(ft, s, bf, br);
    ft_unlock(lr);
    ft_unlock(lf);
    ft_release(ft, s);
    FT_INC(&ft->cnt.deleted, 1u);
    return 1;
}

/* ---- control-plane scans ---------------------------------------------- */

uint32_t
lb_flow_expire(struct lb_flowtable *ft, uint32_t now, uint32_t max)
{
    return lb_flow_expire_report(ft, now, max, NULL, 0, NULL);
}

uint32_t
lb_flow_expire_report(struct lb_flowtable *ft, uint32_t now, uint32_t max,
                      struct lb_flow_entry *gone, uint32_t gone_cap, uint32_t *n_gone)
{
    if (n_gone)
        *n_gone = 0;
    if (gone && gone_cap < max)
        max = gone_cap;     /* every removal is reported */
    uint32_t hw = __atomic_load_n(&ft->hw, __ATOMIC_ACQUIRE);
    if (!hw || !max)
        return 0;
    uint32_t i = __atomic_load_n(&ft->exp_cursor, __ATOMIC_RELAXED);
    uint32_t removed = 0;
    for (uint32_t n = 0; n < hw && removed < max; n++, i++) {
        if (i >= hw)
            i = 0;
        struct lb_flow_entry *e = &ft->slot[i].e;
        uint8_t st = ft_sw_state(__atomic_load_n(ft_stw(e), __ATOMIC_RELAXED));
        if (st == FT_STATE_FREE ||
            !ft_expired(ft, st, __atomic_load_n(&e->last_seen, __ATOMIC_RELAXED), now))
            continue;
        struct lb_flow_entry snap;
        if (ft_take_snap(ft, i + 1, now, FT_TAKE_EXPIRED, &snap)) {
            ft_release(ft, i + 1);
            removed++;
            if (gone && n_gone && *n_gone < gone_cap)
                gone[(*n_gone)++] = snap;
        }
    }
    __atomic_store_n(&ft->exp_cursor, i >= hw ? 0 : i, __ATOMIC_RELAXED);
    if (removed)
        FT_INC(&ft->cnt.expired, removed);
    return removed;
}

uint32_t
lb_flow_purge_backend(struct lb_flowtable *ft, const uint8_t *addr16, uint16_t port_be,
                      uint8_t proto)
{
    uint32_t hw = __atomic_load_n(&ft->hw, __ATOMIC_ACQUIRE);
    uint32_t removed = 0;
    for (uint32_t i = 0; i < hw; i++) {
        struct lb_flow_entry *e = &ft->slot[i].e;
        if (ft_sw_state(__atomic_load_n(ft_stw(e), __ATOMIC_RELAXED)) == FT_STATE_FREE)
            continue;
        struct lb_flow_entry snap;
        uint32_t bf, br;
        if (!ft_grab(ft, i + 1, 1, &snap, &bf, &br))
            continue;
        int hit = snap.bport == port_be && snap.proto == proto &&
                  memcmp(snap.backend, addr16, 16) == 0;
        if (hit)
            ft_unlink(ft, i + 1, bf, br);
        ft_ungrab(ft, 1, bf, br);
        if (hit) {
            ft_release(ft, i + 1);
            ft_end(ft, &snap, LB_FLOW_END_PURGED);
            removed++;
        }
    }
    if (removed)
        FT_INC(&ft->cnt.deleted, removed);
    return removed;
}

/* Does a (racy or confirmed) copy of an entry pass the walk's filter? */
static inline int
ft_walk_keep(const struct lb_flow_entry *e, const struct lb_flow_filter *f)
{
    if (!f)
        return 1;
    if (f->family && (e->family != f->family || memcmp(e->vip, f->vip, 16) != 0))
        return 0;
    return (!f->vport || e->vport == f->vport) && (!f->proto || e->proto == f->proto);
}

uint32_t
lb_flow_walk_filter(struct lb_flowtable *ft, uint32_t *cursor, struct lb_flow_entry *out,
                    uint32_t max, const struct lb_flow_filter *f)
{
    uint32_t hw = __atomic_load_n(&ft->hw, __ATOMIC_ACQUIRE);
    uint32_t i = *cursor, n = 0;
    for (; i < hw && n < max; i++) {
        struct lb_flow_entry *e = &ft->slot[i].e;
        if (ft_sw_state(__atomic_load_n(ft_stw(e), __ATOMIC_RELAXED)) == FT_STATE_FREE)
            continue;
        if (f) {
            /* most slots fail the filter: skip them without taking a lock */
            struct lb_flow_entry peek;
            ft_snapshot(&peek, e);
            if (!ft_walk_keep(&peek, f))
                continue;
        }
        uint32_t bf, br = 0;
        if (!ft_grab(ft, i + 1, 0, &out[n], &bf, &br))
            continue;
        ft_ungrab(ft, 0, bf, br);
        n += (uint32_t)ft_walk_keep(&out[n], f);
    }
    *cursor = i;
    return n;
}

uint32_t
lb_flow_walk(struct lb_flowtable *ft, uint32_t *cursor, struct lb_flow_entry *out,
             uint32_t max)
{
    return lb_flow_walk_filter(ft, cursor, out, max, NULL);
}

/* ---- introspection ---------------------------------------------------- */

uint32_t
lb_flow_count(const struct lb_flowtable *ft)
{
    return __atomic_load_n(&ft->n_live, __ATOMIC_RELAXED);
}

uint32_t
lb_flow_capacity(const struct lb_flowtable *ft)
{
    return ft->capacity;
}

size_t
lb_flow_memory(const struct lb_flowtable *ft)
{
    return ft->memory;
}

void
lb_flow_get_counters(const struct lb_flowtable *ft, struct lb_flow_counters *out)
{
    out->inserted = __atomic_load_n(&ft->cnt.inserted, __ATOMIC_RELAXED);
    out->refused_full = __atomic_load_n(&ft->cnt.refused_full, __ATOMIC_RELAXED);
    out->refused_exists = __atomic_load_n(&ft->cnt.refused_exists, __ATOMIC_RELAXED);
    out->evicted_expired = __atomic_load_n(&ft->cnt.evicted_expired, __ATOMIC_RELAXED);
    out->evicted_halfopen = __atomic_load_n(&ft->cnt.evicted_halfopen, __ATOMIC_RELAXED);
    out->evicted_udp = __atomic_load_n(&ft->cnt.evicted_udp, __ATOMIC_RELAXED);
    out->expired = __atomic_load_n(&ft->cnt.expired, __ATOMIC_RELAXED);
    out->deleted = __atomic_load_n(&ft->cnt.deleted, __ATOMIC_RELAXED);
}

uint32_t
lb_flow_active_backend(const struct lb_flowtable *ft, uint32_t be_stat)
{
    if (be_stat >= LB_MAX_STAT_IDS)
        return 0;
    return __atomic_load_n(&ft->act_be[be_stat], __ATOMIC_RELAXED);
}

uint32_t
lb_flow_active_vip(const struct lb_flowtable *ft, uint32_t vip_stat)
{
    if (vip_stat >= LB_MAX_STAT_IDS)
        return 0;
    return __atomic_load_n(&ft->act_vip[vip_stat], __ATOMIC_RELAXED);
}

/* ---- consistency check ------------------------------------------------ */

static int
ft_check_index(struct lb_flowtable *ft, const uint32_t *head, int rev, uint8_t *seen)
{
    uint64_t steps = 0;
    for (uint32_t b = 0; b < ft->nbuckets; b++) {
        for (uint32_t s = head[b]; s; s = ft->slot[s - 1].next[rev]) {
            if (s > ft->hw || ++steps > ft->capacity)
                return rev ? 12 : 2;           /* out of range or a cycle */
            struct lb_flow_entry *e = &ft->slot[s - 1].e;
            if (e->state == FT_STATE_FREE)
                return rev ? 13 : 3;           /* free entry linked */
            if (seen[s - 1] & (rev ? 2 : 1))
                return rev ? 14 : 4;           /* reached twice */
            seen[s - 1] |= (uint8_t)(rev ? 2 : 1);
            struct lb_flow_key k;
            if (rev)
                lb_flow_key_rev(e, &k);
            else
                lb_flow_key_fwd(e, &k);
            if (((uint32_t)ft_hash(ft, &k) & ft->bmask) != b)
                return rev ? 15 : 5;           /* in the wrong bucket */
        }
    }
    return 0;
}

int
lb_flow_check(struct lb_flowtable *ft)
{
    uint32_t nstripes = ft->smask + 1;
    uint8_t *seen = calloc(ft->capacity, 1);
    uint32_t *be = calloc(LB_MAX_STAT_IDS, sizeof(uint32_t));
    uint32_t *vip = calloc(LB_MAX_STAT_IDS, sizeof(uint32_t));
    int rc = 0;
    if (!seen || !be || !vip) {
        rc = -ENOMEM;
        goto out;
    }
    /* every forward stripe, then every reverse stripe (the global order),
     * then the free-list leaf lock: the table is still while we look */
    for (uint32_t i = 0; i < nstripes; i++)
        ft_lock(&ft->sfwd[i].lock);
    for (uint32_t i = 0; i < nstripes; i++)
        ft_lock(&ft->srev[i].lock);
    ft_lock(&ft->free_lock);

    if (ft->hw > ft->capacity) {
        rc = 1;
        goto unlock;
    }
    rc = ft_check_index(ft, ft->head_fwd, 0, seen);
    if (!rc)
        rc = ft_check_index(ft, ft->head_rev, 1, seen);
    if (rc)
        goto unlock;
    uint32_t live = 0, recl = 0, nfree = 0;
    for (uint32_t i = 0; i < ft->hw; i++) {
        struct lb_flow_entry *e = &ft->slot[i].e;
        if (e->state == FT_STATE_FREE) {
            if (seen[i]) {
                rc = 20;
                goto unlock;
            }
            continue;
        }
        if (seen[i] != 3 || e->state > LB_FS_UDP_STREAM) {
            rc = 21;                            /* live but not in both indexes */
            goto unlock;
        }
        live++;
        recl += (uint32_t)ft_evictable(e->state, e->flags);
        if (e->be_stat < LB_MAX_STAT_IDS)
            be[e->be_stat]++;
        if (e->vip_stat < LB_MAX_STAT_IDS)
            vip[e->vip_stat]++;
    }
    for (uint32_t s = ft->free_head; s; s = ft->slot[s - 1].next[0]) {
        if (s > ft->hw || ++nfree > ft->hw || ft->slot[s - 1].e.state != FT_STATE_FREE ||
            seen[s - 1]) {
            rc = 22;                            /* bad free list */
            goto unlock;
        }
        seen[s - 1] = 4;
    }
    if (live + nfree != ft->hw)
        rc = 23;                                /* slots lost */
    else if (live + nfree + (ft->capacity - ft->hw) != ft->capacity)
        rc = 24;
    else if (live != ft->n_live)
        rc = 25;
    else if (recl != ft->n_reclaim)
        rc = 26;
    else if (memcmp(be, ft->act_be, LB_MAX_STAT_IDS * sizeof(uint32_t)) != 0)
        rc = 27;
    else if (memcmp(vip, ft->act_vip, LB_MAX_STAT_IDS * sizeof(uint32_t)) != 0)
        rc = 28;
unlock:
    ft_unlock(&ft->free_lock);
    for (uint32_t i = nstripes; i-- > 0;)
        ft_unlock(&ft->srev[i].lock);
    for (uint32_t i = nstripes; i-- > 0;)
        ft_unlock(&ft->sfwd[i].lock);
out:
    free(seen);
    free(be);
    free(vip);
    return rc;
}

/* ---- persistence: adoption of a table that outlived its process --------
 *
 * A table created with lb_flow_new_at keeps its slots in the caller's memory
 * (a file mapping, see lb_shm.c): after the process ends, the file holds
 * every entry as the last writer left it. Only the entries are taken over;
 * the indexes, locks, free list and counts are rebuilt by inserting each
 * valid entry into a fresh table. That is deliberate: a process killed by
 * SIGKILL may have died holding a stripe lock or half-way through linking an
 * entry, so the old indexes can be neither trusted nor checked as a whole
 * (lb_flow_check would refuse exactly the crash that adoption is for). Each
 * slot is instead checked on its own, as hostile input: a slot being written
 * when the process died is either still marked free (the key is stored
 * before the state word) or complete; anything else is counted and skipped.
 * The new table also gets a fresh hash secret, so the old one need not live
 * beyond its process. */

uint32_t
lb_flow_slot_size(void)
{
    return (uint32_t)sizeof(struct ft_slot);
}

static inline uint64_t
ft_fnv(uint64_t h, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        h ^= (v >> (8 * i)) & 0xFF;
        h *= 0x100000001B3ull;
    }
    return h;
}

uint64_t
lb_flow_layout_sig(void)
{
    /* everything adoption relies on: a change of any of it changes the
     * signature even if nobody remembered to bump LB_FLOW_LAYOUT_VERSION */
    const uint64_t v[] = {
        sizeof(struct ft_slot), sizeof(struct lb_flow_entry),
        offsetof(struct ft_slot, e), offsetof(struct ft_slot, next),
        offsetof(struct lb_flow_entry, client), offsetof(struct lb_flow_entry, vip),
        offsetof(struct lb_flow_entry, backend), offsetof(struct lb_flow_entry, cport),
        offsetof(struct lb_flow_entry, vport), offsetof(struct lb_flow_entry, bport),
        offsetof(struct lb_flow_entry, proto), offsetof(struct lb_flow_entry, family),
        offsetof(struct lb_flow_entry, state), offsetof(struct lb_flow_entry, flags),
        offsetof(struct lb_flow_entry, vip_stat), offsetof(struct lb_flow_entry, be_stat),
        offsetof(struct lb_flow_entry, last_seen),
        LB_FS_SYN, LB_FS_EST, LB_FS_FIN, LB_FS_CLOSE, LB_FS_UDP, LB_FS_UDP_STREAM,
        FT_STATE_FREE, F_FLOW_REV_SEEN, F_FLOW_EST_SEEN, LB_AF_INET, LB_AF_INET6,
        LB_FLOW_LAYOUT_VERSION,
    };
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        h = ft_fnv(h, v[i]);
    return h;
}

static inline int
ft_zero_tail(const uint8_t *a)
{
    for (int i = 4; i < 16; i++)
        if (a[i])
            return 0;
    return 1;
}

int
lb_flow_entry_valid(const struct lb_flow_entry *e)
{
    if (e->family != LB_AF_INET && e->family != LB_AF_INET6)
        return 0;
    if (e->proto == LB_IPPROTO_TCP) {
        if (e->state > LB_FS_CLOSE)
            return 0;
    } else if (e->proto == LB_IPPROTO_UDP) {
        if (e->state != LB_FS_UDP && e->state != LB_FS_UDP_STREAM)
            return 0;
    } else {
        return 0;
    }
    if (e->flags & ~(F_FLOW_REV_SEEN | F_FLOW_EST_SEEN))
        return 0;
    if (e->family == LB_AF_INET &&
        !(ft_zero_tail(e->client) && ft_zero_tail(e->vip) && ft_zero_tail(e->backend)))
        return 0;
    return 1;
}

int
lb_flow_adopt(struct lb_flowtable *ft, const void *old_slots, uint32_t old_capacity,
              uint32_t now, lb_flow_bind_fn bind, void *ctx, struct lb_flow_adopt_stats *st)
{
    memset(st, 0, sizeof(*st));
    if (!old_slots || old_capacity > LB_FLOW_MAX)
        return -EINVAL;
    const uint8_t *base = old_slots;
    for (uint32_t i = 0; i < old_capacity; i++) {
        struct lb_flow_entry e;
        /* a copy: the old memory is read once per field and never trusted */
        memcpy(&e, base + (size_t)i * sizeof(struct ft_slot) + offsetof(struct ft_slot, e),
               sizeof(e));
        if (e.state == FT_STATE_FREE)
            continue;
        if (e.family == 0 && e.state == 0 && e.proto == 0)
            continue;                   /* never used: zeroed file pages */
        if (!lb_flow_entry_valid(&e)) {
            st->invalid++;
            continue;
        }
        /* a timestamp ahead of this clock cannot come from this boot's
         * monotonic clock: treat the entry as just seen */
        uint32_t seen = (int32_t)(now - e.last_seen) < 0 ? now : e.last_seen;
        if (ft_expired(ft, e.state, seen, now)) {
            st->expired++;
            continue;
        }
        if (bind && bind(ctx, &e) < 0) {
            st->unbound++;
            continue;
        }
        e.pad1 = 0;
        /* no room: never evict one adopted flow for another */
        if (__atomic_load_n(&ft->n_live, __ATOMIC_RELAXED) >= ft->capacity) {
            st->full++;
            continue;
        }
        int rc = lb_flow_insert_seen(ft, &e, now, seen);
        if (rc == 0)
            st->adopted++;
        else if (rc == -EEXIST)
            st->duplicate++;
        else if (rc == -ENOSPC)
            st->full++;
        else
            st->invalid++;
    }
    return 0;
}

int
lb_flow_touch(struct lb_flowtable *ft, const struct lb_flow_key *k, uint32_t seen,
              struct lb_flow_entry *out)
{
    uint32_t bf = (uint32_t)ft_hash(ft, k) & ft->bmask;
    uint32_t *lf = ft_fwd_lock(ft, bf);
    ft_lock(lf);
    uint32_t s = ft_find_fwd(ft, bf, k);
    if (s) {
        struct lb_flow_entry *e = &ft->slot[s - 1].e;
        uint32_t cur = __atomic_load_n(&e->last_seen, __ATOMIC_RELAXED);
        if ((int32_t)(seen - cur) > 0)
            __atomic_store_n(&e->last_seen, seen, __ATOMIC_RELAXED);
        if (out)
            ft_copy_out(out, e);
    }
    ft_unlock(lf);
    return s != 0;
}
