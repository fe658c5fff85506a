/* getppid_loop: the syscall the benchmark times.
 *
 * usage: getppid_loop CALLS RUNS
 * Makes RUNS back-to-back runs of CALLS getppid(2) calls each and prints one line per run:
 * the wall-clock nanoseconds per call. getppid does almost no work in the kernel, so the
 * time is dominated by syscall entry/exit, which is where sys_enter programs add their cost.
 * syscall(SYS_getppid) is used instead of getppid() so that no libc caching could skip the
 * kernel. The driver takes the minimum over runs: noise on these VMs only ever adds time.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* vDSO: no syscall, so it does not perturb sys_enter */
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static double one_run(long calls)
{
    double start = now_ns();
    for (long i = 0; i < calls; i++)
        syscall(SYS_getppid);
    return (now_ns() - start) / (double)calls;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s CALLS RUNS\n", argv[0]);
        return 2;
    }
    long calls = strtol(argv[1], NULL, 10);
    long runs = strtol(argv[2], NULL, 10);
    if (calls <= 0 || runs <= 0) {
        fprintf(stderr, "CALLS and RUNS must be positive\n");
        return 2;
    }
    one_run(calls / 10 + 1);  /* warm caches and branch predictors; not reported */
    for (long r = 0; r < runs; r++)
        printf("%.3f\n", one_run(calls));
    return 0;
}
