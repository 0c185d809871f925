#!/usr/bin/env bash
# The GPU run of the v3 embedded-model candidates (one H200, ~5 minutes wall):
#   OUT=/path/to/results bash recipes/device_train_tiny.sh
# from the repository root. Trains recipes/configs/train_tiny_v3_{finetune,scratch}.yaml concurrently on the one GPU
# (each stops at its max_time_s), evaluates both trained models on the GPU (concurrently) (passkey, multikey_needle,
# variable_tracking, shared_rollback at 512/1024/2048 tokens, 100 fresh samples each, seed 1234 like
# runs/eval_tiny*.json), and leaves in $OUT: train_<name>.log, eval_<name>.json, env.log (versions, total wall) and <name>.tar.gz (the model
# folder tiny-longmem-v3-<name>/, ready to unpack under runs/).
#   SMOKE=1: a CPU-sized end-to-end check (a few steps, short lengths, 4 eval samples at 128/256 tokens).
#   TRAIN_TIME_S: overrides both configs' max_time_s (the training-loop wall budget, default 185 s on the GPU).
set -euo pipefail
: "${OUT:?set OUT to the folder that collects the results}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
WORK="${WORK:-/tmp/tiny_v3}"
rm -rf "$WORK" && mkdir -p "$WORK"
NAMES="finetune scratch"

if [[ "${SMOKE:-0}" == 1 ]]; then
  TRAIN_ARGS=(--max_steps 4 --max_time_s "${TRAIN_TIME_S:-60}" --tokens_per_batch 512 --num_workers 2
              --copy_batch_size 2 --recall_batch_size 2 --log_every 2)
  EVAL_ARGS=(--lengths 128 256 --num_samples 4 --tokens_per_batch 2048 --num_threads 1 --device cpu)
else
  TRAIN_ARGS=()
  [[ -n "${TRAIN_TIME_S:-}" ]] && TRAIN_ARGS=(--max_time_s "$TRAIN_TIME_S")
  EVAL_ARGS=(--lengths 512 1024 2048 --num_samples 100 --tokens_per_batch 131072 --num_threads 1 --device cuda)
fi

date +%s > "$WORK/start"
python - <<'PY' 2>&1 | tee "$OUT/env.log"
import torch, transformers, accelerate
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY

pids=()
for name in $NAMES; do
  python recipes/train_tiny.py --config "recipes/configs/train_tiny_v3_${name}.yaml" \
    --output_dir "$WORK/tiny-longmem-v3-${name}" "${TRAIN_ARGS[@]}" > "$OUT/train_${name}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "training done after $(( $(date +%s) - $(cat "$WORK/start") )) s (status $status)"
for name in $NAMES; do grep -o '{"step".*' "$OUT/train_${name}.log" | tail -2 || true; done

pids=()
for name in $NAMES; do
  dir="$WORK/tiny-longmem-v3-${name}"
  [[ -f "$dir/model.safetensors" ]] || { echo "no model for $name"; status=1; continue; }
  python recipes/eval_tiny.py --model "$dir" \
    --tasks passkey multikey_needle variable_tracking shared_rollback "${EVAL_ARGS[@]}" \
    --output "$OUT/eval_${name}.json" > "$WORK/eval_${name}.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for name in $NAMES; do
  echo "== $name"; grep "^|" "$WORK/eval_${name}.log" || tail -5 "$WORK/eval_${name}.log"
  [[ -d "$WORK/tiny-longmem-v3-${name}" ]] && tar -czf "$OUT/${name}.tar.gz" -C "$WORK" "tiny-longmem-v3-${name}"
done
echo "total wall $(( $(date +%s) - $(cat "$WORK/start") )) s (status $status)" | tee -a "$OUT/env.log"
ls -la "$OUT"
exit $status
