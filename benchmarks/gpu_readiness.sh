#!/usr/bin/env bash
# On a lent GPU machine (device run, carry [".whl"], timeout_s 600): install the carried wheels
# (benchmarks/gpu_wheels.sh) beside the image's torch, then run benchmarks/gpu_readiness.py
# within 540 s. Its table, JSON and step logs land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install the carried wheels (run benchmarks/gpu_wheels.sh here first)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-$(mktemp -d)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import chattune.cli, chattune.training.recipe, chattune.serve.app" \
    || { echo "chattune does not import with the carried wheels"; exit 1; }
timeout 560 python3 benchmarks/gpu_readiness.py --budget 540 --out "$OUT" 2>&1 | tee "$OUT/gpu_readiness.log"
