// Who opens what: one event per openat(2) on the machine (257 on x86_64; glibc's open() and
// fopen() call it), with the path, the flags and the mode as the caller passed them.
//
//   tailcallctl attach openat examples/openat.bpf.c
//   tailcallctl events -f --slot openat       # then, elsewhere: touch /tmp/new
//   12:00:01.123456 openat touch[4242] uid 0: dirfd=-100 path="/etc/ld.so.cache" flags=524288 mode=0
//   ...
//   12:00:01.123701 openat touch[4242] uid 0: dirfd=-100 path="/tmp/new" flags=2369 mode=438
//
// (decimal: flags 524288 is O_CLOEXEC, 2369 is 0x941, O_WRONLY|O_CREAT|O_NOCTTY|O_NONBLOCK;
// mode 438 is 0666; --json gives the same fields to scripts.) Every open of the machine
// makes an event, hundreds a second on a busy host: follow them (-f) rather than read the
// daemon's backlog, which they soon fill, and filter with `--json | jq` or in the handler
// itself (TC_PID(), TC_UID()).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

struct openat_event {
    int dirfd;
    char path[256];
    u32 flags;  // O_* bits, as in <fcntl.h>
    u32 mode;   // the new file's mode, when flags has O_CREAT or O_TMPFILE
};

SEC("raw_tracepoint/sys_enter")
int enter_openat(struct bpf_raw_tracepoint_args *ctx)
{
    struct openat_event e = {};

    // openat(int dirfd, const char *pathname, int flags, mode_t mode)
    e.dirfd = (int)TC_ARG(ctx, 0);
    bpf_probe_read_user_str(e.path, sizeof(e.path), (const char *)TC_ARG(ctx, 1));
    e.flags = (u32)TC_ARG(ctx, 2);
    e.mode = (u32)TC_ARG(ctx, 3);
    TC_EMIT(ctx, &e);
    return 0;
}

char _license[] SEC("license") = "GPL";
