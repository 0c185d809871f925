# Sourced by benchmarks/device_check.sh (and usable alone: `source benchmarks/device_env.sh`) on the GPU machine:
# installs the carried transformers wheel (.whl/), links the package-dir folders into hf_longmem/, puts a `python`
# on PATH (the image has python3 only; a wrapper, not a link: a link to a venv's python loses the venv) and
# exports the environment.
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH="/tmp/bin:$PATH"
for d in cache_classes modeling model_cards; do [ -e "hf_longmem/$d" ] || ln -s "../$d" "hf_longmem/$d"; done
export PYTHONPATH="/tmp/site:$PWD" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch, triton, transformers, hf_longmem.cache_classes as c
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, c.__file__)"
