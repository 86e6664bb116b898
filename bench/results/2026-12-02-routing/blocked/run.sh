#!/bin/bash
# The 8192-token uniform prefill beyond RAM again, with the blocked attention (2ddbd48); same
# model and cgroup as ../run.sh.  BIN=... WORK=/work/bench-routing bash .../blocked/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export MEMCG_NAME=flashmoe_routing
. "$here/../../../../scripts/memcg.sh"
memcg_init 1G
( memcg_run "$BIN" bench --cold --json --model "$WORK/m6-uniform" --prompt-tokens 8192 --gen-tokens 1 ) > "$here/prefill8192_uniform.json" 2> "$here/prefill8192_uniform.log"
memcg_peak > "$here/prefill8192_uniform.peak"
python3 -c "import json,sys;r=json.load(open(sys.argv[1]));p=r['prefill_phases_ms'];T=r['prompt_tokens']/1000;print(round(r['prefill_tok_s'],1),'attn s',round(p['attention_deltanet']*T,1),'io wait s',round(p['expert_io_wait']*T,2),'MB/token',round(r['prefill_bytes_read_per_token']/1e6,2))" "$here/prefill8192_uniform.json"
