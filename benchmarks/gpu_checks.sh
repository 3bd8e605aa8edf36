#!/usr/bin/env bash
# Issue 9's GPU checks as one prepared run for a session lent a GPU (about 8
# minutes on one H100): cuDNN packed attention against XLA's (numbers, then
# the pytest GPU test), then the 34B-layer proxy's MFU with full remat and
# with save_dots (cuDNN attention, auto layers), then full remat on XLA
# attention as the baseline. Each result lands in $OUT (default
# benchmarks/gpu_results); copy the numbers and the card into README.md.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$out/gpu.txt"
timeout 120 python benchmarks/attention_check.py 2>&1 | tee "$out/attention_check.txt"
JAX_PLATFORMS=cuda,cpu timeout 120 python -m pytest -q tests/attention_test.py -k gpu 2>&1 \
  | tee "$out/attention_test.txt"
for variant in 'full cudnn' 'save_dots cudnn' 'full xla'; do
  set -- $variant
  timeout 150 python benchmarks/gpu_proxy.py --remat="$1" --attention="$2" --json \
    >"$out/proxy_$1_$2.json" 2>"$out/proxy_$1_$2.log"
  tail -c 600 "$out/proxy_$1_$2.json"; echo
done
