// The dispatcher's per-slot counters and its timing switch, as both programs that use them
// see them: the dispatcher (dispatcher.bpf.c) and the handler timer (timing.bpf.c). One
// declaration, so the two cannot drift apart; the daemon creates and pins the maps
// (tailcalld/dispatcher.py's _MapSpecs: COUNTS, TIMING) and hands both programs their fds.
// Include after vmlinux.h and <bpf/bpf_helpers.h>; TAILCALLD_SLOTS comes from the daemon.
#ifndef TAILCALLD_DISPATCHER_MAPS_H
#define TAILCALLD_DISPATCHER_MAPS_H

struct slot_counts {
    u64 calls;   // every call of the slot's syscall, dispatched or not
    u64 misses;  // calls that fell through because the slot was empty
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, TAILCALLD_SLOTS);
    __type(key, u32);
    __type(value, struct slot_counts);
} counts SEC(".maps");

#ifndef TAILCALLD_EXIT  // the exit dispatcher is not timed
// Handler timing, on demand (tailcalld/timing.py): while `on` is set (on every CPU, by the
// daemon), the dispatcher stamps the call in flight and the timer, attached after it, takes
// the time once the handler has returned.
struct timing_run {
    u64 on;
    u64 start;          // bpf_ktime_get_ns() before the tail call; 0: nothing in flight
    u64 misses_before;  // the slot's miss count then: unchanged afterwards means it was dispatched
    u64 slot;
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct timing_run);
} timing SEC(".maps");
#endif

#endif
