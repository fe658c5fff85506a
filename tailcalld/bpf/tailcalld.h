// What bcc handlers may include; the dispatcher (libbpf C) does not.
#ifndef TAILCALLD_H
#define TAILCALLD_H

#include <uapi/linux/ptrace.h>

// A handler is a raw_tracepoint program with this signature, tail-called from sys_enter:
//   int my_handler(struct bpf_raw_tracepoint_args *ctx)
// ctx->args[0] is the task's struct pt_regs *, ctx->args[1] the syscall number; in an exit
// slot (tail-called from sys_exit) ctx->args[1] is the syscall's return value.

#endif
