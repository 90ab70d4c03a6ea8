/* flow_stress.c - lb_flow.c under ThreadSanitizer, without Python.
 *
 * Built and run by tests/test_flow.py::test_c_stress_under_thread_sanitizer:
 *   gcc -std=gnu11 -O1 -g -fsanitize=thread -pthread -I ext \
 *       tests/c/flow_stress.c ext/lb_flow.c -o flow_stress && ./flow_stress OPS
 * Four threads run a random mix of every table operation (inserts, lookups
 * from both sides, batched lookups, deletes, expiry, walks, purges) on an
 * overlapping key set, for tables that are tiny (always full, evicting) and
 * roomy. Every entry handed back must be the flow that was asked for; after
 * the threads finish lb_flow_check must pass. Exit 0 = all good; TSan makes
 * the exit status non-zero on any data race it sees. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lb_flow.h"

#define NTHREADS 4

static struct lb_flowtable *ft;
static uint32_t nkeys;
static long nops;
static long bad;

/* Flow i: unique forward and reverse keys; 4 backends. */
static void
synth(uint32_t i, struct lb_flow_entry *e)
{
    memset(e, 0, sizeof(*e));
    e->client[0] = 198; e->client[1] = 18;
    e->client[2] = (uint8_t)(i >> 8); e->client[3] = (uint8_t)i;
    e->vip[0] = 198; e->vip[1] = 19; e->vip[3] = 1;
    e->backend[0] = 198; e->backend[1] = 19; e->backend[2] = 1;
    e->backend[3] = (uint8_t)(1 + i % 4);
    e->cport = (uint16_t)(1024 + (i >> 16));
    e->vport = 80;
    e->bport = 8080;
    e->proto = (i & 3) == 3 ? 17 : 6;
    e->family = LB_AF_INET;
    e->state = e->proto == 17 ? LB_FS_UDP : ((i & 4) ? LB_FS_SYN : LB_FS_EST);
    e->be_stat = i % 4;
    e->vip_stat = 1;
}

static uint64_t
rng(uint64_t *x)
{
    *x ^= *x >> 12; *x ^= *x << 25; *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1Dull;
}

static void
check_entry(const struct lb_flow_entry *got, const struct lb_flow_entry *want)
{
    if (memcmp(got, want, offsetof(struct lb_flow_entry, state)) != 0 ||
        got->state > LB_FS_UDP_STREAM)
        __atomic_fetch_add(&bad, 1, __ATOMIC_RELAXED);
}

static void *
worker(void *arg)
{
    static const uint8_t tcpflags[6] = {0, 0x02, 0x12, 0x10, 0x11, 0x04};
    uint64_t x = (uint64_t)(uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
    uint32_t now = 1000;
    struct lb_flow_entry e, want, out[16];
    struct lb_flow_key k, keys[16];
    const struct lb_flow_key *kp[16];
    uint8_t dirs[16], flags[16], hit[16];

    for (long n = 0; n < nops; n++) {
        uint64_t r = rng(&x);
        uint32_t i = (uint32_t)((r >> 32) % nkeys), op = (uint32_t)((r & 0xFFFF) % 1000);
        r = rng(&x);
        now++;
        synth(i, &want);
        if (op < 350) {
            e = want;
            int rc = lb_flow_insert(ft, &e, now);
            if (rc == -EEXIST)
                check_entry(&e, &want);
            else if (rc != 0 && rc != -ENOSPC)
                __atomic_fetch_add(&bad, 1, __ATOMIC_RELAXED);
        } else if (op < 700) {
            int rev = (int)(r & 1);
            if (rev)
                lb_flow_key_rev(&want, &k);
            else
                lb_flow_key_fwd(&want, &k);
            uint8_t fl = want.proto == 6 ? tcpflags[(r >> 8) % 6] : 0;
            if (lb_flow_lookup(ft, &k, rev ? LB_DIR_REV : LB_DIR_FWD, fl, now, &e))
                check_entry(&e, &want);
        } else if (op < 800) {
            struct lb_flow_entry w[16];
            for (int j = 0; j < 16; j++) {
                synth((uint32_t)((i + 13u * (uint32_t)j) % nkeys), &w[j]);
                dirs[j] = (uint8_t)((r >> j) & 1);
                if (dirs[j])
                    lb_flow_key_rev(&w[j], &keys[j]);
                else
                    lb_flow_key_fwd(&w[j], &keys[j]);
                kp[j] = &keys[j];
                flags[j] = 0x10;
            }
            lb_flow_lookup_batch(ft, kp, dirs, flags, 16, now, out, hit);
            for (int j = 0; j < 16; j++)
                if (hit[j])
                    check_entry(&out[j], &w[j]);
        } else if (op < 880) {
            lb_flow_key_fwd(&want, &k);
            lb_flow_delete(ft, &k);
        } else if (op < 930) {
            lb_flow_expire(ft, now + (uint32_t)(r % 3000), 64);
        } else if (op < 998) {
            uint32_t cur = (uint32_t)(r % nkeys);
            uint32_t got = lb_flow_walk(ft, &cur, out, 16);
            for (uint32_t j = 0; j < got; j++)
                if (out[j].state > LB_FS_UDP_STREAM)
                    __atomic_fetch_add(&bad, 1, __ATOMIC_RELAXED);
        } else {
            lb_flow_purge_backend(ft, want.backend, want.bport, want.proto);
        }
    }
    return NULL;
}

int
main(int argc, char **argv)
{
    static const uint32_t caps[] = {1, 16, 512};
    struct lb_timeouts tmo = {1000, 9000, 3000, 500, 2000, 7000};
    nops = argc > 1 ? atol(argv[1]) : 100000;
    int fail = 0;

    for (size_t c = 0; c < sizeof(caps) / sizeof(caps[0]); c++) {
        ft = lb_flow_new(caps[c], 0x5EED + c, &tmo);
        if (!ft)
            return 2;
        nkeys = caps[c] * 4;
        pthread_t th[NTHREADS];
        for (long t = 0; t < NTHREADS; t++)
            pthread_create(&th[t], NULL, worker, (void *)(t + 1));
        for (int t = 0; t < NTHREADS; t++)
            pthread_join(th[t], NULL);
        int rc = lb_flow_check(ft);
        printf("capacity %u: flows %u, check %d, bad %ld\n", caps[c], lb_flow_count(ft), rc,
               bad);
        fail |= rc != 0 || bad != 0;
        lb_flow_free(ft);
    }
    return fail;
}
