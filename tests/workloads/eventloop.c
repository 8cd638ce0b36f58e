/* eventloop: a counter kept by an event loop that uses what servers use, and checks it.
 *
 *   eventloop FILE
 *
 * Four worker threads count; 1 MiB of SysV shared memory holds a pattern; an epoll set
 * watches an eventfd, a 5 ms periodic CLOCK_MONOTONIC timer fd and a signalfd for SIGUSR1.
 * Each round writes the eventfd, sends itself SIGUSR1 and waits (up to 2 s) until all three
 * fds have been read, then checks the pattern; every 10 rounds it also checks that each
 * worker counted on. A round that passes appends the next number (1, 2, 3, …) to FILE; one
 * that fails appends "BAD <what>" instead.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define WORKERS 4
#define SHM_BYTES (1 << 20)

static atomic_ulong counts[WORKERS];

static void *worker(void *arg)
{
    long i = (long)arg;
    for (;;) {
        atomic_fetch_add(&counts[i], 1);
        usleep(1000);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: eventloop FILE\n");
        return 2;
    }
    FILE *out = fopen(argv[1], "a");
    if (!out) {
        perror(argv[1]);
        return 1;
    }
    setvbuf(out, NULL, _IOLBF, 0);

    int shmid = shmget(IPC_PRIVATE, SHM_BYTES, IPC_CREAT | 0600);
    unsigned char *shm = shmid < 0 ? (void *)-1 : shmat(shmid, NULL, 0);
    if (shm == (void *)-1) {
        perror("shm");
        return 1;
    }
    for (int i = 0; i < SHM_BYTES; i++)
        shm[i] = (unsigned char)(i * 7 + 3);

    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    int efd = eventfd(0, EFD_NONBLOCK);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    int sfd = signalfd(-1, &usr1, SFD_NONBLOCK);
    int ep = epoll_create1(0);
    struct itimerspec period = {{0, 5000000}, {0, 5000000}};
    if (efd < 0 || tfd < 0 || sfd < 0 || ep < 0 || timerfd_settime(tfd, 0, &period, NULL)) {
        perror("fds");
        return 1;
    }
    int fds[3] = {efd, tfd, sfd};
    for (int i = 0; i < 3; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev)) {
            perror("epoll_ctl");
            return 1;
        }
    }
    for (long i = 0; i < WORKERS; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)i)) {
            fprintf(stderr, "pthread_create failed\n");
            return 1;
        }
    }

    unsigned long line = 0, round = 0, seen[WORKERS] = {0};
    for (;;) {
        uint64_t one = 1;
        if (write(efd, &one, sizeof one) != sizeof one || kill(getpid(), SIGUSR1)) {
            fprintf(out, "BAD eventfd write or kill\n");
            return 1;
        }
        int got[3] = {0, 0, 0};
        for (int tries = 0; tries < 20 && !(got[0] && got[1] && got[2]); tries++) {
            struct epoll_event evs[3];
            int n = epoll_wait(ep, evs, 3, 100);
            for (int j = 0; j < n; j++) {
                uint32_t k = evs[j].data.u32;
                struct signalfd_siginfo si;
                uint64_t v;
                ssize_t want = k == 2 ? (ssize_t)sizeof si : (ssize_t)sizeof v;
                if (k < 3 && read(fds[k], k == 2 ? (void *)&si : (void *)&v, want) == want)
                    got[k] = 1;
            }
        }
        const char *bad = NULL;
        if (!got[0])
            bad = "eventfd";
        else if (!got[1])
            bad = "timerfd";
        else if (!got[2])
            bad = "signalfd";
        for (int i = 0; i < SHM_BYTES && !bad; i += 4093)
            if (shm[i] != (unsigned char)(i * 7 + 3))
                bad = "shared memory";
        if (++round % 10 == 0) {
            for (int i = 0; i < WORKERS && !bad; i++) {
                unsigned long c = atomic_load(&counts[i]);
                if (c == seen[i])
                    bad = "a worker thread";
                seen[i] = c;
            }
        }
        if (bad)
            fprintf(out, "BAD %s\n", bad);
        else
            fprintf(out, "%lu\n", ++line);
        usleep(50000);
    }
}
