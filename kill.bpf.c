// Who signals whom: one event per kill(2) (62 on x86_64; the kill command, os.kill, a shell's
// kill builtin), with the sender's pid and command name, the target pid (0 or negative: a
// process group, -1: every process the sender may signal) and the signal number.
//
//   tailcallctl attach kill examples/kill.bpf.c
//   kill -TERM 4300
//   tailcallctl events --slot kill
//   12:00:01.123456 kill bash[4242] uid 0: sender_pid=4242 sender_comm="bash" target_pid=4300 sig=15
//
// sig 0 is a probe ("does this process exist?"): no signal is sent, but the call is reported.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

struct kill_event {
    u32 sender_pid;
    char sender_comm[16];
    int target_pid;
    int sig;
};

SEC("raw_tracepoint/sys_enter")
int enter_kill(struct bpf_raw_tracepoint_args *ctx)
{
    struct kill_event e = {};

    // kill(pid_t pid, int sig): both ints, so cut to 32 bits with their sign.
    e.sender_pid = TC_PID();
    TC_COMM(e.sender_comm);
    e.target_pid = (int)TC_ARG(ctx, 0);
    e.sig = (int)TC_ARG(ctx, 1);
    TC_EMIT(ctx, &e);
    return 0;
}

char _license[] SEC("license") = "GPL";
