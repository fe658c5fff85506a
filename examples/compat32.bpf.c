// 32-bit (ia32) callers on x86_64: reports each call a 32-bit program makes to the syscall of
// the slot it is attached to, with the six arguments as that program passed them. A 32-bit
// program passes them in other registers than a 64-bit one (bx, cx, dx, si, di, bp instead of
// di, si, dx, r10, r8, r9) and 32 bits wide; TC_ARG reads the caller's own, and TC_COMPAT tells
// which kind of caller it is. 64-bit callers are skipped, so it costs little on a busy slot.
// tailcalld's dispatcher sends an ia32 call to the slot of the syscall of the same name (i386
// fchmodat is 306, x86_64's 268), so TC_NR gives the 64-bit number.
//
//   tailcallctl attach fchmodat examples/compat32.bpf.c
//   gcc -m32 -o caller32 examples/caller32.c && ./caller32 7771 /tmp/x 751
//   tailcallctl events --slot fchmodat
//   12:00:01.123456 fchmodat caller32[4242] uid 0 (32-bit): nr=268 compat=1 args=[7771, 4288264905, 489, 4159833264, 489, 4288264905]
//
// (args[1] is the path's address in the 32-bit program; 489 is 0751. The last three are
// whatever those registers held: fchmodat takes three arguments.)
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

struct compat_call {
    u32 nr;      // the syscall, in the 64-bit numbering of the slot
    u32 compat;  // TC_COMPAT: always 1 here
    u64 args[6];
};

SEC("raw_tracepoint/sys_enter")
int compat_args(struct bpf_raw_tracepoint_args *ctx)
{
    if (!TC_COMPAT(ctx))
        return 0;
    struct compat_call c = {
        .nr = TC_NR(ctx),
        .compat = TC_COMPAT(ctx),
        // TC_ARG's argument number must be a constant (it picks a register at compile time).
        .args = { TC_ARG(ctx, 0), TC_ARG(ctx, 1), TC_ARG(ctx, 2), TC_ARG(ctx, 3), TC_ARG(ctx, 4), TC_ARG(ctx, 5) },
    };
    TC_EMIT(ctx, &c);
    return 0;
}

char _license[] SEC("license") = "GPL";
