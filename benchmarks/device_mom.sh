#!/usr/bin/env bash
# One GPU-machine call (the `device` tool) for MoM: the chunked gated-delta Triton kernel compiled (tests, then speed)
# on the GPU, while the machine's CPU cores train a MoM seed sweep (benchmarks/memory_seed_sweep.py) in the background.
#   SWEEP_CONFIGS="a.yaml b.yaml" SWEEP_SEEDS="0 1 2" bash benchmarks/device_mom.sh    # from the repo root, $OUT set
# Measured on an H100 machine (2026-11-26): the compiled tests take ~60 s; the speed run below ~65 s (lengths of 16k
# add minutes: the recurrent kernel's backward takes 0.4 s per call at 4k); its 16 cores train a 4,000-step grouped
# MQAR run in ~6 min (M=1) to over 9 min (3 routed + shared) with 10 runs at once, no faster than one core here.
set -u
source benchmarks/device_log.sh  # $OUT, device.log, stamp

stamp setup
source benchmarks/device_env.sh
nproc

sweep_pid=
if [ -n "${SWEEP_CONFIGS:-}" ]; then
  stamp "seed sweep in the background (CPU)"
  # shellcheck disable=SC2086
  (timeout "${SWEEP_TIMEOUT:-480}" python benchmarks/memory_seed_sweep.py --configs $SWEEP_CONFIGS \
     --seeds ${SWEEP_SEEDS:-0 1 2} --jobs "${SWEEP_JOBS:-12}" --runs /tmp/sweep_runs --out "$OUT/seed_sweep.json" \
     > /tmp/sweep.log 2>&1; echo "sweep rc=$?" >> /tmp/sweep.log) &
  sweep_pid=$!
fi

stamp "gated-delta kernel tests, compiled"
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -p no:cacheprovider tests/kernels/test_gated_delta.py -rfE 2>&1 | tail -30
stamp "gated-delta kernel speed"
timeout "${SPEED_TIMEOUT:-150}" python benchmarks/kernel_speed.py --gated-delta --batch 4 --lengths 4096 \
  --out "$OUT/kernel_speed_gdn.json" 2>&1 | tail -30

if [ -n "$sweep_pid" ]; then
  stamp "waiting for the sweep"
  wait "$sweep_pid"
  tail -60 /tmp/sweep.log
  tar -czf "$OUT/sweep_logs.tar.gz" --exclude="*.safetensors" -C /tmp sweep_runs 2>/dev/null
fi
stamp done
