#!/usr/bin/env bash
# One GPU-machine call (the `device` tool): compiled Triton kernels and end-to-end checks, GPU figures, and (when
# recipes/device_train_tiny.sh exists and TRAIN=1) the embedded model's GPU training in the background.
#   bash benchmarks/device_check.sh          # from the repo root, with $OUT set (results land there)
# The machine has torch/triton/transformers of its own and no network: the transformers this package needs travels
# as a wheel in .whl/ (carried), and the package is used from the checkout (links stand in for package-dir).
set -u
source benchmarks/device_log.sh  # $OUT, device.log, stamp

stamp setup
source benchmarks/device_env.sh

stamp "speed (clean GPU)"
timeout "${SPEED_TIMEOUT:-120}" python3 benchmarks/gpu_check.py --sections speed --context "${CONTEXT:-16384}" \
  --new-tokens "${NEW_TOKENS:-32}" --out "$OUT/gpu_speed.json"
stamp "kernel speed"
timeout 45 python3 benchmarks/kernel_speed.py --out "$OUT/kernel_speed.json"

train_pid=
if [ "${TRAIN:-0}" = 1 ] && [ -f recipes/device_train_tiny.sh ]; then
  stamp "training in the background"
  # At most 8 files come back: the models' two tarballs go to $OUT, the logs and evaluations into one tar.
  (mkdir -p /tmp/train_out
   OUT=/tmp/train_out timeout "${TRAIN_TIMEOUT:-330}" bash recipes/device_train_tiny.sh > /tmp/train_out/run.log 2>&1
   echo "train rc=$?" >> /tmp/train_out/run.log
   mv /tmp/train_out/*.tar.gz "$OUT/" 2>/dev/null
   tar -cf "$OUT/train_logs.tar" -C /tmp train_out) &
  train_pid=$!
fi

stamp "kernel tests, compiled"
# 240 s: the chunked gated-delta backward kernel compiles slowly
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels -rfE --timeout 200 2>&1 | tail -40
stamp "end-to-end parity"
timeout 150 python3 benchmarks/gpu_check.py --sections parity models --out "$OUT/gpu_parity.json"

if [ -n "$train_pid" ]; then stamp "waiting for training"; wait "$train_pid"; tail -40 /tmp/train_out/run.log; fi
stamp done
