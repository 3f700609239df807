#!/usr/bin/env bash
# Prepare .gpu_wheels/ (git-ignored) for scripts/gpu_check.sh on a lent GPU machine, which has torch, transformers and
# accelerate but not deepspeed or datasets, and cannot download: their wheels (pure Python; deepspeed builds its ops
# there at first use) and SmolLM2-135M's config.json + tokenizer (the teacher's architecture; the weights stay here).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
W=.gpu_wheels
mkdir -p "$W"
rm -f "$W"/*.whl
pip wheel -q --no-deps -w "$W" deepspeed==0.19.8 datasets==5.2.0 2>&1 | grep -v "^WARNING: Location" || true
# the GPU image's python3 is 3.12 (device tool's KINDS.md): multiprocess ships per-version wheels
pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" -d "$W" \
  dill==0.4.1 multiprocess==0.70.19 2>&1 | grep -v "^WARNING: Location" || true
python - <<'PY'
import os, shutil
from kd_engine.models.loading import offline_model_path
src, dst = offline_model_path("smollm2-135m"), ".gpu_wheels/smollm2"
os.makedirs(dst, exist_ok=True)
for name in os.listdir(src):
    if not name.endswith((".safetensors", ".bin")):
        shutil.copy(os.path.join(src, name), dst)
print("wrote", dst, sorted(os.listdir(dst)))
PY
du -sh "$W"
