// Version 2 of the fchmodat handler, to show a hot swap: same job, and it also counts
// calls per process in a map (bpftool map dump name fchmodat_calls).
#include <uapi/linux/ptrace.h>

BPF_HASH(fchmodat_calls, u32, u64, 10240);

int enter_fchmodat_v2(struct bpf_raw_tracepoint_args *ctx)
{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    char pathname[256] = {};
    const char *path = NULL;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;

    fchmodat_calls.increment(tgid);
    bpf_probe_read_kernel(&path, sizeof(path), &PT_REGS_PARM2(regs));
    bpf_probe_read_user_str(pathname, sizeof(pathname), path);
    bpf_trace_printk("v2: pid %d fchmodat %s\n", tgid, pathname);
    return 0;
}
