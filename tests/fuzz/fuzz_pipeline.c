/* fuzz_pipeline.c - libFuzzer harness over the C packet path.
 *
 * Every input is a batch of packets run through lb_pipeline_run exactly as
 * a worker runs it: parse, VIP lookup, closed ports and echo, flow lookup /
 * insert / eviction, admission (overload guard, max_flows, client rate,
 * persistence), Maglev pick, NAT, the fragment cache (hold, release, evict,
 * time out) and the ICMP errors and RSTs it builds. The data plane lives
 * across inputs (tiny tables, so eviction and refusal paths run all the
 * time), its clock advancing as the input says.
 *
 * Input format: records of [length: 2 bytes big-endian][clock step: 1
 * byte, ms][packet: length bytes], up to LB_BATCH per input; a record cut
 * short by the end of the input takes what is left. Each packet is copied
 * into an allocation of exactly its length, so AddressSanitizer sees any
 * read past it.
 *
 * Checked after every batch: every verdict is one of enum lb_verdict and
 * every reason one of enum lb_drop_reason; an answer (LB_REPLY) is no
 * longer than its question; a passed packet (LB_PASS) is exactly as it came; the extra packets are IP packets within their
 * buffers; every 256 batches the flow table's invariants (lb_flow_check).
 * A failed check aborts (a crash for libFuzzer).
 *
 * Build and run: `make fuzz` (FUZZ_SECONDS, default 60); seed corpus in
 * tests/fuzz/corpus (tests/fuzz/make_corpus.py writes it).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "lb_dp.h"
#include "lb_flow.h"
#include "lb_frag.h"
#include "lb_parse.h"
#include "lb_pipeline.h"
#include "lb_table.h"

static struct lb_dataplane *dp;
static uint32_t now = 1000;
static uint64_t batches;

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_pipeline: check failed: %s\n", what);
    abort();
}

static void addr(uint8_t *a, const char *s, uint8_t *family)
{
    memset(a, 0, 16);
    if (inet_pton(AF_INET, s, a) == 1) {
        *family = LB_AF_INET;
        return;
    }
    if (inet_pton(AF_INET6, s, a) != 1)
        fail("bad address in the harness table");
    *family = LB_AF_INET6;
}

/* One VIP with n backends at base_be + i. */
static void vip(struct lb_table *t, uint32_t i, const char *a, uint16_t port, uint8_t proto,
                const char *const *bes, uint32_t n, uint16_t bport,
                void (*settings)(struct lb_vip *))
{
    struct lb_vip v;
    struct lb_backend b[4];

    memset(&v, 0, sizeof(v));
    memset(b, 0, sizeof(b));
    addr(v.addr, a, &v.family);
    v.port = htons(port);
    v.proto = proto;
    v.stat_id = i + 1;
    v.ring_size = 251;
    if (settings)
        settings(&v);
    for (uint32_t j = 0; j < n; j++) {
        addr(b[j].addr, bes[j], &b[j].family);
        b[j].port = htons(bport);
        b[j].stat_id = 100 + i * 4 + j;
        b[j].weight = 1;
    }
    if (lb_table_set_vip(t, i, &v, b, n) < 0)
        fail("lb_table_set_vip");
}

static void strict(struct lb_vip *v)
{
    v->closed_port = LB_CLOSED_REJECT;
    v->limit_action = LB_ACTION_REJECT;
    v->max_flows = 8;
    v->client_rate = 5;
    v->client_burst = 3;
}

static void sticky(struct lb_vip *v)
{
    v->persistence = LB_PERSIST_SOURCE;
    v->persist_ms = 5000;
    v->new_flow_rate = 50;
    v->new_flow_burst = 10;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static const char *const be4[] = { "198.19.0.11", "198.19.0.12", "198.19.0.13" };
    static const char *const be6[] = { "2001:db8:1::11", "2001:db8:1::12" };
    struct lb_table *t;

    (void)argc;
    (void)argv;
    dp = lb_dp_new(1, 64, 42, NULL);
    if (!dp || lb_dp_set_traffic(dp, 16, 8, 500, 16, 1000, 20, 42) < 0)
        fail("lb_dp_new");
    t = lb_table_new(5, 7);
    if (!t)
        fail("lb_table_new");
    vip(t, 0, "198.18.100.1", 80, 6, be4, 3, 8080, strict);
    vip(t, 1, "198.18.100.1", 5300, 17, be4, 2, 5300, sticky);
    vip(t, 2, "2001:db8:100::1", 53, 17, be6, 2, 5353, strict);
    vip(t, 3, "2001:db8:100::1", 80, 6, be6, 1, 8080, sticky);
    vip(t, 4, "198.18.100.2", 80, 6, be4, 0, 80, NULL);
    if (lb_table_seal(t) < 0)
        fail("lb_table_seal");
    lb_table_free(lb_dp_publish(dp, t));
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct lb_worker *w = lb_dp_worker(dp, 0);
    uint8_t *pkt[LB_BATCH], verdicts[LB_BATCH], reasons[LB_BATCH];
    uint32_t lens[LB_BATCH], orig[LB_BATCH], n = 0;
    const uint8_t *in[LB_BATCH];
    const struct lb_table *t;
    size_t off = 0;

    while (off + 3 <= size && n < LB_BATCH) {
        uint32_t len = (uint32_t)data[off] << 8 | data[off + 1];
        now += data[off + 2];
        off += 3;
        if (len > size - off)
            len = (uint32_t)(size - off);
        /* an empty packet still gets a one-byte allocation (malloc(0) may
         * return NULL); its length stays 0 */
        pkt[n] = malloc(len ? len : 1);
        if (!pkt[n])
            fail("malloc");
        memcpy(pkt[n], data + off, len);
        in[n] = data + off;
        lens[n] = orig[n] = len;
        off += len;
        n++;
    }
    t = lb_dp_enter(w);
    lb_pipeline_run(w, t, pkt, lens, NULL, verdicts, reasons, n, now);
    for (uint32_t i = 0; i < n; i++) {
        if (verdicts[i] > LB_HOLD || reasons[i] >= LB_DROP__COUNT)
            fail("verdict or reason out of range");
        if (lens[i] > orig[i])
            fail("an answer longer than its question");
        if (verdicts[i] == LB_PASS && (lens[i] != orig[i] || memcmp(pkt[i], in[i], orig[i])))
            fail("a passed packet was changed");
        free(pkt[i]);
    }
    for (uint32_t i = 0; i < w->out.n; i++) {
        struct lb_pkt p;
        const struct lb_out_pkt *o = &w->out.pkt[i];
        if (o->len < 20 || o->len > LB_FRAG_SLOT)
            fail("extra packet length");
        (void)lb_parse(o->data, o->len, &p);
    }
    lb_out_done(w);
    lb_dp_leave(w);
    if (++batches % 256 == 0) {
        if (lb_flow_check(dp->ft) != 0)
            fail("flow table invariants");
        lb_frag_expire(dp->frag, now, 64);
        lb_flow_expire(dp->ft, now, 64);
    }
    return 0;
}
