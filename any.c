
#include <uapi/linux/ptrace.h>
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "/sys/fs/bpf/tailcalld-test-13219-f6d21306/counter");

int count_any(struct bpf_raw_tracepoint_args *ctx)
{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long dirfd = 0;
    u32 zero = 0;
    bpf_probe_read_kernel(&dirfd, sizeof(dirfd), &PT_REGS_PARM1(regs));
    if ((int)dirfd != 7583)
        return 0;
    u64 *n = counter.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
