#!/usr/bin/env bash
# The GPU checks of fast sampling, prepared for one call on a CUDA machine (the device tool):
#   1. the sampling tests, whose CUDA cases (graph replay == eager, bf16) skip on CPUs;
#   2. compare_reference.py's gpu preset: 3x64x64, patch 2, width 768, 8x8, batch 64, bf16,
#      guidance 0 and 2, reference vs every sampler, with the cost floor.
# Needs the published code in ./ref (carry it: run(carry=["ref"])). Logs and JSON go to $OUT
# (or ./gpu-checks). Budget: ~6-8 minutes on an H200, most of it the reference's sampling.
set -uo pipefail
out="${OUT:-gpu-checks}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/core/test_static_sampling.py \
    tests/core/test_parallel_sampling.py 2>&1 | tee "$out/tests.log"
timeout 420 python3 benchmarks/compare_reference.py --ref ref --preset gpu --repeats 2 \
    --json "$out/compare_gpu.json" 2>&1 | tee "$out/compare_gpu.log"
