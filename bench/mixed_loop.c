/* 16 cheap syscalls in pseudo-random order (argv: calls, runs): prints ns per call of each run.
   bench/dispatch_variants.py --mixed times the dispatcher variants with it, where branch
   prediction sees a mix of syscall numbers rather than one. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long calls = atol(argv[1]); int runs = atoi(argv[2]);
    long nrs[] = {SYS_getppid, SYS_getpid, SYS_getuid, SYS_geteuid, SYS_getgid, SYS_getegid, SYS_gettid, SYS_getpgrp,
                  SYS_umask, SYS_getpgid, SYS_getsid, SYS_personality, SYS_getpriority, SYS_times, SYS_sysinfo, SYS_uname};
    static char buf[4096];
    unsigned x = 12345;
    for (int r = 0; r < runs; r++) {
        struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < calls; i++) {
            x = x * 1103515245 + 12345;
            long nr = nrs[(x >> 16) & 15];
            if (nr == SYS_umask) syscall(nr, 022);
            else if (nr == SYS_personality) syscall(nr, 0xffffffff);
            else if (nr == SYS_getpriority) syscall(nr, 0, 0);
            else syscall(nr, buf, buf);
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / calls);
    }
}
