#!/bin/bash
# interleaved A/B: main's binary vs the mla branch's, warm, 2 threads
# usage: run.sh PROMPT ROUNDS
P=$1; R=${2:-2}
find /tmp/mla-ds -type f -exec cat {} + > /dev/null
for r in $(seq 1 $R); do
  for b in main mla; do
    bin=/tmp/flashmoe-main; [ $b = mla ] && bin=/tmp/flashmoe-mla
    out=/tmp/mla-bench/$b-$P-$r.json
    $bin bench --model /tmp/mla-ds --prompt-tokens $P --gen-tokens 4 --json > $out 2>/tmp/mla-bench/$b-$P-$r.err
    python3 -c "
import json;d=json.load(open('$out'));p=d['prefill_phases_ms']
print('$b', $P, 'r$r', 'prefill %.2f tok/s'%d['prefill_tok_s'], 'decode %.3f tok/s'%d['decode_tok_s'], 'attn %.1f of %.1f ms/token (%.0f%%)'%(p['attention_deltanet'],p['total'],100*p['attention_deltanet']/p['total']), 'dense %.1f experts %.1f'%(p['dense_mlp'], p['expert_compute']))"
  done
done
