# Sourced first by the one-call GPU scripts (device_check.sh, device_mom.sh): $OUT (where results land), everything
# the script prints also appended to $OUT/device.log, and `stamp MESSAGE` for elapsed-time section headers.
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1
start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - start )) s] $*"; }
