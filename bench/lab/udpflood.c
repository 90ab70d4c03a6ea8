/*
 * udpflood: a small-packet UDP sender for the lab benchmark (bench/lab/run.py).
 *
 * Why C and sendmmsg: a forwarder is measured by the small-packet rate it
 * delivers, so the sender must be able to outrun it. One syscall per packet
 * (a Python loop, or iperf3 -u) tops out far below what kernel forwarding
 * does; sendmmsg() hands the kernel a batch per syscall.
 *
 * Flows: F sockets, each bound to its own source port (sport0 .. sport0+F-1),
 * each sending to every destination in turn, so a balancer hashing the
 * 5-tuple spreads the load over its backends (and a multi-queue TUN over its
 * queues). Every run is bounded in time (-t, plus an alarm as a safety net).
 *
 *   udpflood -d 198.18.100.1[,ADDR...] -p 5300 [-S SRC] [-s 20000] [-f 64]
 *            [-l 64] [-t 5] [-b 64] [-r PPS]
 *
 * On exit it prints one JSON line: {"sent": N, "errors": E, "elapsed": S,
 * "pps": P, "flows": F, "dests": D, "payload": L, "batch": B}.
 * Exit status 0, or 2 for bad arguments / socket set-up failures.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_DESTS   16
#define MAX_FLOWS   1024
#define MAX_BATCH   256
#define MAX_PAYLOAD 1472

static volatile sig_atomic_t stop_now;

static void
on_signal(int sig)
{
	(void)sig;
	stop_now = 1;
}

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int
usage(const char *why)
{
	fprintf(stderr, "udpflood: %s\n"
		"usage: udpflood -d ADDR[,ADDR...] -p PORT [-S SRCADDR] [-s SPORT0] [-f FLOWS]\n"
		"                [-l PAYLOAD] [-t SECONDS] [-b BATCH] [-r PPS]\n", why);
	return 2;
}

static int
parse_dests(char *list, struct sockaddr_in *dests, int port)
{
	int n = 0;
	char *save = NULL;

	for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		if (n == MAX_DESTS)
			return -1;
		memset(&dests[n], 0, sizeof(dests[n]));
		dests[n].sin_family = AF_INET;
		dests[n].sin_port = htons((uint16_t)port);
		if (inet_pton(AF_INET, tok, &dests[n].sin_addr) != 1)
			return -1;
		n++;
	}
	return n;
}

int
main(int argc, char **argv)
{
	static struct sockaddr_in dests[MAX_DESTS];
	static int socks[MAX_FLOWS];
	static struct mmsghdr msgs[MAX_BATCH];
	static struct iovec iov;
	static char payload[MAX_PAYLOAD];
	char *dest_arg = NULL;
	const char *src_arg = NULL;
	long port = 0, sport0 = 20000, flows = 64, len = 64, batch = 64;
	double seconds = 5.0, rate = 0.0;
	int opt, ndests;

	while ((opt = getopt(argc, argv, "d:p:S:s:f:l:t:b:r:")) != -1) {
		switch (opt) {
		case 'd': dest_arg = optarg; break;
		case 'p': port = strtol(optarg, NULL, 10); break;
		case 'S': src_arg = optarg; break;
		case 's': sport0 = strtol(optarg, NULL, 10); break;
		case 'f': flows = strtol(optarg, NULL, 10); break;
		case 'l': len = strtol(optarg, NULL, 10); break;
		case 't': seconds = strtod(optarg, NULL); break;
		case 'b': batch = strtol(optarg, NULL, 10); break;
		case 'r': rate = strtod(optarg, NULL); break;
		default: return usage("unknown option");
		}
	}
	if (!dest_arg)
		return usage("-d is required");
	if (port < 1 || port > 65535)
		return usage("-p must be 1..65535");
	if (flows < 1 || flows > MAX_FLOWS || sport0 < 1 || sport0 + flows - 1 > 65535)
		return usage("bad -s/-f: source ports must fit in 1..65535, flows in 1..1024");
	if (len < 0 || len > MAX_PAYLOAD)
		return usage("-l must be 0..1472");
	if (batch < 1 || batch > MAX_BATCH)
		return usage("-b must be 1..256");
	if (!(seconds > 0.0 && seconds <= 600.0))
		return usage("-t must be in (0, 600]");
	if (rate < 0.0)
		return usage("-r must be >= 0");
	ndests = parse_dests(dest_arg, dests, (int)port);
	if (ndests < 1)
		return usage("bad -d: IPv4 addresses separated by commas, at most 16");

	for (long i = 0; i < flows; i++) {
		struct sockaddr_in src;
		int one = 1, sndbuf = 4 << 20;

		socks[i] = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (socks[i] < 0) {
			perror("udpflood: socket");
			return 2;
		}
		setsockopt(socks[i], SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		setsockopt(socks[i], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
		memset(&src, 0, sizeof(src));
		src.sin_family = AF_INET;
		src.sin_port = htons((uint16_t)(sport0 + i));
		if (src_arg && inet_pton(AF_INET, src_arg, &src.sin_addr) != 1)
			return usage("bad -S address");
		if (bind(socks[i], (struct sockaddr *)&src, sizeof(src)) < 0) {
			perror("udpflood: bind");
			return 2;
		}
	}

	for (long i = 0; i < len; i++)
		payload[i] = (char)('a' + i % 26);
	iov.iov_base = payload;
	iov.iov_len = (size_t)len;
	for (long i = 0; i < batch; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_name = &dests[i % ndests];
		msgs[i].msg_hdr.msg_namelen = sizeof(dests[0]);
	}

	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	signal(SIGALRM, on_signal);
	alarm((unsigned)seconds + 5);   /* safety net: never run much past -t */

	unsigned long long sent = 0, errors = 0;
	double start = now_s(), end = start + seconds, t = start;
	long flow = 0;
	unsigned long iter = 0;

	while (!stop_now) {
		if ((iter++ & 15) == 0) {
			t = now_s();
			if (t >= end)
				break;
		}
		if (rate > 0.0) {
			/* Pacing: never ahead of rate * elapsed; sleep a little when ahead. */
			t = now_s();
			if (t >= end)
				break;
			if ((double)sent >= rate * (t - start)) {
				struct timespec nap = {0, 50000};

				nanosleep(&nap, NULL);
				continue;
			}
		}
		int n = sendmmsg(socks[flow], msgs, (unsigned)batch, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			errors++;
		} else {
			sent += (unsigned long long)n;
			if (n < batch)
				errors++;
		}
		if (++flow == flows)
			flow = 0;
	}
	t = now_s();

	double elapsed = t - start;

	printf("{\"sent\": %llu, \"errors\": %llu, \"elapsed\": %.6f, \"pps\": %.1f, "
	       "\"flows\": %ld, \"dests\": %d, \"payload\": %ld, \"batch\": %ld}\n",
	       sent, errors, elapsed, elapsed > 0 ? (double)sent / elapsed : 0.0,
	       flows, ndests, len, batch);
	for (long i = 0; i < flows; i++)
		close(socks[i]);
	return 0;
}
