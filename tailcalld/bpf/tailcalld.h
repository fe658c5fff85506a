// tailcalld.h: what a handler may use, in bcc C and libbpf C alike (README, "Writing a handler").
// On the include path of every handler tailcalld compiles. In libbpf C include it after
// "vmlinux.h" and <bpf/bpf_helpers.h>; in bcc C it stands alone.
//
// A handler is a raw_tracepoint program, tail-called by tailcalld's dispatcher:
//   int my_handler(struct bpf_raw_tracepoint_args *ctx)
// ctx->args[0] is the task's struct pt_regs *; on sys_enter ctx->args[1] is the syscall number,
// in an exit slot (sys_exit) the return value. Read them with the macros below, which know
// the registers of each ABI (a 32-bit caller passes its arguments in others):
//
//   TC_ARG(ctx, n)    argument n (0..5) of the syscall, as unsigned long
//   TC_RET(ctx)       the return value (exit slots only), as long
//   TC_NR(ctx)        the slot's syscall number (64-bit numbering, also for 32-bit callers)
//   TC_COMPAT(ctx)    1 when the caller is a 32-bit (ia32 / AArch32) program
//   TC_PID() TC_TID() TC_UID() TC_GID() TC_CGROUP_ID()   of the calling task
//   TC_COMM(buf)      its command name into char buf[16]
//
// Several handlers in one slot (attach --priority N) run one after the other, lowest priority
// first; a handler's return value says whether the next one runs:
//
//   return TC_CONTINUE;   (0) the next handler of the slot runs
//   return TC_STOP;       (1, or any value but 0) the slot's later handlers do not run for this call
//
// A slot's only handler may return either. A handler that does not include this file (a
// libbpf object from elsewhere) runs in a chain as it is: returning 0 lets the chain go on.
//
// Events, read with `tailcallctl events` (and written to the journal for slots attached with
// --journal): one ring buffer shared by all handlers, pinned as pin_dir/events. tailcalld
// stamps every event with the slot, the time, pid, tid, uid and comm.
//
//   TC_PRINTF(ctx, "fmt", args...)  a line formatted in the kernel (bpf_snprintf: %d %u %x
//                                   %ld %lu %lx %lld %llu %llx %s %c %p %pI4 ...; up to 12 args)
//   TC_EMIT(ctx, &value)            a struct, sent as is; tailcalld decodes its fields from the
//                                   handler's BTF (libbpf C; bcc keeps no BTF of it: hex bytes)
//
// Both return 0, or -1 when the ring buffer is full: the event is then counted as lost for
// the slot (never silently dropped). The macros need the handler compiled by tailcalld (attach
// or check), which hands them the channel's maps.
#ifndef TAILCALLD_H
#define TAILCALLD_H

#if defined(BPF_TABLE)
#define __TC_BCC 1
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#elif !defined(SEC)
#error "tailcalld.h: in libbpf C, include \"vmlinux.h\" and <bpf/bpf_helpers.h> first"
#endif

#ifndef TC_PRINTF_MAX
#define TC_PRINTF_MAX 256  // bytes of one TC_PRINTF line, its NUL included; longer lines are cut
#endif

// Every event starts with this header (little-endian, as the CPU); the daemon parses it
// (tailcalld/events.py EVENT_HEADER), so the two change together.
struct tc_event_header {
    unsigned long long time_ns;  // bpf_ktime_get_ns(): CLOCK_MONOTONIC
    unsigned int slot;           // the slot key: the syscall number, + 1024 for an exit slot
    unsigned int tag;            // which compile of which handler sent it (its BTF, for TC_EMIT)
    unsigned int pid;            // the process (tgid)
    unsigned int tid;
    unsigned int uid;
    unsigned short kind;         // 1: TC_PRINTF text, 2: TC_EMIT struct
    unsigned short flags;        // 1: a 32-bit caller
    unsigned int type_id;        // TC_EMIT: the struct's BTF type id in the handler's BTF
    unsigned int size;           // bytes that follow
    char comm[16];
};

// What the dispatcher leaves for the handler it jumps into (one per CPU; tailcalld's
// dispatcher_maps.h declares the same).
struct tc_call {
    unsigned int slot;    // slot key, as in tc_event_header
    unsigned int nr;      // the syscall number the caller used (ia32 numbering for a 32-bit caller)
    unsigned int flags;   // 1: 32-bit caller, 2: exit slot
    unsigned int _unused;
};

struct tc_event_counts {
    unsigned long long emitted;  // TC_PRINTF / TC_EMIT calls
    unsigned long long lost;     // of them, found the ring buffer full
};

#define TC_CONTINUE 0
#define TC_STOP 1
#define TC_CALL_COMPAT 1
#define TC_CALL_EXIT 2
#define TC_KIND_TEXT 1
#define TC_KIND_STRUCT 2

// The maps reach a handler as fds tailcalld passes at compile time (-DTC_EVENTS_FD=...): a
// handler never declares them, so no dialect's loader has to be taught to share them.
#ifdef __TC_BCC
u64 __tc_pseudo(u64, u64) asm("llvm.bpf.pseudo");
#else
unsigned long long __tc_pseudo(unsigned long long, unsigned long long) asm("llvm.bpf.pseudo");
#endif
#define __TC_MAP(fd) ((void *)__tc_pseudo(1, fd))  // BPF_PSEUDO_MAP_FD

static __always_inline struct tc_call *__tc_call(void)
{
#ifdef TC_CALL_FD
    unsigned int zero = 0;
    return (struct tc_call *)bpf_map_lookup_elem(__TC_MAP(TC_CALL_FD), &zero);
#else
    return 0;
#endif
}

static __always_inline unsigned int TC_COMPAT(void *ctx)
{
    struct tc_call *call = __tc_call();
    return call ? (call->flags & TC_CALL_COMPAT) : 0;
}

static __always_inline unsigned int TC_NR(struct bpf_raw_tracepoint_args *ctx)
{
    struct tc_call *call = __tc_call();
    if (!call)
        return (unsigned int)ctx->args[1];
    return call->slot >= 1024 ? call->slot - 1024 : call->slot;
}

#define TC_RET(ctx) ((long)((struct bpf_raw_tracepoint_args *)(ctx))->args[1])
#define TC_PID() ((unsigned int)(bpf_get_current_pid_tgid() >> 32))
#define TC_TID() ((unsigned int)bpf_get_current_pid_tgid())
#define TC_UID() ((unsigned int)bpf_get_current_uid_gid())
#define TC_GID() ((unsigned int)(bpf_get_current_uid_gid() >> 32))
#define TC_CGROUP_ID() bpf_get_current_cgroup_id()
#define TC_COMM(buf) bpf_get_current_comm((buf), 16)

// Where each ABI keeps syscall argument n in struct pt_regs (the kernel's own
// syscall_get_arguments()). The README's table is generated from these lines
// (python -m tailcalld.handler_abi).
//   abi       0        1        2        3        4        5
//   x86_64    di       si       dx       r10      r8       r9
//   ia32      bx       cx       dx       si       di       bp
//   arm64     orig_x0  regs[1]  regs[2]  regs[3]  regs[4]  regs[5]
#if defined(__TARGET_ARCH_arm64) || defined(__aarch64__)
#define __TC_NATIVE(n) ((n) == 0 ? __builtin_offsetof(struct pt_regs, orig_x0) \
                                 : __builtin_offsetof(struct pt_regs, regs) + (n) * 8)
#define __TC_IA32(n) __TC_NATIVE(n)  // AArch32 callers use the same registers, 32 bits wide
#else
#define __TC_NATIVE(n) ((n) == 0 ? __builtin_offsetof(struct pt_regs, di) \
                      : (n) == 1 ? __builtin_offsetof(struct pt_regs, si) \
                      : (n) == 2 ? __builtin_offsetof(struct pt_regs, dx) \
                      : (n) == 3 ? __builtin_offsetof(struct pt_regs, r10) \
                      : (n) == 4 ? __builtin_offsetof(struct pt_regs, r8) \
                      : __builtin_offsetof(struct pt_regs, r9))
#define __TC_IA32(n) ((n) == 0 ? __builtin_offsetof(struct pt_regs, bx) \
                    : (n) == 1 ? __builtin_offsetof(struct pt_regs, cx) \
                    : (n) == 2 ? __builtin_offsetof(struct pt_regs, dx) \
                    : (n) == 3 ? __builtin_offsetof(struct pt_regs, si) \
                    : (n) == 4 ? __builtin_offsetof(struct pt_regs, di) \
                    : __builtin_offsetof(struct pt_regs, bp))
#endif

static __always_inline unsigned long __tc_arg(struct bpf_raw_tracepoint_args *ctx, unsigned long native,
                                              unsigned long ia32)
{
    unsigned long value = 0;
    int compat = TC_COMPAT(ctx);
    bpf_probe_read_kernel(&value, sizeof(value), (void *)(ctx->args[0] + (compat ? ia32 : native)));
    return compat ? (unsigned int)value : value;  // a 32-bit caller's argument is 32 bits wide
}

#define TC_ARG(ctx, n) ({ \
    _Static_assert((n) >= 0 && (n) <= 5, "TC_ARG: a syscall has arguments 0 to 5"); \
    __tc_arg((struct bpf_raw_tracepoint_args *)(ctx), __TC_NATIVE(n), __TC_IA32(n)); })

#if defined(TC_EVENTS_FD) && defined(TC_CALL_FD) && defined(TC_COUNTS_FD)
#ifndef TC_TAG
#define TC_TAG 0
#endif

// Reserve a record of `size` bytes after the header, stamped; 0 (and the loss counted) when
// the ring buffer is full.
static __always_inline void *__tc_reserve(unsigned int size_total, unsigned short kind, unsigned int type_id,
                                          unsigned int size)
{
    struct tc_call *call = __tc_call();
    unsigned int slot = call ? call->slot : 0xffffffff;
    struct tc_event_counts *counts = bpf_map_lookup_elem(__TC_MAP(TC_COUNTS_FD), &slot);
    if (counts)
        counts->emitted += 1;
    struct tc_event_header *h = bpf_ringbuf_reserve(__TC_MAP(TC_EVENTS_FD), size_total, 0);
    if (!h) {
        if (counts)
            counts->lost += 1;
        return 0;
    }
    unsigned long long id = bpf_get_current_pid_tgid();
    h->time_ns = bpf_ktime_get_ns();
    h->slot = slot;
    h->tag = TC_TAG;
    h->pid = id >> 32;
    h->tid = (unsigned int)id;
    h->uid = (unsigned int)bpf_get_current_uid_gid();
    h->kind = kind;
    h->flags = call ? (call->flags & TC_CALL_COMPAT) : 0;
    h->type_id = type_id;
    h->size = size;
    bpf_get_current_comm(h->comm, sizeof(h->comm));
    return h;
}

static __always_inline int __tc_printf(const char *fmt, unsigned long long *args, unsigned int args_size)
{
    struct tc_event_header *h = __tc_reserve(sizeof(struct tc_event_header) + TC_PRINTF_MAX, TC_KIND_TEXT, 0, 0);
    if (!h)
        return -1;
    char *text = (char *)(h + 1);
    long n = bpf_snprintf(text, TC_PRINTF_MAX, fmt, args, args_size);
    h->size = n < 0 ? 0 : (n > TC_PRINTF_MAX ? TC_PRINTF_MAX : n);  // the NUL included
    bpf_ringbuf_submit(h, 0);
    return 0;
}

// The arguments of TC_PRINTF, as the u64 array bpf_snprintf takes.
#define __TC_NARG(...) __TC_NARG_(_, ##__VA_ARGS__, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define __TC_NARG_(_, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, N, ...) N
#define __TC_CAT(a, b) __TC_CAT_(a, b)
#define __TC_CAT_(a, b) a##b
#define __TC_FILL(arr, ...) __TC_CAT(__TC_FILL, __TC_NARG(__VA_ARGS__))(arr, 0, ##__VA_ARGS__)
#define __TC_FILL0(arr, p)
#define __TC_FILL1(arr, p, x) arr[p] = (unsigned long long)(x);
#define __TC_FILL2(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL1(arr, p + 1, __VA_ARGS__)
#define __TC_FILL3(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL2(arr, p + 1, __VA_ARGS__)
#define __TC_FILL4(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL3(arr, p + 1, __VA_ARGS__)
#define __TC_FILL5(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL4(arr, p + 1, __VA_ARGS__)
#define __TC_FILL6(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL5(arr, p + 1, __VA_ARGS__)
#define __TC_FILL7(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL6(arr, p + 1, __VA_ARGS__)
#define __TC_FILL8(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL7(arr, p + 1, __VA_ARGS__)
#define __TC_FILL9(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL8(arr, p + 1, __VA_ARGS__)
#define __TC_FILL10(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL9(arr, p + 1, __VA_ARGS__)
#define __TC_FILL11(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL10(arr, p + 1, __VA_ARGS__)
#define __TC_FILL12(arr, p, x, ...) arr[p] = (unsigned long long)(x); __TC_FILL11(arr, p + 1, __VA_ARGS__)

#define __TC_PRINTF_WITH(fmt_ptr, ...) ({ \
    unsigned long long __tc_args[__TC_NARG(__VA_ARGS__) + 1] = {}; \
    __TC_FILL(__tc_args, ##__VA_ARGS__) \
    __tc_printf((fmt_ptr), __tc_args, __TC_NARG(__VA_ARGS__) * 8); })

#ifdef __TC_BCC
// bcc has no read-only data for the format to live in (bpf_snprintf wants it in a frozen
// map): tailcalld's compile worker numbers each TC_PRINTF of the source, puts its format in
// the frozen map TC_FMT_FD, and calls this instead, on the same line.
#ifdef TC_FMT_FD
#define __TC_FMT_SLOT 256  // bytes per format in that map (compile_worker.py FORMAT_SLOT)
#define __TC_PRINTF_AT(k, ctx, fmt, ...) \
    __TC_PRINTF_WITH((const char *)__tc_pseudo(2, TC_FMT_FD) + (k) * __TC_FMT_SLOT, ##__VA_ARGS__)
#endif
#define TC_PRINTF(ctx, fmt, ...) \
    _Static_assert(0, "TC_PRINTF: write the format as a string literal in the call, in the handler's own file")
#else
#define TC_PRINTF(ctx, fmt, ...) ({ \
    static const char __tc_fmt[] = fmt; \
    __TC_PRINTF_WITH(__tc_fmt, ##__VA_ARGS__); })
#endif

#ifdef __TC_BCC
#define __TC_TYPE_ID(value) 0
#else
#define __TC_TYPE_ID(value) __builtin_btf_type_id(value, 0)  // local: the handler's own BTF
#endif

#define TC_EMIT(ctx, ptr) ({ \
    int __tc_ret = -1; \
    struct tc_event_header *__tc_h = __tc_reserve(sizeof(struct tc_event_header) + sizeof(*(ptr)), \
                                                  TC_KIND_STRUCT, __TC_TYPE_ID(*(ptr)), sizeof(*(ptr))); \
    if (__tc_h) { \
        __builtin_memcpy(__tc_h + 1, (ptr), sizeof(*(ptr))); \
        bpf_ringbuf_submit(__tc_h, 0); \
        __tc_ret = 0; \
    } \
    __tc_ret; })

#else  // compiled without tailcalld's event channel
#define TC_PRINTF(ctx, fmt, ...) \
    _Static_assert(0, "TC_PRINTF needs tailcalld's event channel: compile the handler with tailcalld (attach or check)")
#define TC_EMIT(ctx, ptr) \
    _Static_assert(0, "TC_EMIT needs tailcalld's event channel: compile the handler with tailcalld (attach or check)")
#endif

#endif
