#!/usr/bin/env bash
# The one device call a session with a lent GPU makes (about 9 minutes on an H100/H200): the CUDA-only tests
# (the CUDA-graph step against the eager one), then bench/gpu_profile.py: throughput per variant (eager, compiled,
# CUDA graphs at batch 512/2048/8192, the seed design beside them, cdiff.train.train's own loop), then quality.
#
# Here, once:  mkdir -p data/raw/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz data/raw/FashionMNIST/raw/
# Then the device tool's run:  command "bash bench/gpu_session.sh", carry ["data/raw/FashionMNIST"], timeout_s 600.
# Its files come back under $OUT: gpu-tests.log, gpu-profile.json, gpu-profile.log; commit the JSON as
# bench/results/gpu-profile-<card>.json.
#
# Not here: `make repro-gpu` (Ray, MLflow, DVC). The device image has torch but none of those three, and Ray's
# wheel alone (79 MB for cp312) is more than the 64 MiB one call may carry.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/gpu-session}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-tests.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_compiled_step.py tests/test_performance.py 2>&1 |
  tee -a "$OUT/gpu-tests.log"
timeout 400 python3 bench/gpu_profile.py --parts fixed,throughput,quality --out "$OUT/gpu-profile.json" 2>&1 |
  tee "$OUT/gpu-profile.log"
