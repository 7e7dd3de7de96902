#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) on a machine that cannot download: install the wheels carried in
# build/gpu-wheels (`make gpu-wheels` prepares them) into build/gpu-site, then run the check. Results go to
# $OUT/gpu_check.json ($OUT is the device tool's output folder; outputs/gpu-check without it).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${GPU_WHEELS:-build/gpu-wheels}
site=${GPU_SITE:-build/gpu-site}
out=${OUT:-outputs/gpu-check}
if compgen -G "$wheels/*.whl" > /dev/null; then
    python -m pip install --quiet --no-deps --no-index --target "$site" "$wheels"/*.whl
fi
PYTHONPATH="$PWD:$PWD/$site${PYTHONPATH:+:$PYTHONPATH}" python scripts/gpu_check.py --output "$out/gpu_check.json" "$@"
