#!/usr/bin/env bash
# The GPU checks as one prepared command, for a session that is lent a GPU machine (its
# device time is short: this is sized to run in ~8 minutes and leave time to rerun it).
#
# On that machine python3 already holds a CUDA PyTorch, pytest and hypothesis; TorchDEQ is
# not there and travels as a wheel. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl torchdeq==0.1.0
# then run, through the device tool, with carry [".whl"] and timeout_s 590:
#   bash benchmarks/gpu_check.sh
# Results land in $OUT (the tool's folder that comes back) or benchmarks/results/gpu.
# 1. the CUDA tests (pytest -m cuda; the sync-debug test among them);
# 2. the per-step-cost sweep on the GPU against TorchDEQ (overhead_cuda.md);
# 3. the capture path (CUDA graphs) at the issue's point, batch 256 x width 512;
# 4. the equilibrium benchmark on the GPU (equilibrium_cuda.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${OUT:-benchmarks/results/gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$DEST/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$DEST/gpu.txt"

status=0
timeout 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$DEST/cuda_tests.log"
status=$((status | $?))
timeout 120 $PY benchmarks/overhead_bench.py --device cuda --repeats 3 \
    --batches 1,8,64,256,1024 --widths 128,512,2048 --output "$DEST/overhead_cuda.md" 2>&1 \
    | tail -n 20
status=$((status | $?))
timeout 200 $PY benchmarks/overhead_bench.py --device cuda --repeats 3 --capture \
    --points 256x512 --output "$DEST/overhead_cuda_capture.md" 2>&1 | tail -n 8
status=$((status | $?))
timeout 90 $PY benchmarks/equilibrium_bench.py --device cuda --quick 2>&1 | tail -n 20
status=$((status | $?))
cp benchmarks/results/equilibrium_cuda.md "$DEST/" 2>/dev/null
exit $status
