#!/usr/bin/env bash
# Train the embedded default model (ternary BitNet b1.58) and its full-precision twin on the public-domain
# corpus, then print held-out perplexity and bits per byte of both, and the acceptance bars.
#
#   scripts/train_default.sh [OUT] [DATA]        OUT: ./train-default   DATA: ../shared/data/corpus
#
# Env: PYTHON (python3), EVAL (held-out text; default DATA's austen_persuasion.txt), EXTRA (more `1bit train`
# arguments, appended so they win: EXTRA="--device cpu --steps 3 ..." is a CPU dry run of this script).
#
# Needs: pip install -e ".[train]" (torch with CUDA; numpy, tokenizers, safetensors, gguf, jinja2, tqdm).
# Writes OUT/ternary/{model/, model.gguf, eval.json, checkpoint.pt, engine_ppl.json} and OUT/fp/{model/, eval.json}.
# OUT/ternary/model.gguf (I2_S, 15.6 MB) is the file to ship.
#
# Why this size and schedule (measured on one H100, torch 2.11, compiled, bf16):
# - The data, not the GPU, is the limit. The corpus is 13 MB = 3.6M tokens at an 8k BPE vocabulary, and this
#   model trains at 1.34M tokens/s, so 15 minutes would be 1.2B tokens = 330 epochs. Held-out perplexity on
#   Persuasion bottoms out after ~9-13 epochs and then climbs: with dropout 0.1 at a constant LR the ternary
#   model went 60 -> 168 and the fp twin 58 -> 894 by epoch 64; 2000- and 2800-step cosines (18-25 epochs)
#   ended 13-16% (ternary) and 31-37% (fp) worse than this 1400-step one. So both runs train 1400 steps
#   (46M tokens, 12.8 epochs: about a minute of steps plus ~1 min of compilation) with dropout 0.2; more
#   minutes only overfit. (`1bit train --minutes M` sizes a cosine to a time budget, but is not used here.)
# - Size: the shipped file must be <= 16 MB. I2_S linears cost 2 bits/weight and the tied f16 embedding
#   2 bytes/weight: 27.3M ternary (hidden 512, 8 layers, 8 heads of 64, MLP 1536) = 6.8 MB plus the
#   8192 x 512 embedding = 8.4 MB, 15.6 MB in all. A larger model does not fit the file (and would overfit
#   sooner). ctx 512: the minimum asked, not tuned. vocab 8192: 3.6 bytes/token on this English.
# - Measured with exactly this recipe (4 runs sharing one H100; the step count, not the time, fixes the result):
#   ternary ppl 54.4, 1.563 bits/byte; fp twin ppl 51.7, 1.544 bits/byte: ratio 1.05 (bar: 1.25), bpb bar 2.0
#   (the run that made the shipped onebit/data/default.gguf: 82 s + 62 s of steps; an earlier run gave 54.8).
#   LR: 2e-3 for ternary (BitNet's higher QAT rate), 1e-3 for fp; everything else is identical.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-train-default}
DATA=${2:-../shared/data/corpus}
PY=${PYTHON:-python3}
EVAL=${EVAL:-$(find "$DATA" -name austen_persuasion.txt | head -n 1)}
read -r -a EXTRA <<< "${EXTRA:-}"
[ -n "$EVAL" ] || { echo "no austen_persuasion.txt under $DATA" >&2; exit 1; }
$PY -c "import torch, gguf, tokenizers, safetensors, jinja2, tqdm" \
  || { echo 'install the trainer first: pip install -e ".[train]"' >&2; exit 1; }
$PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || [ -n "${EXTRA[*]}" ] \
  || { echo "no CUDA device: this recipe is sized for a GPU (set EXTRA to dry-run on the CPU)" >&2; exit 1; }

SHAPE=(--arch bitnet --hidden 512 --layers 8 --heads 8 --kv-heads 8 --ffn 1536 --ctx 512 --vocab 8192)
RECIPE=(--batch 64 --steps 1400 --warmup 150 --dropout 0.2 --weight-decay 0.1 --seed 0 --eval-every 200)

time $PY -m onebit.cli train --data "$DATA" --eval-file "$EVAL" --out "$OUT/ternary" "${SHAPE[@]}" "${RECIPE[@]}" \
  --lr 2e-3 "${EXTRA[@]}"
time $PY -m onebit.cli train --data "$DATA" --eval-file "$EVAL" --out "$OUT/fp" "${SHAPE[@]}" "${RECIPE[@]}" \
  --lr 1e-3 --fp --tokenizer "$OUT/ternary/tokenizer" "${EXTRA[@]}"

# The shipped file, scored by the engine itself with the trainer's windows (ctx = the model's 512, stride 256):
# what `1bit ppl default persuasion.txt` reproduces.
time $PY -m onebit.cli ppl "$OUT/ternary/model.gguf" "$EVAL" --json > "$OUT/ternary/engine_ppl.json"

$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
t, f = (json.load(open(os.path.join(out, k, "eval.json"))) for k in ("ternary", "fp"))
e = json.load(open(os.path.join(out, "ternary", "engine_ppl.json")))
for name, d in (("ternary (trainer)", t["eval"]), ("ternary (engine, GGUF)", e), ("fp twin (trainer)", f["eval"])):
    print(f"{name:<24} ppl {d['ppl']:8.3f}   {d['bits_per_byte']:.4f} bits/byte   {d['tokens']:,} tokens")
ratio = t["eval"]["ppl"] / f["eval"]["ppl"]
size = os.path.getsize(os.path.join(out, "ternary", "model.gguf"))
print(f"ternary / fp ppl ratio {ratio:.3f} (bar <= 1.25): {'ok' if ratio <= 1.25 else 'FAIL'}")
print(f"ternary bits per byte {e['bits_per_byte']:.4f} (bar <= 2.0): {'ok' if e['bits_per_byte'] <= 2.0 else 'FAIL'}")
print(f"engine vs trainer ppl {e['ppl'] / t['eval']['ppl'] - 1:+.2e}; model.gguf {size / 1e6:.2f} MB (bar <= 16)")
print(f"device {t['device']}; train seconds: ternary {t['train_seconds']}, fp {f['train_seconds']}")
EOF
