// Handler run time, on demand: the second half of the measurement the dispatcher starts.
//
// The kernel's bpf_stats cannot time handlers (a tail call replaces the running program and
// only the attached dispatcher is timed, with the handler inside), and its switch costs every
// BPF program of the host. fentry/fexit on the dispatcher would time both ends for free when
// detached, but kernels without BPF trampolines exist (this project's CI machines refuse them
// with EPERM). So: while timing is on, the dispatcher stamps the call in flight (its `timing`
// map, per CPU) and this program, attached to raw_tracepoint/sys_enter *after* the dispatcher
// (programs on a tracepoint run in the order they were attached), takes the time when the
// handler has returned. Attached only while someone asks (tailcallctl top); never pinned.
//
// Whether the call was dispatched: the dispatcher counts a miss after a tail call that fell
// through, so an unchanged miss counter means the handler ran. Both programs run on the same
// CPU, one after the other, for the same syscall.
//
// Built by clang as a libbpf object; the daemon reuses the dispatcher's pinned maps (counts,
// timing, declared in dispatcher_maps.h) for these declarations. -DTAILCALLD_SLOTS comes from
// the daemon.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "dispatcher_maps.h"  // the dispatcher's counts and timing switch

struct slot_time {  // per slot, per CPU: what tailcalld reads
    u64 hit_ns;     // dispatcher (after its stamp) + handler, calls the handler ran for
    u64 hits;
    u64 miss_ns;    // the same for calls that fell through: the dispatcher's share alone
    u64 misses;
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, TAILCALLD_SLOTS);
    __type(key, u32);
    __type(value, struct slot_time);
} slot_times SEC(".maps");

SEC("raw_tp/sys_enter")
int tcd_time_end(void *ctx)
{
    u64 end = bpf_ktime_get_ns();
    u32 zero = 0;
    struct timing_run *run = bpf_map_lookup_elem(&timing, &zero);
    if (!run || !run->start)
        return 0;  // not stamped: timing was switched on mid-call, or an ia32-only syscall
    u64 start = run->start;
    u32 slot = run->slot;
    run->start = 0;
    struct slot_counts *count = bpf_map_lookup_elem(&counts, &slot);
    struct slot_time *t = bpf_map_lookup_elem(&slot_times, &slot);
    if (!count || !t)
        return 0;
    if (count->misses == run->misses_before) {
        t->hit_ns += end - start;
        t->hits += 1;
    } else {
        t->miss_ns += end - start;
        t->misses += 1;
    }
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
