#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU and CuPy:
# tests/test_gpu.py, then benchmarks/bench_gpu.py. Logs go to the folder
# given as the first argument (default gpu-checks/).
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [SIZE_GVOXEL] [REPEAT]
#
# A failed test run is repeated on the failed tests alone with library
# warnings ignored, which tells failures of our code from warnings that a
# newer library raises (the test configuration turns warnings into errors).
set -u
out=${1:-gpu-checks}
size=${2:-0.54}
repeat=${3:-3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 - <<'PY'
import importlib, platform
names = ["numpy", "scipy", "skimage", "sklearn", "numba", "cupy", "zarr", "dask", "nanoseg"]
print("python", platform.python_version(), "; ".join(f"{n} {importlib.import_module(n).__version__}" for n in names))
PY
    nproc
} 2>&1 | tee "$out/device.txt"

timeout 240 python3 -m pytest -q --tb=short -rfEs tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
status=${PIPESTATUS[0]}
if [ "$status" != 0 ]; then
    timeout 90 python3 -m pytest -q --tb=line --lf -W ignore::DeprecationWarning -W ignore::FutureWarning \
        -W ignore::PendingDeprecationWarning tests/test_gpu.py 2>&1 | tail -30 | tee "$out/test_gpu_rerun.log"
fi

timeout 200 python3 benchmarks/bench_gpu.py --size "$size" --repeat "$repeat" --json "$out/bench_gpu.json" \
    2>&1 | tee "$out/bench_gpu.log"
echo "test_gpu exit status: $status" | tee -a "$out/device.txt"
