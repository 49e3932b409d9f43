#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU: the CUDA tests, then `muselab bench
# --quick`, whose table lands in docs/PERFORMANCE.md's GPU section. Logs and the JSON go to $OUT
# (default bench/results/gpu). Where the machine's Python has PyTorch but lacks this project's
# other packages, wheels in .whl/ are installed beside it first (bench/README.md says which, and how).
set -u -o pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 MUSELAB_DATA_DIR=/tmp/muselab-data
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, muselab.cli, muselab.bench
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt" || exit 1
# The engine tests place their tiny models on the GPU there (float16), the CUDA graph test included;
# one process each, since a device-side assert ends a process's use of the GPU.
tests_status=0
for file in tests/test_music_engine.py tests/test_image_engine.py; do
  CUDA_LAUNCH_BLOCKING=1 timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider "$file" 2>&1 \
    | tee -a "$OUT/pytest.log" || tests_status=1
done
# Inpainting, outpainting, hires fix and prompt weights on the GPU, then timed on full-size SD 1.x.
timeout "${EDITS_TIMEOUT:-300}" python3 bench/gpu_edits.py 2>&1 | tee "$OUT/edits.log" || tests_status=1
timeout "${BENCH_TIMEOUT:-420}" python3 -m muselab bench --quick --json bench/results/gpu.json \
  --docs docs/PERFORMANCE.md 2>&1 | tee "$OUT/bench.log"
status=$?
cp bench/results/gpu.json docs/PERFORMANCE.md "$OUT/" 2>/dev/null
# The bench runs whatever the tests said (its table is worth having), but a failed test fails the run.
[ "$status" -ne 0 ] && exit "$status"
exit "$tests_status"
