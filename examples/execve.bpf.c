// Every program started on the machine: one event per execve(2) (59 on x86_64), with the file
// being executed and the pid of the parent process, read from the kernel's task_struct with
// CO-RE (BPF_CORE_READ): libbpf relocates real_parent and tgid to the running kernel's
// offsets, whatever kernel headers the machine has. (A bcc handler reads these structs at the
// offsets of the installed headers, which may be another kernel's: tailcallctl warns.)
//
//   tailcallctl attach execve examples/execve.bpf.c
//   tailcallctl events -f --slot execve
//   12:00:01.123456 execve bash[4242] uid 1000: filename="/usr/bin/ls" ppid=4100
//
// The event's pid is the process that calls execve (its pid stays through the exec), and
// its comm is still the old program's name: the new one is set once the exec succeeds. A
// program started by name is looked for along $PATH, one execve per folder tried until one
// succeeds: the events show every attempt (this handler cannot tell which one worked; an
// exit-slot handler would, see openat_latency.bpf.c).
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

struct execve_event {
    char filename[256];
    u32 ppid;
};

SEC("raw_tracepoint/sys_enter")
int enter_execve(struct bpf_raw_tracepoint_args *ctx)
{
    struct execve_event e = {};
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();

    // execve(const char *filename, char *const argv[], char *const envp[])
    bpf_probe_read_user_str(e.filename, sizeof(e.filename), (const char *)TC_ARG(ctx, 0));
    // The parent's process id: task->real_parent->tgid, each read relocated by CO-RE.
    e.ppid = BPF_CORE_READ(task, real_parent, tgid);
    TC_EMIT(ctx, &e);
    return 0;
}

char _license[] SEC("license") = "GPL";
