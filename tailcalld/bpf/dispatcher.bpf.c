// tailcalld's dispatcher: attached once to raw_tracepoint/sys_enter, it jumps into the
// handler that sits in the prog-array slot of the syscall number. When the slot is empty
// the tail call falls through and the miss is counted for that slot.
//
// This runs on every syscall of the machine: the miss path is one per-CPU array
// increment (no atomics, no helper call the verifier cannot inline).
//
// Compiled by BCC with -DTAILCALLD_SLOTS=<n> -DTAILCALLD_PROG_ARRAY="<pin>"
// -DTAILCALLD_MISSES="<pin>": both maps are created and pinned by the daemon before this
// is compiled, so BPF_TABLE_PINNED only opens them. -DTAILCALLD_DISPATCH=tcd_<hash> names
// the program after a hash of this code, so a restart can tell an older dispatcher.
#include "tailcalld.h"

BPF_TABLE_PINNED("prog", u32, u32, handlers, TAILCALLD_SLOTS, TAILCALLD_PROG_ARRAY);
BPF_TABLE_PINNED("percpu_array", u32, u64, misses, TAILCALLD_SLOTS, TAILCALLD_MISSES);

int TAILCALLD_DISPATCH(struct bpf_raw_tracepoint_args *ctx)
{
    u32 nr = ctx->args[1];

    handlers.call(ctx, nr);

    // Only reached when slot `nr` is empty (or out of range: then the lookup fails too).
    u64 *count = misses.lookup(&nr);
    if (count)
        *count += 1;
    return 0;
}
