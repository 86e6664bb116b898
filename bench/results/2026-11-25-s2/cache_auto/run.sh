#!/bin/bash
# run bench with the default store flags inside the 8 GiB cgroup
cg=/sys/fs/cgroup/memory/flashmoe_bench
mkdir -p $cg; echo $((8<<30)) > $cg/memory.limit_in_bytes
sync; echo 3 > /proc/sys/vm/drop_caches
sh -c "echo \$\$ > $cg/cgroup.procs && exec /work/main/target/release/flashmoe bench --model /work/flashmoe-bench/q397b --cold --experts-per-token $1 --prompt-tokens 16 --gen-tokens 24 --json"
