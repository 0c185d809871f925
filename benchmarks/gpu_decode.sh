#!/usr/bin/env bash
# One GPU-machine call (the `run` device tool), under 8 minutes: decode ms/token at 16k and 32k, budget 2k, a
# Llama-3.2-1B-shape model in bfloat16, batch 1 and 8, for DynamicCache, StaticCache compiled, every compressed cache
# eager (and compiled where it declares is_compileable), and kvpress's presses where kvpress is installed (issue 20).
#   bash benchmarks/gpu_decode.sh                  # from the repo root, with $OUT set (results land there)
#   SMOKE=1 bash benchmarks/gpu_decode.sh          # CPU dry run with tiny sizes (no GPU needed)
set -u
source benchmarks/device_log.sh  # $OUT, device.log, stamp

if [ "${SMOKE:-0}" = 1 ]; then
  stamp "CPU dry run"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  PY=${PYTHON:-python}
  "$PY" benchmarks/gpu_decode.py --smoke --contexts 256 --batches 1 2 --budget 64 --new-tokens 3 --skip 1 \
    --deadline 300 --out "$OUT/gpu_decode_smoke.json"
  stamp done
  exit 0
fi

stamp setup
source benchmarks/device_env.sh
stamp "decode speed"
# the script skips the rows left after --deadline (seconds), so the rows done come back within the limit
timeout "${DECODE_TIMEOUT:-450}" python3 benchmarks/gpu_decode.py --contexts ${CONTEXTS:-16384 32768} \
  --batches ${BATCHES:-1 8} --budget "${BUDGET:-2048}" --new-tokens "${NEW_TOKENS:-16}" \
  --deadline "${DEADLINE:-400}" --out "$OUT/gpu_decode.json"
stamp done
