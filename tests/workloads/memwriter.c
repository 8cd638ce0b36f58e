/*
 * memwriter: a memory-integrity workload for checkpoint/restore and migration tests.
 *
 *     memwriter <MiB> <dirty_MiB_per_s> <out_file>
 *
 * Allocates <MiB> MiB (malloc, every page touched) and fills each 4 KiB page with a pattern
 * derived from the page index and that page's generation number, kept in a separate array.
 * Then it loops forever:
 *   - every 10 ms it rewrites the next pages (round robin) with generation + 1, so that
 *     about <dirty_MiB_per_s> MiB are dirtied per second;
 *   - every ~200 ms it checks the WHOLE memory against the generation array and appends one
 *     line to <out_file>:
 *
 *         <seq> <status> <pages>[ bad=<n> first=<page>]
 *
 *     seq starts at 1 and grows by one per written line (it lives in memory, so it continues
 *     across a checkpoint/restore), status is `ok` or `BAD`, pages is the number of pages
 *     checked; a BAD line also names how many pages were wrong and the first one. After a
 *     mismatch the page's expected state is re-synchronised with what was found by
 *     rewriting it, so one corruption yields one BAD line, not an endless stream.
 *
 * The output file is opened (O_APPEND), written and closed for every line: no descriptor
 * stays open across the loop, so a checkpoint never sees the file open. A line that cannot
 * be written completely is retried with the same seq at the next check (no gaps).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define TICK_NS 10000000L     /* 10 ms between dirtying steps */
#define CHECK_NS 200000000L   /* ~200 ms between full checks */

static uint64_t *mem;
static uint32_t *gen;
static size_t npages;

static uint64_t word(size_t page, uint32_t g, size_t j)
{
	uint64_t base = (uint64_t)page * 2654435761ULL + g;
	return (base * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)j * 0xD6E8FEB86659FD93ULL) ^ j;
}

static void fill(size_t page)
{
	uint64_t *p = mem + page * WORDS;
	uint32_t g = gen[page];
	for (size_t j = 0; j < WORDS; j++)
		p[j] = word(page, g, j);
}

static int page_ok(size_t page)
{
	const uint64_t *p = mem + page * WORDS;
	uint32_t g = gen[page];
	for (size_t j = 0; j < WORDS; j++)
		if (p[j] != word(page, g, j))
			return 0;
	return 1;
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(long ns)
{
	struct timespec ts = { .tv_sec = ns / 1000000000L, .tv_nsec = ns % 1000000000L };
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* Append one whole line; 0 on success. */
static int append_line(const char *path, const char *line)
{
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	size_t len = strlen(line);
	ssize_t n = write(fd, line, len);
	int err = (n != (ssize_t)len);
	if (close(fd) != 0)
		err = 1;
	return err ? -1 : 0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s <MiB> <dirty_MiB_per_s> <out_file>\n", argv[0]);
		return 2;
	}
	char *end;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (*end || mib == 0) {
		fprintf(stderr, "memwriter: bad MiB %s\n", argv[1]);
		return 2;
	}
	double rate = strtod(argv[2], &end);
	if (*end || rate < 0) {
		fprintf(stderr, "memwriter: bad dirty rate %s\n", argv[2]);
		return 2;
	}
	const char *out = argv[3];

	npages = mib * (1024 * 1024 / PAGE);
	mem = malloc(npages * PAGE);
	gen = calloc(npages, sizeof(*gen));
	if (!mem || !gen) {
		fprintf(stderr, "memwriter: cannot allocate %lu MiB\n", mib);
		return 1;
	}
	for (size_t i = 0; i < npages; i++)
		fill(i); /* touches every page */

	double pages_per_s = rate * (1024 * 1024 / PAGE);
	double budget = 0;      /* pages owed to the dirtying schedule */
	size_t cursor = 0;      /* next page to rewrite */
	unsigned long seq = 1;  /* seq of the next line to write */
	int64_t last = now_ns();
	int64_t last_check = 0; /* check at once */
	size_t bad = 0, first = 0; /* wrong pages not yet reported */

	for (;;) {
		int64_t t = now_ns();
		double dt = (double)(t - last) / 1e9;
		last = t;
		/* Cap the catch-up (e.g. after being frozen for a migration) at 100 ms worth. */
		if (dt > 0.1)
			dt = 0.1;
		if (dt < 0)
			dt = 0;
		budget += pages_per_s * dt;
		while (budget >= 1.0) {
			gen[cursor]++;
			fill(cursor);
			cursor = (cursor + 1) % npages;
			budget -= 1.0;
		}

		if (t - last_check >= CHECK_NS) {
			for (size_t i = 0; i < npages; i++) {
				if (!page_ok(i)) {
					if (bad++ == 0)
						first = i;
					fill(i); /* resynchronise: report each corruption once */
				}
			}
			char line[128];
			if (bad)
				snprintf(line, sizeof(line), "%lu BAD %zu bad=%zu first=%zu\n", seq,
					 npages, bad, first);
			else
				snprintf(line, sizeof(line), "%lu ok %zu\n", seq, npages);
			if (append_line(out, line) == 0) {
				seq++;
				bad = 0; /* reported */
			}
			last_check = now_ns();
		}
		sleep_ns(TICK_NS);
	}
}
