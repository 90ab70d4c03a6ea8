/*
 * wakeprobe: what the machine itself costs a forwarder that has a core of its
 * own (bench/lab/run.py runs it once per repetition, before the cells).
 *
 * A user-space forwarder on CPU B receives its packets from CPU A: the first
 * packet after a pause must wake a thread on an idle CPU B, and whatever
 * arrives while CPU B is taken away (by the hypervisor on a VM, by other
 * work) waits. Kernel forwarding stays on the sender's CPU and pays neither.
 * Both are properties of the machine, not of a forwarder, and they decide
 * the latency cell's figures, so the bench measures them in the same run:
 *
 *  - wake-up: a thread on CPU B sleeps in read() on a pipe; a thread on CPU
 *    A writes the time to it every P ms (CPU B idles in between, as a
 *    forwarder's does between the latency cell's bursts); B notes how long
 *    after the write it ran. N rounds; p50 and p99.
 *  - stalls: a thread spinning on CPU B for S seconds reads the clock in a
 *    loop; a gap over 100 us is time CPU B was taken away. Per second: time
 *    lost, and gaps over 1 ms.
 *
 *   wakeprobe -a CPU_A -b CPU_B [-n 300] [-p 10] [-s 3]
 *
 * Prints one JSON line: {"wake_p50_us": .., "wake_p99_us": .., "wake_n": N,
 * "stall_ms_per_s": .., "stalls_over_1ms_per_s": .., "spin_s": S}.
 * Exit status 0, or 2 for bad arguments or a failed set-up. Bounded: at most
 * N * P ms plus S seconds (and an alarm as a safety net).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_ROUNDS 5000

static int cpu_a, cpu_b, rounds = 300, pause_ms = 10, spin_s = 3;
static int pipefd[2];
static uint64_t lat_ns[MAX_ROUNDS];

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int pin(int cpu)
{
    cpu_set_t set;

    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *sleeper(void *arg)
{
    (void)arg;
    if (pin(cpu_b) != 0)
        return (void *)1;
    for (int i = 0; i < rounds; i++) {
        uint64_t sent;
        ssize_t r = read(pipefd[0], &sent, sizeof(sent));
        if (r != (ssize_t)sizeof(sent))
            return (void *)1;
        lat_ns[i] = now_ns() - sent;
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -1;
    *out = (int)v;
    return 0;
}

int main(int argc, char **argv)
{
    pthread_t th;
    void *ret;
    int opt, have_a = 0, have_b = 0;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

    while ((opt = getopt(argc, argv, "a:b:n:p:s:")) != -1) {
        int bad = 0;
        switch (opt) {
        case 'a': bad = parse_int(optarg, 0, (int)ncpu - 1, &cpu_a); have_a = 1; break;
        case 'b': bad = parse_int(optarg, 0, (int)ncpu - 1, &cpu_b); have_b = 1; break;
        case 'n': bad = parse_int(optarg, 10, MAX_ROUNDS, &rounds); break;
        case 'p': bad = parse_int(optarg, 1, 100, &pause_ms); break;
        case 's': bad = parse_int(optarg, 1, 30, &spin_s); break;
        default: bad = 1;
        }
        if (bad) {
            fprintf(stderr, "wakeprobe: bad -%c %s\n", opt, optarg ? optarg : "");
            return 2;
        }
    }
    if (!have_a || !have_b || cpu_a == cpu_b) {
        fprintf(stderr, "usage: wakeprobe -a CPU_A -b CPU_B [-n rounds] [-p pause_ms] "
                "[-s spin_s] (two different CPUs)\n");
        return 2;
    }
    alarm((unsigned)((uint64_t)rounds * (uint64_t)pause_ms / 1000u + (unsigned)spin_s + 30u));

    /* wake-ups */
    if (pipe(pipefd) != 0 || pin(cpu_a) != 0) {
        perror("wakeprobe: set-up");
        return 2;
    }
    if (pthread_create(&th, NULL, sleeper, NULL) != 0) {
        perror("wakeprobe: thread");
        return 2;
    }
    for (int i = 0; i < rounds; i++) {
        struct timespec p = { pause_ms / 1000, (long)(pause_ms % 1000) * 1000000l };
        uint64_t t;
        nanosleep(&p, NULL);
        t = now_ns();
        if (write(pipefd[1], &t, sizeof(t)) != (ssize_t)sizeof(t)) {
            perror("wakeprobe: write");
            return 2;
        }
    }
    pthread_join(th, &ret);
    if (ret != NULL) {
        fprintf(stderr, "wakeprobe: the sleeper failed\n");
        return 2;
    }
    qsort(lat_ns, (size_t)rounds, sizeof(lat_ns[0]), cmp_u64);

    /* stalls of a spinning thread on CPU B */
    uint64_t lost = 0, over1ms = 0, start, last, end;
    if (pin(cpu_b) != 0) {
        perror("wakeprobe: pin");
        return 2;
    }
    start = last = now_ns();
    end = start + (uint64_t)spin_s * 1000000000ull;
    for (;;) {
        uint64_t t = now_ns(), gap = t - last;
        if (gap > 100000u) {
            lost += gap;
            over1ms += gap > 1000000u;
        }
        last = t;
        if (t >= end)
            break;
    }
    double secs = (double)(last - start) / 1e9;
    printf("{\"wake_p50_us\": %.1f, \"wake_p99_us\": %.1f, \"wake_n\": %d, "
           "\"stall_ms_per_s\": %.2f, \"stalls_over_1ms_per_s\": %.2f, \"spin_s\": %.2f}\n",
           (double)lat_ns[rounds / 2] / 1e3, (double)lat_ns[rounds * 99 / 100] / 1e3, rounds,
           (double)lost / 1e6 / secs, (double)over1ms / secs, secs);
    return 0;
}
