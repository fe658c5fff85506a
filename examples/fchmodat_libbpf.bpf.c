// The tail-call article's program as it stands (libbpf C, CO-RE): its own handler, its
// own prog array initialised with [268] = &enter_fchmodat, and its own sys_enter dispatcher.
// tailcalld loads only the program you name and puts it in a slot of its dispatcher:
//
//   tailcallctl attach 268 examples/fchmodat_libbpf.bpf.c --function enter_fchmodat
//
// The file's own dispatcher (raw_tracepoint__sys_enter) is never loaded or attached.
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

SEC("raw_tracepoint/sys_enter")
int enter_fchmodat(struct bpf_raw_tracepoint_args *ctx)
{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    char pathname[256];
    u32 mode;

    char *p = (char *)PT_REGS_PARM2_CORE(regs);
    bpf_core_read_user_str(&pathname, sizeof(pathname), p);
    mode = (u32)PT_REGS_PARM3_CORE(regs);

    char fmt[] = "fchmodat @dirname=%s @mode=%d\n";
    bpf_trace_printk(fmt, sizeof(fmt), &pathname, mode);
    return 0;
}

struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(key_size, sizeof(u32));
    __uint(value_size, sizeof(u32));
    __uint(max_entries, 1024);
    __array(values, int (void *));
} tail_jmp_map SEC(".maps") = {
    .values = {
        [268] = (void *)&enter_fchmodat,
    },
};

SEC("raw_tracepoint/sys_enter")
int raw_tracepoint__sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    u32 syscall_id = ctx->args[1];

    bpf_tail_call(ctx, &tail_jmp_map, syscall_id);

    // Reached only when tail_jmp_map has no program for this syscall.
    char fmt[] = "no bpf program for syscall %d\n";
    bpf_trace_printk(fmt, sizeof(fmt), syscall_id);
    return 0;
}

char _license[] SEC("license") = "GPL";
