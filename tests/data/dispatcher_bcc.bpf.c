// The release before the libbpf dispatcher, kept as it was for the upgrade tests: compiled by
// bcc, it opens its pinned maps by path (BPF_TABLE_PINNED), and that release pinned no program
// beside the link.
//
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
// Compiled by BCC with -DTAILCALLD_SLOTS=<n> -DTAILCALLD_PROG_ARRAY="<pin>"
// -DTAILCALLD_COUNTS="<pin>": the maps are created and pinned by the daemon before this
// is compiled, so BPF_TABLE_PINNED only opens them. -DTAILCALLD_DISPATCH=tcd_<hash> names
// the program after a hash of this code, so a restart can tell an older dispatcher.
//
// On x86_64 (-DTAILCALLD_COMPAT_NR=<n>): sys_enter hands over the *ia32* number of a
// 32-bit caller (i386 268 is statfs64, x86_64 268 is fchmodat), so such a call is first
// translated to the 64-bit slot of the syscall of the same name (compat_slots, filled by
// the daemon from the kernel's syscall tables). An ia32 syscall with no 64-bit namesake is
// never dispatched; it is counted in compat_misses under its ia32 number.
#include "tailcalld.h"

BPF_TABLE_PINNED("prog", u32, u32, handlers, TAILCALLD_SLOTS, TAILCALLD_PROG_ARRAY);
struct slot_counts {
    u64 calls;   // every call of the slot's syscall, dispatched or not
    u64 misses;  // calls that fell through because the slot was empty
};
BPF_TABLE_PINNED("percpu_array", u32, struct slot_counts, counts, TAILCALLD_SLOTS, TAILCALLD_COUNTS);

// Handler timing, on demand (tailcalld/timing.py): while `on` is set (on every CPU, by the
// daemon), the call in flight is stamped here and a second program attached after this one
// (bpf/timing.bpf.c) takes the time once the handler has returned. Off, this is one per-CPU
// lookup of a constant key and a branch: the price of having no BPF trampoline to lean on
// (fentry/fexit on this program would cost nothing when off, but kernels without them exist).
#ifdef TAILCALLD_TIMING
struct timing_run {
    u64 on;
    u64 start;          // bpf_ktime_get_ns() before the tail call; 0: nothing in flight
    u64 misses_before;  // the slot's miss count then: unchanged afterwards means it was dispatched
    u64 slot;
};
BPF_TABLE_PINNED("percpu_array", u32, struct timing_run, timing, 1, TAILCALLD_TIMING);
#endif

#ifdef TAILCALLD_COMPAT_NR
// Values are slot + 1: an entry left at zero means "no 64-bit namesake".
BPF_TABLE_PINNED("array", u32, u32, compat_slots, TAILCALLD_COMPAT_NR, TAILCALLD_COMPAT_SLOTS);
BPF_TABLE_PINNED("percpu_array", u32, u64, compat_misses, TAILCALLD_COMPAT_NR, TAILCALLD_COMPAT_MISSES);

// The kernel's own in_ia32_syscall(): current_thread_info()->status & TS_COMPAT. That is
// true for every ia32 entry (int 0x80 from 64-bit code included), which the user code
// segment in pt_regs would miss. The offset comes from the running kernel's BTF
// (-DTAILCALLD_TI_STATUS), not from kernel headers that may be another version's.
// Cost: through the BTF-typed task pointer this is one direct load the verifier checks
// against the kernel's BTF; bpf_probe_read_kernel() here cost 13 ns more per syscall.
static __always_inline u32 in_ia32_syscall(void)
{
    void *task = (void *)bpf_get_current_task_btf();
    return *(volatile u32 *)(task + TAILCALLD_TI_STATUS) & TAILCALLD_TS_COMPAT;
}
#endif

// The syscall number: sys_enter passes it as args[1]; sys_exit passes the return value there,
// so the exit dispatcher (-DTAILCALLD_EXIT) reads it from the task's saved registers, as the
// kernel's own syscall_get_nr() does (one probe read: the exit path's only extra cost).
static __always_inline u32 syscall_nr(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef TAILCALLD_EXIT
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr = -1;
#if defined(__TARGET_ARCH_arm64) || defined(__aarch64__)
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->syscallno);
#else
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
#endif
    return nr;
#else
    return ctx->args[1];
#endif
}

int TAILCALLD_DISPATCH(struct bpf_raw_tracepoint_args *ctx)
{
    u32 nr = syscall_nr(ctx);

#ifdef TAILCALLD_COMPAT_NR
    if (in_ia32_syscall()) {
        u32 *slot = compat_slots.lookup(&nr);
        if (!slot || *slot == 0) {
#ifndef TAILCALLD_EXIT  // counted once per call: on entry
            u64 *compat_count = compat_misses.lookup(&nr);
            if (compat_count)
                *compat_count += 1;
#endif
            return 0;
        }
        nr = *slot - 1;
    }
#endif

    struct slot_counts *count = counts.lookup(&nr);
    if (!count)
        return 0;  // out of range: no slot could hold it either
    // Counted before the jump: a tail call that lands never comes back.
    count->calls += 1;

#ifdef TAILCALLD_TIMING
    u32 zero = 0;
    struct timing_run *run = timing.lookup(&zero);
    if (run && run->on) {
        run->slot = nr;
        run->misses_before = count->misses;
        run->start = bpf_ktime_get_ns();
    }
#endif

    handlers.call(ctx, nr);

    // Only reached when slot `nr` is empty.
    count->misses += 1;
    return 0;
}
