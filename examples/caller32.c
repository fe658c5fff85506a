/* The 32-bit program for compat32.bpf.c: not a handler, a user program to build with
 *
 *   gcc -m32 -o caller32 examples/caller32.c      (gcc-multilib)
 *   ./caller32 DIRFD PATH MODE                     (MODE in octal: 751)
 *
 * It makes one fchmodat(DIRFD, PATH, MODE) through the 32-bit syscall entry, and prints the
 * address of PATH as the handler will see it in args[1], then the call's result. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s DIRFD PATH MODE\n", argv[0]);
        return 2;
    }
    int dirfd = atoi(argv[1]);
    const char *path = argv[2];
    long mode = strtol(argv[3], NULL, 8);
    printf("%lu\n", (unsigned long)(size_t)path);
    fflush(stdout);
    long ret = syscall(SYS_fchmodat, dirfd, path, mode);
    printf("%ld\n", ret);
    return 0;
}
