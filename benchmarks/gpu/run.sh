#!/usr/bin/env bash
# Device script for a CUDA machine: installs nothing, runs the gpu-marked kernel tests and the
# kernel benchmarks (< 10 min on one H100), and writes results under $OUT (default ./out):
#   env.txt, gpu_tests.xml, gpu_tests.log, bench.json (pytest-benchmark), bench_summary.jsonl
#   (one line per shape x implementation: mean_s, tflops, max_err, dcpp_speed_ratio), bench.log
# Usage (repo root): bash benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/dcpp-triton-cache}"
unset TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("triton", "flash_attn", "flash_attn_interface", "flashinfer", "vllm", "pytest_benchmark"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__)
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m gpu \
  --junitxml "$OUT/gpu_tests.xml" -o addopts="-ra" 2>&1 | tee "$OUT/gpu_tests.log" || status=1

rm -f "$OUT/bench_summary.jsonl"
DCPP_BENCH_JSON="$OUT/bench_summary.jsonl" timeout 330 "$PY" -m pytest -q -p no:cacheprovider \
  benchmarks/kernels -o addopts="-ra" --benchmark-enable --benchmark-json "$OUT/bench.json" \
  --benchmark-columns=mean,min,stddev,rounds -s 2>&1 | tee "$OUT/bench.log" || status=1

echo "== summary (dcpp_speed_ratio = time_impl / time_dcpp; >= 1: dcpp at least as fast) =="
cat "$OUT/bench_summary.jsonl" 2>/dev/null || true
exit $status
