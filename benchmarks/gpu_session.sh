#!/usr/bin/env bash
# Every GPU check of the project in one call (a lent GPU is held for minutes, not hours):
# the sync audit and profile, the whole test suite with the GPU tests, the whole experiment,
# batched vs sequential. Results land in ${OUT:-benchmarks/results}; each part has its own time limit.
#
#     OUT=benchmarks/results bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
timeout 120 python3 benchmarks/profile_generation.py --engine graph --out "$out" | tail -50
timeout 170 python3 -m pytest -q -n 8 -rs -p no:cacheprovider -p no:benchmark --timeout 100 tests \
    > "$out/pytest_gpu.txt" 2>&1
grep -E "passed|failed|FAILED|SKIPPED|Timeout" "$out/pytest_gpu.txt" | tail -25
timeout 140 python3 benchmarks/bench_experiment.py --device cuda --preset full --engine graph --out "$out" | tail -12
timeout 150 python3 benchmarks/bench_vmap_vs_sequential.py --device cuda --sizes 1,10,50,200,1000,10000 \
    --engines eager,graph --out "$out" | tail -16
