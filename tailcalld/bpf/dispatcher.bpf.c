// tailcalld's dispatcher: attached once to raw_tracepoint/sys_enter, it jumps into the
// handler that sits in the prog-array slot of the syscall number. When the slot is empty
// the tail call falls through and the miss is counted for that slot. Built with
// -DTAILCALLD_EXIT it is the exit dispatcher: on raw_tracepoint/sys_exit, with prog array and
// counters of its own, attached only while some exit slot is filled.
//
// This runs on every syscall of the machine: one per-CPU array lookup, whose entry holds
// both counters of the slot (calls, and misses on the fall-through path, which reuses the
// pointer: two separate maps cost the miss path a second lookup, ~2 ns here); no atomics,
// no helper call the verifier cannot inline. A slot's handler ran calls - misses times.
//
// libbpf C, compiled by clang (CO-RE, against the running kernel's vmlinux.h) with
// -DTAILCALLD_SLOTS=<n> -DTAILCALLD_DISPATCH=tcd_<hash> (tcx_ on exit): the program is named
// after a hash of this code, so a restart can tell an older dispatcher. The maps declared here are never
// created from the object: the daemon creates and pins them first, opens the pins and hands
// libbpf those fds (bpf_map__reuse_fd), so nothing opens a map by id (that needs
// CAP_SYS_ADMIN). Their types and sizes are tailcalld/dispatcher.py's _MapSpecs.
//
// On x86_64 (-DTAILCALLD_COMPAT_NR=<n>): sys_enter hands over the *ia32* number of a
// 32-bit caller (i386 268 is statfs64, x86_64 268 is fchmodat), so such a call is first
// translated to the 64-bit slot of the syscall of the same name (compat_slots, filled by
// the daemon from the kernel's syscall tables). An ia32 syscall with no 64-bit namesake is
// never dispatched; it is counted in compat_misses under its ia32 number.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, TAILCALLD_SLOTS);
    __uint(key_size, sizeof(u32));
    __uint(value_size, sizeof(u32));  // a prog array has no BTF value type: sizes only
} prog_array SEC(".maps");

// The slots as an atomic change stages them (tailcalld/dispatcher.py: "Atomic changes"):
// while `staging` holds 1, every call is dispatched through staged_array instead, which then
// holds every slot as the change leaves them; prog_array is brought to the same state behind
// it, and `staging` set back to 0.  Each call reads `staging` once, so it runs one side whole:
// many slots switch at the one instant `staging` is set.
struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, TAILCALLD_SLOTS);
    __uint(key_size, sizeof(u32));
    __uint(value_size, sizeof(u32));
} staged_array SEC(".maps");

// One u32, shared by both dispatchers (pinned as pin_dir/staging): 1 while a change is staged.
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u32);
} staging SEC(".maps");

#include "dispatcher_maps.h"  // counts, and (enter only) the timing switch

// What the dispatcher leaves for the handler it jumps into, read by tailcalld.h's macros
// (TC_ARG, TC_NR, the event stamps): one per CPU, shared by both dispatchers (pinned as
// pin_dir/call). tailcalld.h declares the same struct (tests/test_static.py compares them).
struct tc_call {
    unsigned int slot;    // slot key, as in tc_event_header
    unsigned int nr;      // the syscall number the caller used (ia32 numbering for a 32-bit caller)
    unsigned int flags;   // 1: 32-bit caller, 2: exit slot
    unsigned int _unused;
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct tc_call);
} call SEC(".maps");

// Timing off is one per-CPU lookup of a constant key and a branch (see the stamp below): the
// price of having no BPF trampoline to lean on (fentry/fexit on this program would cost
// nothing when off, but kernels without them exist).

#ifdef TAILCALLD_COMPAT_NR
// Values are slot + 1: an entry left at zero means "no 64-bit namesake".
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, TAILCALLD_COMPAT_NR);
    __type(key, u32);
    __type(value, u32);
} compat_slots SEC(".maps");

#ifndef TAILCALLD_EXIT  // counted once per call: on entry
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, TAILCALLD_COMPAT_NR);
    __type(key, u32);
    __type(value, u64);
} compat_misses SEC(".maps");
#endif

// The kernel's own in_ia32_syscall(): current_thread_info()->status & TS_COMPAT. That is
// true for every ia32 entry (int 0x80 from 64-bit code included), which the user code
// segment in pt_regs would miss. vmlinux.h marks every struct preserve_access_index, so
// libbpf relocates the field's offset to the running kernel's (CO-RE), whatever kernel the
// header was made from.
// Cost: through the BTF-typed task pointer this is one direct load the verifier checks
// against the kernel's BTF; bpf_probe_read_kernel() (BPF_CORE_READ) cost 13 ns more per syscall.
static __always_inline u32 in_ia32_syscall(void)
{
    struct task_struct *task = bpf_get_current_task_btf();
    return task->thread_info.status & TAILCALLD_TS_COMPAT;
}
#endif

// The syscall number: sys_enter passes it as args[1]; sys_exit passes the return value there,
// so the exit dispatcher reads it from the task's saved registers, as the kernel's own
// syscall_get_nr() does (one probe read, at the offset CO-RE gives: the exit path's only
// extra cost).
static __always_inline u32 syscall_nr(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef TAILCALLD_EXIT
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr = -1;
#if defined(__TARGET_ARCH_arm64)
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->syscallno);
#else
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
#endif
    return nr;
#else
    return ctx->args[1];
#endif
}

#ifdef TAILCALLD_EXIT
SEC("raw_tp/sys_exit")
#else
SEC("raw_tp/sys_enter")
#endif
int TAILCALLD_DISPATCH(struct bpf_raw_tracepoint_args *ctx)
{
    u32 nr = syscall_nr(ctx);
    u32 flags = 0;
    u32 caller_nr = nr;

#ifdef TAILCALLD_COMPAT_NR
    if (in_ia32_syscall()) {
        flags = 1;  // TC_CALL_COMPAT
        u32 *slot = bpf_map_lookup_elem(&compat_slots, &nr);
        if (!slot || *slot == 0) {
#ifndef TAILCALLD_EXIT
            u64 *compat_count = bpf_map_lookup_elem(&compat_misses, &nr);
            if (compat_count)
                *compat_count += 1;
#endif
            return 0;
        }
        nr = *slot - 1;
    }
#endif

    struct slot_counts *count = bpf_map_lookup_elem(&counts, &nr);
    if (!count)
        return 0;  // out of range: no slot could hold it either
    // Counted before the jump: a tail call that lands never comes back.
    count->calls += 1;

#ifndef TAILCALLD_EXIT
    u32 zero = 0;
    struct timing_run *run = bpf_map_lookup_elem(&timing, &zero);
    if (run && run->on) {
        run->slot = nr;
        run->misses_before = count->misses;
        run->start = bpf_ktime_get_ns();
    }
#endif

    // For the handler (tailcalld.h): which slot it runs in, for whom. Written on every call,
    // the misses included: whether the slot is filled is only known by trying the jump.
    u32 zero_key = 0;
    struct tc_call *here = bpf_map_lookup_elem(&call, &zero_key);
    if (here) {
#ifdef TAILCALLD_EXIT
        here->slot = TAILCALLD_SLOTS + nr;
        flags |= 2;  // TC_CALL_EXIT
#else
        here->slot = nr;
#endif
        here->nr = caller_nr;
        here->flags = flags;
    }

    // One array lookup the verifier inlines, and a branch: the price of atomic changes.
    u32 *staged = bpf_map_lookup_elem(&staging, &zero_key);
    if (staged && *staged)
        bpf_tail_call(ctx, &staged_array, nr);
    else
        bpf_tail_call(ctx, &prog_array, nr);

    // Only reached when slot `nr` is empty.
    count->misses += 1;
    return 0;
}

char _license[] SEC("license") = "GPL";  // bpf_get_current_task_btf() is GPL-only
