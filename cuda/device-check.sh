#!/usr/bin/env bash
# One-call GPU check of ctalign._cuda: build, resource/SASS summary, tests, benchmark.
# Run from the repository root on a machine with a CUDA GPU; logs go to $OUT (default ./gpu-out).
#   CTALIGN_CACHE=... cuda/device-check.sh [gpu_bench.py args...]
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=python
B=build/dev-cuda
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv >"$OUT/smi.txt" 2>&1
start=$(date +%s)
{
  cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCTALIGN_CUDA=ON \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" &&
    cmake --build $B -j 16 --target _cuda && cmake --build $B -j 16 && CUDA=1 tools/dev-build
} >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
for f in grouped range; do
  echo "== $f.cu (sm_90 SASS instruction counts)"
  cuobjdump -sass -arch sm_90 $B/cuda/CMakeFiles/_cuda.dir/$f.cu.o |
    grep -oE "(ATOMS|ATOM|RED|ATOMG)\.[A-Z0-9.]+|LDG\.E\.(128|64)[A-Z.]*|LDS\.128|STS\.128|LDL[.A-Z0-9]*|STL[.A-Z0-9]*|MUFU\.[A-Z0-9]+" |
    sort | uniq -c
done >"$OUT/sass.txt" 2>&1
timeout 200 python3 -m pytest tests/test_cuda.py -q -s -rf >"$OUT/test.log" 2>&1
grep -E "cuda-accuracy|passed|failed|FAILED|Error" "$OUT/test.log" | sed 's/\[cuda-accuracy\] //' | cut -c1-150 | tail -70
timeout 280 python3 benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" "$@" >"$OUT/bench.log" 2>&1
tail -45 "$OUT/bench.log"
