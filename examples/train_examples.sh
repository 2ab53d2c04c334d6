#!/usr/bin/env bash
# Rebuild the example adapters (and, with --ablation, the S/O ablation on the pirate task).
#
#   bash examples/train_examples.sh              # json, pirate, caps -> examples/*.safetensors
#   bash examples/train_examples.sh --ablation   # also pirate with S alone and O alone -> $OUT_DIR
#
# The datasets are generated on the spot (examples/make_data.py); nothing is downloaded. All runs go in
# parallel, one CPU thread each (on a small shared machine that beats one run on all threads).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-$(mktemp -d)}"
OUT_DIR="${OUT_DIR:-$(mktemp -d)}"
COMMON=(--rank 32 --steps 40 --lr 2e-2 --batch-size 8 --max-length 96 --eval-fraction 0.2 --seed 0
        --threads 1 --no-progress)

python examples/make_data.py --out-dir "$DATA"
pids=()
for task in json pirate caps; do
  python -m adapters train --data "$DATA/$task.jsonl" --out "examples/$task.safetensors" "${COMMON[@]}" \
    --description "example: $task answers (examples/train_examples.sh)" > "$OUT_DIR/$task.log" 2>&1 &
  pids+=($!)
done
if [[ "${1:-}" == "--ablation" ]]; then
  for part in s o; do
    python -m adapters train --data "$DATA/pirate.jsonl" --out "$OUT_DIR/pirate-$part.safetensors" \
      "${COMMON[@]}" --train "$part" > "$OUT_DIR/pirate-$part.log" 2>&1 &
    pids+=($!)
  done
fi
for pid in "${pids[@]}"; do wait "$pid"; done
grep -H "trained\|eval loss" "$OUT_DIR"/*.log
