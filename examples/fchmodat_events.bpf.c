// The tail-call article's fchmodat handler (fchmodat_libbpf.bpf.c), with its output sent
// through tailcalld's event channel instead of the machine-wide trace pipe: one event per
// fchmodat(2) on the machine (268 on x86_64; coreutils chmod, Python's os.chmod(dir_fd=...)),
// with the path as the caller passed it (read from its memory), the mode and the dirfd.
//
//   tailcallctl attach fchmodat examples/fchmodat_events.bpf.c
//   chmod 640 /tmp/somefile
//   tailcallctl events --slot fchmodat
//   12:00:01.123456 fchmodat chmod[4242] uid 0: path="/tmp/somefile" mode=416 dirfd=-100
//
// (mode is printed in decimal: 416 is 0640; dirfd -100 is AT_FDCWD, a path relative to the
// working folder; os.chmod(name, mode, dir_fd=fd) shows the fd and the bare name.)
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

struct fchmodat_event {
    char path[256];  // a char array: `tailcallctl events` shows it as text, up to its NUL
    u32 mode;
    int dirfd;
};

SEC("raw_tracepoint/sys_enter")
int enter_fchmodat(struct bpf_raw_tracepoint_args *ctx)
{
    struct fchmodat_event e = {};

    // fchmodat(int dirfd, const char *pathname, mode_t mode): TC_ARG reads the caller's own
    // registers, so a 32-bit chmod is decoded right as well. The path lives in the caller's
    // memory: bpf_probe_read_user_str copies it, NUL included (an empty path if unreadable).
    e.dirfd = (int)TC_ARG(ctx, 0);
    bpf_probe_read_user_str(e.path, sizeof(e.path), (const char *)TC_ARG(ctx, 1));
    e.mode = (u32)TC_ARG(ctx, 2);
    TC_EMIT(ctx, &e);
    return 0;
}

char _license[] SEC("license") = "GPL";
