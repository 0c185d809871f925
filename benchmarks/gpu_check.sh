#!/usr/bin/env bash
# The whole GPU check in one command, on a CUDA machine, from the repository root: end-to-end speed of every cache
# (benchmarks/gpu_check.py --sections speed), the decode kernels alone (benchmarks/kernel_speed.py), the kernel tests
# compiled (TRITON_INTERPRET=0 pytest tests/kernels), then end-to-end parity (gpu_check.py --sections parity models).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--context N] [--new-tokens N] [--speed-timeout S] [--wheels DIR]
#
# OUT_DIR receives gpu_speed.json, kernel_speed.json, gpu_parity.json and gpu_check.log (everything printed, with
# elapsed-time section headers). --wheels DIR installs the wheels in DIR (e.g. the transformers this package needs)
# into a private folder first, offline (--no-index), for a machine with its own torch/triton and no network. If
# hf_longmem is not installed, the checkout is used in place (its package-dir folders linked into hf_longmem/).
set -u
usage="usage: bash benchmarks/gpu_check.sh OUT_DIR [--context N] [--new-tokens N] [--speed-timeout S] [--wheels DIR]"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then echo "$usage" >&2; exit 2; fi
out=$1; shift
context=16384 new_tokens=32 speed_timeout=120 wheels=
while [ $# -gt 0 ]; do
  if [ $# -lt 2 ]; then echo "$1 needs a value; $usage" >&2; exit 2; fi
  case $1 in
    --context) context=$2 ;;
    --new-tokens) new_tokens=$2 ;;
    --speed-timeout) speed_timeout=$2 ;;
    --wheels) wheels=$2 ;;
    *) echo "unknown argument $1; $usage" >&2; exit 2 ;;
  esac
  shift 2
done
if [ ! -f benchmarks/gpu_check.py ]; then echo "run from the repository root" >&2; exit 2; fi
if [ -n "$wheels" ] && ! ls "$wheels"/*.whl >/dev/null 2>&1; then echo "--wheels $wheels holds no .whl" >&2; exit 2; fi

mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - start )) s] $*"; }

stamp setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
py=$(command -v python || command -v python3)
site=$(mktemp -d)
if [ -n "$wheels" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import hf_longmem.cache_classes" 2>/dev/null; then  # not installed: the checkout, in place
  for d in cache_classes modeling model_cards; do [ -e "hf_longmem/$d" ] || ln -s "../$d" "hf_longmem/$d"; done
  export PYTHONPATH="$PYTHONPATH:$PWD"
fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" -c "import torch, triton, transformers, hf_longmem
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, hf_longmem.__file__)"

stamp "speed (clean GPU)"
timeout "$speed_timeout" "$py" benchmarks/gpu_check.py --sections speed --context "$context" \
  --new-tokens "$new_tokens" --out "$out/gpu_speed.json"
stamp "kernel speed"
timeout 45 "$py" benchmarks/kernel_speed.py --out "$out/kernel_speed.json"
stamp "kernel tests, compiled"
# 240 s: the chunked gated-delta backward kernel compiles slowly
timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/kernels -rfE 2>&1 | tail -40
stamp "end-to-end parity"
timeout 150 "$py" benchmarks/gpu_check.py --sections parity models --out "$out/gpu_parity.json"
stamp done
