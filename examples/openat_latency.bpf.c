// openat(2) as it returns: the errno of each failed open and how long every open took. Two
// handlers in one file, one per slot: openat_enter in openat's enter slot notes the path and
// the time for the calling thread; openat_exit in its exit slot (sys_exit, where the
// arguments are gone) finds that note by thread id, removes it, and emits the path, the
// errno (0 when the open succeeded) and the latency.
//
//   tailcallctl attach --exit openat examples/openat_latency.bpf.c --function openat_exit
//   tailcallctl attach openat examples/openat_latency.bpf.c --function openat_enter
//   tailcallctl events -f --slot openat --exit       # then, elsewhere: cat /nonexistent
//   12:00:01.123456 openat:exit cat[4242] uid 0: path="/etc/ld.so.cache" ret=3 errno=0 latency_ns=5360
//   ...
//   12:00:01.123789 openat:exit cat[4242] uid 0: path="/nonexistent" ret=-2 errno=2 latency_ns=1429
//
// The two attaches load the file twice (one program each), and both loads share the map
// `openat_calls` because it is pinned by name (LIBBPF_PIN_BY_NAME): tailcalld pins the maps of
// a file under pin_dir/handlers/<its sha256>/, so the same file shares them and another file
// never does. The pin goes when the last slot holding the file is emptied. Attach the exit
// slot first: an enter note with no exit handler to take it stays in the map until that
// thread's next openat replaces it.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

#define PATH_MAX_BYTES 256

// What the enter handler leaves for the exit handler of the same thread.
struct open_call {
    u64 start_ns;
    char path[PATH_MAX_BYTES];
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);  // threads inside openat at once; more are not timed
    __type(key, u32);            // thread id
    __type(value, struct open_call);
    __uint(pinning, LIBBPF_PIN_BY_NAME);  // one map for both handlers of this file
} openat_calls SEC(".maps");

struct openat_result {
    char path[PATH_MAX_BYTES];
    long ret;     // the file descriptor, or -errno
    int errno;    // 0: the open succeeded
    u64 latency_ns;
};

// The event is larger than what is left of the 512-byte BPF stack beside the map value it
// is made from: it is built in a per-CPU scratch value instead.
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct openat_result);
} openat_scratch SEC(".maps");

SEC("raw_tracepoint/sys_enter")
int openat_enter(struct bpf_raw_tracepoint_args *ctx)
{
    u32 tid = TC_TID();
    struct open_call call = {};

    call.start_ns = bpf_ktime_get_ns();
    // openat(int dirfd, const char *pathname, int flags, mode_t mode)
    bpf_probe_read_user_str(call.path, sizeof(call.path), (const char *)TC_ARG(ctx, 1));
    bpf_map_update_elem(&openat_calls, &tid, &call, BPF_ANY);
    return 0;
}

SEC("raw_tracepoint/sys_exit")
int openat_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u32 tid = TC_TID(), zero = 0;
    u64 now = bpf_ktime_get_ns();
    struct open_call *call = bpf_map_lookup_elem(&openat_calls, &tid);
    if (!call)
        return 0;  // entered before openat_enter was attached
    struct openat_result *r = bpf_map_lookup_elem(&openat_scratch, &zero);
    if (r) {
        long ret = TC_RET(ctx);
        r->ret = ret;
        r->errno = ret < 0 ? (int)-ret : 0;
        r->latency_ns = now - call->start_ns;
        __builtin_memcpy(r->path, call->path, sizeof(r->path));
        TC_EMIT(ctx, r);
    }
    bpf_map_delete_elem(&openat_calls, &tid);
    return 0;
}

char _license[] SEC("license") = "GPL";
