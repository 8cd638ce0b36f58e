/* ticker: a counter driven by a periodic timer fd.
 *
 *   ticker FILE    arms a 5 ms periodic CLOCK_MONOTONIC timer fd, reads its expirations
 *                  (blocking) and appends 1, 2, 3, … to FILE, one line per 10 expirations
 *
 * A timer that stops firing stops the count.
 */
#include <stdint.h>
#include <stdio.h>
#include <sys/timerfd.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: ticker FILE\n");
        return 2;
    }
    FILE *out = fopen(argv[1], "a");
    if (!out) {
        perror(argv[1]);
        return 1;
    }
    setvbuf(out, NULL, _IOLBF, 0);
    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec its = {{0, 5000000}, {0, 5000000}};
    if (tfd < 0 || timerfd_settime(tfd, 0, &its, NULL) != 0) {
        perror("timerfd");
        return 1;
    }
    uint64_t since = 0, line = 0;
    for (;;) {
        uint64_t n;
        if (read(tfd, &n, sizeof n) != sizeof n) {
            perror("read timerfd");
            return 1;
        }
        for (since += n; since >= 10; since -= 10)
            fprintf(out, "%llu\n", (unsigned long long)++line);
    }
}
