// The seed article's handler, in bcc's dialect: runs for every fchmodat(2) on the
// machine (268 on x86_64; `chmod` from coreutils uses it) and prints the path and mode
// to the trace pipe: sudo cat /sys/kernel/tracing/trace_pipe
#include <uapi/linux/ptrace.h>

int enter_fchmodat(struct bpf_raw_tracepoint_args *ctx)
{
    // args[0] is a kernel pointer to the task's saved registers: read it, do not dereference.
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    char pathname[256] = {};
    const char *path = NULL;
    unsigned long mode = 0;

    bpf_probe_read_kernel(&path, sizeof(path), &PT_REGS_PARM2(regs));
    bpf_probe_read_kernel(&mode, sizeof(mode), &PT_REGS_PARM3(regs));
    bpf_probe_read_user_str(pathname, sizeof(pathname), path);
    bpf_trace_printk("fchmodat %s mode 0x%lx\n", pathname, mode);
    return 0;
}
