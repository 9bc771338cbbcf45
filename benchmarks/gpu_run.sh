#!/usr/bin/env bash
# The GPU check in one prepared run (for a lent GPU machine; see benchmarks/README.md): the CUDA tests
# (tests/test_cuda.py), then the benchmark with every mode, the baseline included, on the GPU: per
# score evaluation, then per full sample (two processes, so that a failure in one keeps the other's
# rows). Results: OUTDIR/gpu_{evals,samples}.csv, gpu_info.txt, gpu_tests.txt.
#
#   benchmarks/gpu_run.sh /path/to/train.safetensors [OUTDIR] [extra run_benchmark.py options]
set -uo pipefail
DATA=${1:?usage: gpu_run.sh PREPARED_FASHIONMNIST [OUTDIR] [options]}
OUTDIR=${2:-results/benchmarks}
shift $(($# < 2 ? $# : 2))
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
status=0
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(), "cuda", torch.version.cuda)'
} | tee "$OUTDIR/gpu_info.txt"
if [ "${ELS_GPU_TESTS:-1}" != 0 ]; then  # ELS_GPU_TESTS=0: the benchmark alone
    $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$OUTDIR/gpu_tests.txt"
fi
common=(--device cuda --data "$DATA" --out "$OUTDIR" --name gpu --r2-classes "" "$@")
$PY benchmarks/run_benchmark.py "${common[@]}" --no-samples || status=1
$PY benchmarks/run_benchmark.py "${common[@]}" --no-evals || status=1
exit $status
