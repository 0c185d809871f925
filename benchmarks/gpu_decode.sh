#!/usr/bin/env bash
# Decode speed in one command, on a CUDA machine, from the repository root, under 8 minutes (issue 20): decode
# ms/token at 16k and 32k, budget 2k, a Llama-3.2-1B-shape model in bfloat16, batch 1 and 8, for DynamicCache,
# StaticCache compiled, every compressed cache eager (and compiled where it declares is_compileable), and kvpress's
# presses where kvpress is installed (benchmarks/gpu_decode.py; it skips the rows left after --deadline seconds).
#
#   bash benchmarks/gpu_decode.sh OUT_DIR [--wheels DIR]     # gpu_decode.json and gpu_decode.log in OUT_DIR
#   bash benchmarks/gpu_decode.sh OUT_DIR --smoke            # CPU dry run with tiny sizes (no GPU needed)
#
# Environment: CONTEXTS ("16384 32768"), BATCHES ("1 8"), BUDGET (2048), NEW_TOKENS (16), DEADLINE (400 s).
# --wheels DIR installs the wheels in DIR into a private folder first, offline (as benchmarks/gpu_check.sh).
set -u
usage="usage: bash benchmarks/gpu_decode.sh OUT_DIR [--wheels DIR] [--smoke]"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then echo "$usage" >&2; exit 2; fi
out=$1; shift
wheels= smoke=0
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1; shift ;;
    --wheels) if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi; wheels=$2; shift 2 ;;
    *) echo "unknown argument $1; $usage" >&2; exit 2 ;;
  esac
done
if [ ! -f benchmarks/gpu_decode.py ]; then echo "run from the repository root" >&2; exit 2; fi

mkdir -p "$out"
exec > >(tee -a "$out/gpu_decode.log") 2>&1
start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - start )) s] $*"; }
py=${PYTHON:-$(command -v python || command -v python3)}
site=$(mktemp -d)
if [ -n "$wheels" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import hf_longmem.cache_classes" 2>/dev/null; then  # not installed: the checkout, in place
  for d in cache_classes modeling model_cards; do [ -e "hf_longmem/$d" ] || ln -s "../$d" "hf_longmem/$d"; done
  export PYTHONPATH="$PYTHONPATH:$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$smoke" = 1 ]; then
  stamp "CPU dry run"
  "$py" benchmarks/gpu_decode.py --smoke --contexts 256 --batches 1 2 --budget 64 --new-tokens 3 --skip 1 \
    --deadline 300 --out "$out/gpu_decode.json"
else
  stamp setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  export TRITON_INTERPRET=0
  stamp "decode speed"
  # shellcheck disable=SC2086  # CONTEXTS / BATCHES are lists
  timeout 450 "$py" benchmarks/gpu_decode.py --contexts ${CONTEXTS:-16384 32768} --batches ${BATCHES:-1 8} \
    --budget "${BUDGET:-2048}" --new-tokens "${NEW_TOKENS:-16}" --deadline "${DEADLINE:-400}" \
    --out "$out/gpu_decode.json"
fi
stamp done
