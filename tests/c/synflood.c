/*
 * synflood: a spoofed TCP SYN flood (or, with -u, a UDP one) for the lab tests
 * (tests/test_flood_lab.py).
 *
 * Why C and sendmmsg: the test wants the flood as fast as the lab's sender can
 * make it; a Python loop sends one packet per system call and tops out far
 * below what the gateway's kernel can push into the TUN.
 *
 * Every packet is an IPv4 TCP SYN to ADDR:PORT from a random source address in
 * 198.18.128.0/17 (the benchmark range's upper half, which no lab host uses)
 * and a random source port, with a correct TCP checksum (a backend that gets
 * it answers with a SYN-ACK, as it would to a real flood); with -u, a UDP
 * datagram of 12 bytes (IPv4 + UDP + payload = 40 bytes, checksum correct).
 * Neither the source
 * range nor anything outside 198.18.0.0/15 as destination can be chosen: the
 * program refuses other destinations. Bounded by count (-n) and time (-t, plus
 * an alarm as a safety net); -r caps the rate (packets/s, 0 = as fast as it
 * goes).
 *
 *   synflood -d 198.18.100.1 -p 80 [-u] [-n 5000000] [-t 10] [-r 0] [-b 64] [-s SEED]
 *
 * On exit it prints one JSON line: {"sent": N, "errors": E, "elapsed": S, "pps": P}.
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

#define MAX_BATCH 256
#define PKT_LEN   40            /* IPv4 header + TCP header, no options */
#define SRC_NET   0xC6128000u   /* 198.18.128.0/17 */
#define SRC_MASK  0x00007FFFu
#define LAB_NET   0xC6120000u   /* 198.18.0.0/15 */
#define LAB_MASK  0xFFFE0000u

static volatile sig_atomic_t stop_now;

static void on_signal(int sig)
{
	(void)sig;
	stop_now = 1;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t rng_state;

static uint32_t rnd(void)
{
	/* xorshift64*: fast, and good enough to spread sources and ports */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (uint32_t)((rng_state * 2685821657736338717ull) >> 32);
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (uint16_t)~sum;
}

/* Fill pkt (PKT_LEN bytes) with an IPv4 header of protocol proto and the first
 * four bytes of its transport header, the ports (all host order). */
static uint8_t *make_ip(uint8_t *pkt, uint8_t proto, uint32_t src, uint32_t dst,
			uint16_t sport, uint16_t dport)
{
	memset(pkt, 0, PKT_LEN);
	pkt[0] = 0x45;
	pkt[3] = PKT_LEN;               /* total length (the kernel sets it too) */
	pkt[8] = 64;                    /* TTL */
	pkt[9] = proto;
	for (int i = 0; i < 4; i++) {
		pkt[12 + i] = (uint8_t)(src >> (24 - 8 * i));
		pkt[16 + i] = (uint8_t)(dst >> (24 - 8 * i));
	}
	uint8_t *l4 = pkt + 20;
	l4[0] = (uint8_t)(sport >> 8);
	l4[1] = (uint8_t)sport;
	l4[2] = (uint8_t)(dport >> 8);
	l4[3] = (uint8_t)dport;
	return l4;
}

/* The transport checksum of pkt (made by make_ip, its checksum field zero):
 * pseudo header + the len bytes of the transport header and payload. */
static uint16_t l4_csum(const uint8_t *pkt, uint32_t src, uint32_t dst, int len)
{
	const uint8_t *l4 = pkt + 20;
	uint32_t sum = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF);

	sum += pkt[9] + (uint32_t)len;
	for (int i = 0; i < len; i += 2)
		sum += (uint32_t)(l4[i] << 8 | l4[i + 1]);
	return csum_fold(sum);
}

/* Fill pkt: a SYN from src:sport to dst:dport (all host order). */
static void make_syn(uint8_t *pkt, uint32_t src, uint32_t dst, uint16_t sport, uint16_t dport,
		     uint32_t seq)
{
	uint8_t *t = make_ip(pkt, IPPROTO_TCP, src, dst, sport, dport);

	for (int i = 0; i < 4; i++)
		t[4 + i] = (uint8_t)(seq >> (24 - 8 * i));
	t[12] = 5 << 4;                 /* data offset */
	t[13] = 0x02;                   /* SYN */
	t[14] = 0xFA;                   /* window 64240 */
	t[15] = 0xF0;
	uint16_t c = l4_csum(pkt, src, dst, 20);
	t[16] = (uint8_t)(c >> 8);
	t[17] = (uint8_t)c;
}

/* Fill pkt: a UDP datagram of PKT_LEN - 28 payload bytes from src:sport to
 * dst:dport (all host order). */
static void make_udp(uint8_t *pkt, uint32_t src, uint32_t dst, uint16_t sport, uint16_t dport,
		     uint32_t salt)
{
	const int ulen = PKT_LEN - 20;
	uint8_t *u = make_ip(pkt, IPPROTO_UDP, src, dst, sport, dport);

	u[5] = (uint8_t)ulen;
	for (int i = 0; i < 4; i++)
		u[8 + i] = (uint8_t)(salt >> (24 - 8 * i));
	uint16_t c = l4_csum(pkt, src, dst, ulen);
	if (c == 0)
		c = 0xFFFF;
	u[6] = (uint8_t)(c >> 8);
	u[7] = (uint8_t)c;
}

static int usage(const char *why)
{
	fprintf(stderr, "synflood: %s\n"
		"usage: synflood -d ADDR -p PORT [-u] [-n COUNT] [-t SECONDS] [-r PPS] [-b BATCH] "
		"[-s SEED]\n", why);
	return 2;
}

int main(int argc, char **argv)
{
	struct in_addr daddr = {0};
	long port = 0, count = 5000000, rate = 0, batch = 64;
	double seconds = 10.0;
	uint64_t seed = 1;
	int opt, udp = 0;

	while ((opt = getopt(argc, argv, "d:p:n:t:r:b:s:u")) != -1) {
		switch (opt) {
		case 'd':
			if (inet_pton(AF_INET, optarg, &daddr) != 1)
				return usage("bad -d address");
			break;
		case 'p': port = strtol(optarg, NULL, 10); break;
		case 'n': count = strtol(optarg, NULL, 10); break;
		case 't': seconds = strtod(optarg, NULL); break;
		case 'r': rate = strtol(optarg, NULL, 10); break;
		case 'b': batch = strtol(optarg, NULL, 10); break;
		case 's': seed = strtoull(optarg, NULL, 10); break;
		case 'u': udp = 1; break;
		default: return usage("unknown option");
		}
	}
	uint32_t dst = ntohl(daddr.s_addr);
	if ((dst & LAB_MASK) != LAB_NET)
		return usage("-d must be in 198.18.0.0/15 (lab addresses only)");
	if (port < 1 || port > 65535 || count < 1 || rate < 0 || batch < 1 || batch > MAX_BATCH ||
	    !(seconds > 0 && seconds <= 600))
		return usage("bad -p/-n/-r/-b/-t");

	int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
	if (fd < 0) {
		perror("synflood: socket");
		return 2;
	}
	int sndbuf = 4 << 20;
	(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));

	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	signal(SIGALRM, on_signal);
	alarm((unsigned)seconds + 5);   /* the safety net if the clock loop were stuck */

	rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
	static uint8_t pkts[MAX_BATCH][PKT_LEN];
	static struct iovec iov[MAX_BATCH];
	static struct mmsghdr msgs[MAX_BATCH];
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = daddr};

	for (int i = 0; i < batch; i++) {
		iov[i].iov_base = pkts[i];
		iov[i].iov_len = PKT_LEN;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_name = &to;
		msgs[i].msg_hdr.msg_namelen = sizeof(to);
	}

	long sent = 0, errors = 0;
	double t0 = now_s(), el = 0;
	while (!stop_now && sent < count) {
		el = now_s() - t0;
		if (el >= seconds)
			break;
		if (rate > 0 && sent > rate * el) {
			struct timespec ts = {0, 200000};
			nanosleep(&ts, NULL);
			continue;
		}
		int n = (int)(count - sent < batch ? count - sent : batch);
		for (int i = 0; i < n; i++) {
			uint32_t src = SRC_NET | (rnd() & SRC_MASK);
			if ((src & 0xFF) == 0 || (src & 0xFF) == 0xFF)
				src ^= 1;
			if (udp)
				make_udp(pkts[i], src, dst, (uint16_t)(1024 + rnd() % 64511),
					 (uint16_t)port, rnd());
			else
				make_syn(pkts[i], src, dst, (uint16_t)(1024 + rnd() % 64511),
					 (uint16_t)port, rnd());
		}
		int r = sendmmsg(fd, msgs, (unsigned)n, 0);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			errors++;
			if (errno == ENOBUFS || errno == EAGAIN) {
				struct timespec ts = {0, 100000};
				nanosleep(&ts, NULL);
				continue;
			}
			perror("synflood: sendmmsg");
			break;
		}
		sent += r;
	}
	el = now_s() - t0;
	printf("{\"sent\": %ld, \"errors\": %ld, \"elapsed\": %.3f, \"pps\": %.0f}\n",
	       sent, errors, el, el > 0 ? (double)sent / el : 0.0);
	close(fd);
	return 0;
}
