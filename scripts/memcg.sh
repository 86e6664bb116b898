# Memory cgroup for the beyond-RAM benchmarks, cgroup v1 or v2 (detected); sourced by
# scripts/batch_clients.sh and bench/batch_16core.sh. Needs root.
#
#   memcg_init 2200M      # the cgroup flashmoe_bench ($MEMCG_NAME), limited to 2200M (page cache included)
#   memcg_run CMD ARGS... # becomes CMD (exec) inside it
#   memcg_peak            # its peak memory in bytes since memcg_init ("n/a" where unknown)
#
# v1: the memory controller's own hierarchy (/sys/fs/cgroup/memory). v2: the unified hierarchy
# (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host) with `memory` among its
# controllers. $CGROUP_FS replaces /sys/fs/cgroup (tests).

memcg_die() {
    echo "memcg: $*" >&2
    return 1
}

memcg_init() {
    local fs=${CGROUP_FS:-/sys/fs/cgroup} bytes
    bytes=$(numfmt --from=iec "$1") || { memcg_die "bad memory limit '$1' (e.g. 2200M)"; return 1; }
    if [ -d "$fs/memory" ] && [ -w "$fs/memory" ]; then
        MEMCG_V=1
        MEMCG=$fs/memory/${MEMCG_NAME:-flashmoe_bench}
        mkdir -p "$MEMCG" || { memcg_die "cannot create $MEMCG"; return 1; }
        echo "$bytes" > "$MEMCG/memory.limit_in_bytes" || { memcg_die "cannot write $MEMCG/memory.limit_in_bytes"; return 1; }
        echo 0 > "$MEMCG/memory.max_usage_in_bytes" 2>/dev/null || true
        return 0
    fi
    local root=$fs
    [ -f "$root/cgroup.controllers" ] || root=$fs/unified
    if [ ! -f "$root/cgroup.controllers" ]; then
        memcg_die "no cgroup v1 memory controller ($fs/memory) and no cgroup v2 hierarchy ($fs/cgroup.controllers, $fs/unified/cgroup.controllers)"
        return 1
    fi
    if ! grep -qw memory "$root/cgroup.controllers"; then
        memcg_die "the cgroup v2 hierarchy at $root has no memory controller ($root/cgroup.controllers: $(cat "$root/cgroup.controllers"))"
        return 1
    fi
    MEMCG_V=2
    MEMCG=$root/${MEMCG_NAME:-flashmoe_bench}
    # a fresh cgroup each time: memory.peak cannot be reset on older kernels
    if [ -d "$MEMCG" ]; then rmdir "$MEMCG" 2>/dev/null || true; fi
    mkdir -p "$MEMCG" || { memcg_die "cannot create $MEMCG"; return 1; }
    grep -qw memory "$root/cgroup.subtree_control" 2>/dev/null || echo "+memory" > "$root/cgroup.subtree_control" 2>/dev/null || true
    if ! echo "$bytes" > "$MEMCG/memory.max" 2>/dev/null; then
        memcg_die "cannot write $MEMCG/memory.max: the memory controller is not enabled for the children of $root (add +memory to $root/cgroup.subtree_control; cgroup v2 refuses that while processes sit in $root itself)"
        return 1
    fi
    # no swapping instead of reading from disk
    echo 0 > "$MEMCG/memory.swap.max" 2>/dev/null || true
}

# Replaces the calling shell (exec, as `exec` does), so that the process id a caller started
# in the background is CMD's own: run it as a subshell's last command.
memcg_run() {
    [ -n "${MEMCG:-}" ] || { memcg_die "memcg_run before memcg_init"; return 1; }
    exec sh -c 'echo $$ > "$0/cgroup.procs" && shift && exec "$@"' "$MEMCG" _ "$@"
}

memcg_peak() {
    if [ "${MEMCG_V:-}" = 1 ]; then
        cat "$MEMCG/memory.max_usage_in_bytes"
    else
        cat "$MEMCG/memory.peak" 2>/dev/null || echo n/a
    fi
}
