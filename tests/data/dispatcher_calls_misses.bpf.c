// The release before the counts map (separate calls and misses maps), kept as it was for the
// upgrade tests.
//
// tailcalld's dispatcher: attached once to raw_tracepoint/sys_enter, it jumps into the
// handler that sits in the prog-array slot of the syscall number. When the slot is empty
// the tail call falls through and the miss is counted for that slot.
//
// This runs on every syscall of the machine: a call is one per-CPU array increment (calls),
// a miss one more (misses); no atomics, no helper call the verifier cannot inline. A
// slot's handler ran calls - misses times.
//
// Compiled by BCC with -DTAILCALLD_SLOTS=<n> -DTAILCALLD_PROG_ARRAY="<pin>"
// -DTAILCALLD_MISSES="<pin>": both maps are created and pinned by the daemon before this
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
BPF_TABLE_PINNED("percpu_array", u32, u64, misses, TAILCALLD_SLOTS, TAILCALLD_MISSES);
BPF_TABLE_PINNED("percpu_array", u32, u64, calls, TAILCALLD_SLOTS, TAILCALLD_CALLS);

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

int TAILCALLD_DISPATCH(struct bpf_raw_tracepoint_args *ctx)
{
    u32 nr = ctx->args[1];

#ifdef TAILCALLD_COMPAT_NR
    if (in_ia32_syscall()) {
        u32 *slot = compat_slots.lookup(&nr);
        if (!slot || *slot == 0) {
            u64 *compat_count = compat_misses.lookup(&nr);
            if (compat_count)
                *compat_count += 1;
            return 0;
        }
        nr = *slot - 1;
    }
#endif

    // Counted before the jump: a tail call that lands never comes back.
    u64 *called = calls.lookup(&nr);
    if (called)
        *called += 1;

    handlers.call(ctx, nr);

    // Only reached when slot `nr` is empty (or out of range: then the lookup fails too).
    u64 *count = misses.lookup(&nr);
    if (count)
        *count += 1;
    return 0;
}
