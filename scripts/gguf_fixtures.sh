#!/usr/bin/env bash
# The GGUF agreement fixtures (tests/fixtures/gguf/): llama.cpp's own converter (and quantizer)
# turn tiny random checkpoints of several families into GGUF, and llama.cpp's logits for fixed
# token sequences (and its tokenization of a few texts) are recorded, so tests/gguf.rs checks
# flashmoe against llama.cpp without building it or installing torch:
#   qwen3moe   Qwen3-MoE                 F16, Q8_0, Q4_K_M
#   gpt-oss    gpt-oss, MXFP4 experts    F16, Q8_0 (the experts stay MXFP4 in both)
#   deepseek2  DeepSeek-V3 MLA           F16, Q8_0
#   glm4moe    GLM-4.5                   F16, Q8_0
#   qwen3next  Qwen3-Next                F16, Q8_0
#   qwen35moe  Qwen3.5-MoE               F16, Q8_0
#   llama      Mixtral                   F16, Q8_0
#   spm        Mixtral with a SentencePiece vocabulary (tokenizer.model, BPE with byte
#              fallback, trained here with the `sentencepiece` package): F16, its tokenization
#
#   PYTHON=/tmp/fx/bin/python scripts/gguf_fixtures.sh [ARCH ...]   # all, or only these
#
# PYTHON: a Python with torch and transformers (the venv of scripts/make_fixtures.py; `spm` also
# needs the `sentencepiece` package). llama.cpp
# comes from the llama-cpp-python sdist on PyPI (its vendored source), built CPU-only under
# $WORK (default /tmp/llama-build): libllama, llama-quantize, and scripts/gguf_logits.c.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/llama-build}
PY=${PYTHON:-python3}
VERSION=0.3.36
OUT=$ROOT/tests/fixtures/gguf
JOBS=${JOBS:-2}
mkdir -p "$WORK" "$OUT"

# the sdist through PyPI's JSON API (`pip download --no-binary :all:` would also build its
# build dependencies, cmake included, from source)
sdist=$WORK/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$sdist" ]; then
    "$PY" - "$sdist" "$VERSION" <<'EOF'
import json, sys, urllib.parse, urllib.request
path, version = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(index))
url = next(u["url"] for u in meta["releases"][version] if u["packagetype"] == "sdist")
data = urllib.request.urlopen(urllib.parse.urljoin(index, url)).read()
open(path + ".part", "wb").write(data)
import os; os.replace(path + ".part", path)
EOF
fi
src=$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp
[ -d "$src" ] || tar -xzf "$sdist" -C "$WORK"

CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
    [ -x "$WORK/venv/bin/cmake" ] || { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q cmake; }
    CMAKE=$WORK/venv/bin/cmake
fi
"$CMAKE" -S "$src" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON \
    -DGGML_CCACHE=OFF > "$WORK/cmake.log"
"$CMAKE" --build "$WORK/build" -j"$JOBS" --target llama llama-quantize > "$WORK/build.log"
bin=$WORK/build/bin
cc -O2 -I"$src/include" -I"$src/ggml/include" "$ROOT/scripts/gguf_logits.c" -L"$bin" -lllama -lggml -lggml-base \
    -Wl,-rpath,"$bin" -o "$WORK/gguf_logits"

# llama.cpp's converter, its vendored gguf-py; the fixture tokenizer's pre-tokenizer hash is
# unknown to it, but its split regex is Qwen2's (PRE: the name to write, `qwen2` by default;
# Qwen3.5's `qwen35` also keeps combining marks with the letters before them)
convert() {
    "$PY" - "$src" "$@" <<'EOF'
import sys
src, ck, outtype, outfile = sys.argv[1:5]
extra = sys.argv[5:]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
import os
TextModel.get_vocab_base_pre = lambda self, tokenizer: os.environ.get("PRE", "qwen2")
# GLM's vocabulary step looks up GLM's own special tokens ([gMASK], ...), which the fixture
# tokenizer has not: its BPE vocabulary is written as any GPT-2-style one
TextModel._set_vocab_glm = lambda self: self._set_vocab_gpt2()
# llama's vocabulary step tries SentencePiece first (the Mixtral releases' tokenizer.model);
# the fixture tokenizer is GPT-2-style BPE
from conversion.llama import LlamaModel
if not os.environ.get("SPM"):
    LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
import convert_hf_to_gguf as c
sys.argv = ["convert_hf_to_gguf.py", ck, "--outtype", outtype, "--outfile", outfile] + extra
c.main()
EOF
}

# 40 fixed ids below the special tokens, and texts for the tokenizer
other=$("$PY" -c "print(','.join(str((i * 7919 + 11) % 313) for i in range(40)))")
texts=("ROMEO: But soft, what light through yonder window breaks?"
       "<|im_start|>user
Numbers like 12345 and 3.14159, café 東京 🙂<|im_end|>"
       "  fn main() { println!(\"hello\"); }	tabs"
       "naïve café with combining marks: naïve café")

# One architecture: the make_fixtures.py checkpoint NAME (float64 reference and all; removed
# after) as ARCH-f16.gguf and ARCH-q8_0.gguf (and ARCH-q4_k_m.gguf with `q4`), and llama.cpp's
# records of each as llama-ARCH-Q.json, and the checkpoint's own reference as
# transformers-ARCH.json.
fixture() {
    local arch=$1 name=$2 q4=${3:-} qs=(f16 q8_0) extra=()
    # the Qwen DeltaNet converters expect MTP layers unless told there are none
    case $arch in qwen3next|qwen35moe) extra=(--no-mtp) ;; esac
    local pre=qwen2
    [ "$arch" = qwen35moe ] && pre=qwen35
    (cd "$ROOT" && "$PY" scripts/make_fixtures.py "$name")
    local ck=$ROOT/tests/fixtures/$name
    if [ "$arch" = deepseek2 ]; then
        # transformers' config drops the release's scoring_func; without it llama.cpp routes
        # deepseek2 by softmax (DeepSeek-V2's)
        "$PY" - "$ck/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(scoring_func="sigmoid", topk_method="noaux_tc")
json.dump(c, open(sys.argv[1], "w"), indent=2)
EOF
    fi
    PRE=$pre convert "$ck" f16 "$OUT/$arch-f16.gguf" "${extra[@]}"
    PRE=$pre convert "$ck" q8_0 "$OUT/$arch-q8_0.gguf" "${extra[@]}"
    if [ "$q4" = q4 ]; then
        "$bin/llama-quantize" "$OUT/$arch-f16.gguf" "$OUT/$arch-q4_k_m.gguf" Q4_K_M > "$WORK/quantize.log"
        qs+=(q4_k_m)
    fi
    local prompt
    prompt=$("$PY" -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))['prompt'])))" "$ck/reference.json")
    for q in "${qs[@]}"; do
        "$WORK/gguf_logits" "$OUT/$arch-$q.gguf" "$OUT/llama-$arch-$q.json" "$prompt" "$other" -- "${texts[@]}"
    done
    # the float64 reference of the checkpoint itself (transformers): what the F16 file holds,
    # computed exactly, prefill and step-by-step decode
    "$PY" - "$ck/reference.json" "$OUT/transformers-$arch.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
keep = ("transformers", "prompt", "prefill_logits", "greedy", "decode_logits")
json.dump({k: r[k] for k in keep}, open(sys.argv[2], "w"), separators=(",", ":"))
EOF
    rm -rf "$ck"
}

# A SentencePiece vocabulary as the Llama lineage's GGUFs carry it (`tokenizer.ggml.model` =
# `llama`): a 512-piece BPE model with byte fallback trained on a few lines (spaces, newlines,
# digits, punctuation, accents, CJK, an emoji), in a 2-layer random Mixtral, converted with
# llama.cpp's own SentencePiece vocabulary step; llama.cpp's tokenization of texts that exercise
# the space prefix, byte fallback and the user-defined tokens is recorded in llama-spm-f16.json.
spm_fixture() {
    local ck=$WORK/mixtral_spm
    rm -rf "$ck" && mkdir -p "$ck"
    "$PY" - "$ck" <<'EOF'
import json, sys, torch
import sentencepiece as spm
from transformers import MixtralConfig, MixtralForCausalLM
ck = sys.argv[1]
lines = [
    "The quick brown fox jumps over the lazy dog. Flash storage streams experts on demand.",
    "A mixture of experts routes each token to a few feed-forward networks; the rest stay on disk.",
    "  Indented lines, double  spaces and trailing spaces   ",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, 12345, 3.14159, 2026-12-02 (and 100%)!",
    "Punctuation: \"quotes\", 'apostrophes', [brackets], {braces}, <angles> & #hashes?",
    "Accents: café, naïve, résumé, Zürich, São Paulo, Ångström, façade, jalapeño.",
    "CJK: 東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\nHi, how can I help?<|im_end|>",
] * 4 + ["Emoji: 🙂 smiles and more text after it."]
with open(ck + "/corpus.txt", "w") as f:
    f.write("\n".join(lines) + "\n")
# Llama's own trainer settings where they matter: no normalization, extra whitespace kept,
# digits split, byte fallback; the emoji (and rare CJK) fall below the character coverage
spm.SentencePieceTrainer.train(
    input=ck + "/corpus.txt", model_prefix=ck + "/tokenizer", model_type="bpe", vocab_size=512,
    byte_fallback=True, character_coverage=0.99, normalization_rule_name="identity",
    remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
    control_symbols=["<|im_start|>", "<|im_end|>"], user_defined_symbols=["~~tool~~"],
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
sp = spm.SentencePieceProcessor(model_file=ck + "/tokenizer.model")
assert sp.vocab_size() <= 512, sp.vocab_size()
assert sp.PieceToId("~~tool~~") == 5, sp.PieceToId("~~tool~~")
torch.manual_seed(0)
config = MixtralConfig(vocab_size=sp.vocab_size(), hidden_size=32, intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, sliding_window=None)
MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(ck)
template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
           "add_eos_token": False, "chat_template": template,
           # the converter types a trainer's user-defined piece as normal unless told
           "added_tokens_decoder": {"5": {"content": "~~tool~~", "special": False}}}, open(ck + "/tokenizer_config.json", "w"))
EOF
    SPM=1 convert "$ck" f16 "$OUT/spm-f16.gguf"
    local texts=("Hello there!" " leading space" "trailing space " "double  spaces   and three"
        $'two\nlines\n\nand a blank one' "Numbers 12345 and 3.14159" "café naïve Zürich"
        "東京は日本の首都" "unknown Ω ∑ 🚀 🙂 byte fallback"
        $'<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n' "<s>a</s> controls" "call~~tool~~ now ~~tool~~" " " "  " $'\n'
        $'\ttab\r\n')
    "$WORK/gguf_logits" "$OUT/spm-f16.gguf" "$OUT/llama-spm-f16.json" "1,5,9,300,42" -- "${texts[@]}"
    rm -rf "$ck"
}

want() { [ $# -eq 1 ] || [[ " ${*:2} " == *" $1 "* ]]; }
want qwen3moe "$@" && fixture qwen3moe qwen3_moe_gguf q4
want gpt-oss "$@" && fixture gpt-oss gpt_oss_gguf
want deepseek2 "$@" && fixture deepseek2 deepseek_v3_gguf
want glm4moe "$@" && fixture glm4moe glm4_moe_gguf
want qwen3next "$@" && fixture qwen3next qwen3_next_gguf
want qwen35moe "$@" && fixture qwen35moe qwen35_moe_gguf
want llama "$@" && fixture llama mixtral_gguf
want spm "$@" && spm_fixture
ls -l "$OUT"
