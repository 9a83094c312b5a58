/* LD_PRELOAD shim for the host-crash drill (tests/test_fault_cluster_host_crash.py).

   Every completed fsync/fdatasync of a regular file appends "inode size\n" to the
   file named by $FSYNC_LOG, the size taken right before the call: when the call
   returns, at least that much of the file is on disk. The last line for a file is
   therefore what a machine that crashed then would keep of it, and never less than
   what the server reported as fsynced (it reports only after the call returns).
   If $FSYNC_DELAY_FILE names a file holding a number, every fsync first waits that
   many milliseconds (a slow or stalled disk; read at each call, so a test can change
   it while the server runs). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int (*sync_fn)(int);

static int logged(int fd, sync_fn real) {
    const char *delay = getenv("FSYNC_DELAY_FILE");
    FILE *in = delay != NULL ? fopen(delay, "r") : NULL;
    if (in != NULL) {
        long ms = 0;
        if (fscanf(in, "%ld", &ms) == 1 && ms > 0) {
            struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&pause, NULL);
        }
        fclose(in);
    }
    struct stat st;
    int regular = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    int rc = real(fd);
    const char *path = getenv("FSYNC_LOG");
    if (rc == 0 && regular && path != NULL) {
        char line[64];
        int n = snprintf(line, sizeof line, "%llu %lld\n", (unsigned long long)st.st_ino,
                         (long long)st.st_size);
        int out = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (out >= 0) {
            if (write(out, line, (size_t)n) != n) { /* the drill sees a short log */ }
            close(out);
        }
    }
    return rc;
}

int fsync(int fd) {
    static sync_fn real;
    if (real == NULL) real = (sync_fn)dlsym(RTLD_NEXT, "fsync");
    return logged(fd, real);
}

int fdatasync(int fd) {
    static sync_fn real;
    if (real == NULL) real = (sync_fn)dlsym(RTLD_NEXT, "fdatasync");
    return logged(fd, real);
}
