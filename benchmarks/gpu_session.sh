#!/usr/bin/env bash
# The GPU checks in one call of the device machine (a CUDA host without network): the wheels in
# .whl that the host lacks installed beside its Python, then the CUDA lane (tests/test_cuda.py) and
# benchmarks/gpu.py into WORK. WORK outlives the call while the machine stays warm, so calling
# again continues what the time limit cut off (gpu.py keeps its finished sections). Every result
# is written to $OUT (the folder that comes back) as it is made, so a call cut short still brings
# back what it finished.
#
#   bash benchmarks/gpu_session.sh [WORK] [SECONDS]   # the device call's command, carrying .whl;
#                                                     # SECONDS: the call's timeout_s less 30 (570)
#   GPU_ARGS=--quick OUT=/tmp/back bash benchmarks/gpu_session.sh /tmp/w 900   # a check on a CPU
#
# .whl (ignored by git) is what benchmarks/gpu_kit.sh builds here: cp312 wheels, the BERT tokenizer
# (.whl/py) and the shards' photographs (.whl/photos).
set -u
WORK=${1:-/tmp/flava-gpu}
LIMIT=${2:-570}  # seconds this call may use: the device allows at most 600 a command
BACK=${OUT:-$WORK/back}
mkdir -p "$WORK" "$BACK"
if [ ! -f .whl/needs.txt ]; then
  echo "gpu_session: .whl is missing: run bash benchmarks/gpu_kit.sh before the call and carry .whl" \
    | tee "$BACK/gpu.txt"
  exit 2
fi
mkdir -p /tmp/site
if [ ! -f /tmp/site/.installed ]; then
  # A wheel for each module the host cannot import (its own builds stay).
  missing=$(python3 - <<'EOF'
import importlib, pathlib

for line in pathlib.Path(".whl/needs.txt").read_text().splitlines():
    module, dist = line.split()
    try:
        importlib.import_module(module)
    except Exception:
        wheels = sorted(pathlib.Path(".whl").glob(dist.replace("-", "_").lower() + "-*.whl"))
        print(wheels[0] if wheels else f"no-wheel-for-{dist}")
EOF
)
  echo "installing: ${missing:-nothing}" | tee "$BACK/install.txt"
  installed=0
  if [ -n "$missing" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $missing \
      >"$WORK/pip.txt" 2>&1
    installed=$?
    tail -5 "$WORK/pip.txt" | tee -a "$BACK/install.txt"
  fi
  [ "$installed" -eq 0 ] && touch /tmp/site/.installed  # else the next call tries again
fi
export PYTHONPATH="$PWD/src:/tmp/site:$PWD/.whl/py${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; nproc; } \
  | tee "$WORK/gpu.txt" >"$BACK/gpu.txt"
if [ ! -f "$WORK/cuda_lane.done" ]; then
  # Its own process group, signalled by hand: a test inside a flava command takes the first
  # signal as a graceful stop and pytest goes on (so timeout's one signal did not end the lane),
  # a second SIGINT 5 s later stops at once (pytest then prints its summary), and SIGKILL 10 s
  # after that ends what still runs. -v names each test as it starts and faulthandler prints a
  # hung one's stack, so a cut-off lane still says where it was; tee -i outlives the SIGINTs.
  # A lane cut off by an earlier call's limit goes on without the tests that passed then.
  lane=$((LIMIT / 3))
  passed=$(grep -o '^tests/test_cuda.py::[^ ]* PASSED' "$WORK/cuda_lane.txt" 2>/dev/null | sed 's/ PASSED$//')
  export LANE_SKIP=$(for t in $passed; do printf -- '--deselect %s ' "$t"; done)
  [ -n "$passed" ] && echo "the lane goes on: $(echo "$passed" | wc -l) test(s) passed in an earlier call" \
    | tee -a "$WORK/cuda_lane.txt" "$BACK/cuda_lane.txt"
  setsid bash -c 'set -o pipefail; python3 -m pytest -m cuda tests/test_cuda.py -v --tb=short $LANE_SKIP \
    -o faulthandler_timeout=90 -p no:cacheprovider 2>&1 | tee -i -a "$0" "$1"' "$WORK/cuda_lane.txt" \
    "$BACK/cuda_lane.txt" &
  pid=$!
  waited=0
  while kill -0 "$pid" 2>/dev/null; do
    case $waited in
      "$lane"|"$((lane + 5))") kill -INT -- -"$pid" 2>/dev/null ;;
      "$((lane + 15))") kill -KILL -- -"$pid" 2>/dev/null ;;
    esac
    sleep 1
    waited=$((waited + 1))
  done
  wait "$pid"
  # Done when its tests ran (passed or failed; 5: every one had passed in an earlier call), not
  # when it was cut off or could not start.
  case $? in 0|1|5) touch "$WORK/cuda_lane.done" ;; esac
fi
left=$((LIMIT - SECONDS))
if [ "$left" -gt 30 ]; then
  deadline=$(($(date +%s) + left))
  # gpu.py ends its commands 15 s before the deadline itself; -k bounds gpu.py alone.
  timeout -k 10 "$left" python3 benchmarks/gpu.py "$WORK" --back="$BACK" --deadline="$deadline" ${GPU_ARGS:-} \
    2>&1 | tee -a "$WORK/gpu_log.txt" "$BACK/gpu_log.txt"
fi
echo "gpu_session: $SECONDS s; results in $BACK"
