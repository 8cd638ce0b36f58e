/*
 * netserver PORT LOGFILE [UNIXPATH] — the network workload of tests/net.rs.
 *
 * TCP on PORT (IPv4, and IPv6 where the kernel has it): every client sends lines "c <n>\n" with n = 1, 2, 3, ...; the server checks
 * that each connection's sequence has no gap or repeat, and sends its own lines "s <k>\n"
 * (k = 1, 2, 3, ... per connection) every 20 ms. UDP on PORT: every datagram is echoed.
 * With UNIXPATH, a Unix stream socket bound there takes connections as the TCP one does.
 * Every 100 ms it appends "<tick> conns=<open connections> bad=<sequence errors> udp=<n>\n"
 * to LOGFILE, so a test sees whether the connection count ever dropped.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAXC 64

struct conn {
	int fd;
	long expect; /* next client sequence number */
	long sent;   /* last server sequence number sent */
	char buf[256];
	int len;
};

static long now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv)
{
	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: netserver PORT LOGFILE [UNIXPATH]\n");
		return 2;
	}
	int port = atoi(argv[1]);
	FILE *log = fopen(argv[2], "a");
	if (!log)
		return 1;
	setvbuf(log, NULL, _IOLBF, 0);

	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1;
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 16)) {
		perror("tcp");
		return 1;
	}
	/* IPv6 on its own socket (v6 only): IPv4 connections stay on plain IPv4 sockets. */
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(port),
				   .sin6_addr = IN6ADDR_ANY_INIT };
	int l6fd = socket(AF_INET6, SOCK_STREAM, 0);
	if (l6fd >= 0) {
		setsockopt(l6fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		setsockopt(l6fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
		if (bind(l6fd, (struct sockaddr *)&a6, sizeof(a6)) || listen(l6fd, 16)) {
			perror("tcp6");
			return 1;
		}
	}
	int ufd = socket(AF_INET, SOCK_DGRAM, 0);
	if (bind(ufd, (struct sockaddr *)&a, sizeof(a))) {
		perror("udp");
		return 1;
	}

	int unfd = -1;
	if (argc == 4) {
		struct sockaddr_un un = { .sun_family = AF_UNIX };
		snprintf(un.sun_path, sizeof(un.sun_path), "%s", argv[3]);
		unlink(argv[3]);
		unfd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (bind(unfd, (struct sockaddr *)&un, sizeof(un)) || listen(unfd, 16)) {
			perror("unix");
			return 1;
		}
	}

	struct conn c[MAXC];
	int n = 0;
	long bad = 0, udp = 0, tick = 0;
	long next_log = now_ms(), next_send = now_ms();
	for (;;) {
		struct pollfd p[MAXC + 4];
		p[0] = (struct pollfd){ .fd = lfd, .events = POLLIN };
		p[1] = (struct pollfd){ .fd = ufd, .events = POLLIN };
		p[2] = (struct pollfd){ .fd = l6fd, .events = POLLIN }; /* ignored if -1 */
		p[3] = (struct pollfd){ .fd = unfd, .events = POLLIN }; /* ignored if -1 */
		for (int i = 0; i < n; i++)
			p[i + 4] = (struct pollfd){ .fd = c[i].fd, .events = POLLIN };
		poll(p, n + 4, 10);
		int polled = n; /* connections accepted below have no pollfd yet */
		for (int l = 0; l < 4; l++) {
			if (l == 1 || !(p[l].revents & POLLIN) || n >= MAXC)
				continue;
			int fd = accept(p[l].fd, NULL, NULL);
			if (fd >= 0) {
				fcntl(fd, F_SETFL, O_NONBLOCK);
				c[n] = (struct conn){ .fd = fd, .expect = 1 };
				n++;
			}
		}
		if (p[1].revents & POLLIN) {
			char d[512];
			struct sockaddr_in from;
			socklen_t fl = sizeof(from);
			ssize_t r = recvfrom(ufd, d, sizeof(d), 0, (struct sockaddr *)&from, &fl);
			if (r > 0) {
				sendto(ufd, d, r, 0, (struct sockaddr *)&from, fl);
				udp++;
			}
		}
		for (int i = 0; i < polled; i++) {
			if (!(p[i + 4].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			ssize_t r = read(c[i].fd, c[i].buf + c[i].len, sizeof(c[i].buf) - 1 - c[i].len);
			if (r == 0 || (r < 0 && errno != EAGAIN)) {
				close(c[i].fd);
				c[i].fd = -1;
				continue;
			}
			if (r < 0)
				continue;
			c[i].len += r;
			c[i].buf[c[i].len] = 0;
			char *line = c[i].buf, *nl;
			while ((nl = strchr(line, '\n'))) {
				*nl = 0;
				long v;
				if (sscanf(line, "c %ld", &v) != 1 || v != c[i].expect)
					bad++;
				else
					c[i].expect++;
				line = nl + 1;
			}
			c[i].len = strlen(line);
			memmove(c[i].buf, line, c[i].len + 1);
			if (c[i].len > 200)
				c[i].len = 0, bad++;
		}
		int k = 0;
		for (int i = 0; i < n; i++)
			if (c[i].fd >= 0)
				c[k++] = c[i];
		n = k;
		long t = now_ms();
		if (t >= next_send) {
			next_send = t + 20;
			for (int i = 0; i < n; i++) {
				char s[64];
				int l = snprintf(s, sizeof(s), "s %ld\n", c[i].sent + 1);
				if (write(c[i].fd, s, l) == l)
					c[i].sent++;
			}
		}
		if (t >= next_log) {
			next_log = t + 100;
			fprintf(log, "%ld conns=%d bad=%ld udp=%ld\n", ++tick, n, bad, udp);
		}
	}
}
