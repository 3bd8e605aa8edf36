#!/usr/bin/env bash
# The GPU checks as one prepared run for a session lent a GPU (under 3 minutes
# on one H200; 7 result files, within the 8 the device tool returns): cuDNN
# packed attention against XLA's (numbers, then the pytest GPU test), then the
# 34B-layer proxy's MFU with full remat and
# with save_dots (cuDNN attention, auto layers), then full remat on XLA
# attention as the baseline. Each result lands in $OUT (default
# benchmarks/gpu_results); copy the numbers and the card into README.md.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${OUT:-benchmarks/gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$out/gpu.txt"
timeout 120 python benchmarks/attention_check.py 2>&1 | tee "$out/attention_check.txt"
JAX_PLATFORMS=cuda,cpu timeout 120 python -m pytest -q tests/unit/attention_test.py -k gpu 2>&1 \
  | tee "$out/attention_test.txt"
for variant in 'full cudnn' 'save_dots cudnn' 'full xla'; do
  read -r remat attention <<<"$variant"
  timeout 150 python benchmarks/gpu_proxy.py --remat="$remat" --attention="$attention" --json \
    >"$out/proxy_${remat}_${attention}.json" 2>>"$out/proxy.log"
  tail -c 600 "$out/proxy_${remat}_${attention}.json"; echo
done
