/* locker: hold a file lock while running a command, or test one.
 *
 *   locker hold KIND PATH CMD [ARG...]   lock PATH (created if missing) exclusively and run
 *                                        CMD with the lock held (the descriptor stays open
 *                                        across the exec); exit 3 when it is held already
 *   locker test KIND PATH                print "held" or "free" (trying a lock and giving
 *                                        it back at once)
 *
 * KIND: flock (flock(2)), posix (fcntl F_SETLK, per process) or ofd (fcntl F_OFD_SETLK,
 * per open file description).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

/* 0 when locked, 1 when someone else holds it, -1 on another error. */
static int try_lock(const char *kind, int fd)
{
    int rc;
    if (strcmp(kind, "flock") == 0) {
        rc = flock(fd, LOCK_EX | LOCK_NB);
    } else {
        struct flock fl;
        memset(&fl, 0, sizeof fl);
        fl.l_type = F_WRLCK;
        fl.l_whence = SEEK_SET;
        int cmd = strcmp(kind, "ofd") == 0 ? F_OFD_SETLK : F_SETLK;
        rc = fcntl(fd, cmd, &fl);
    }
    if (rc == 0)
        return 0;
    return (errno == EWOULDBLOCK || errno == EAGAIN || errno == EACCES) ? 1 : -1;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (strcmp(argv[1], "hold") != 0 && strcmp(argv[1], "test") != 0) ||
        (strcmp(argv[2], "flock") != 0 && strcmp(argv[2], "posix") != 0 &&
         strcmp(argv[2], "ofd") != 0) ||
        (strcmp(argv[1], "hold") == 0 && argc < 5)) {
        fprintf(stderr, "usage: locker hold|test flock|posix|ofd PATH [CMD ARG...]\n");
        return 2;
    }
    int fd = open(argv[3], O_RDWR | O_CREAT, 0644);
    if (fd < 0) {
        perror(argv[3]);
        return 1;
    }
    int got = try_lock(argv[2], fd);
    if (got < 0) {
        perror("lock");
        return 1;
    }
    if (strcmp(argv[1], "test") == 0) {
        puts(got == 0 ? "free" : "held");
        return 0;
    }
    if (got == 1) {
        fprintf(stderr, "%s: held by another\n", argv[3]);
        return 3;
    }
    execvp(argv[4], argv + 4);
    perror(argv[4]);
    return 1;
}
