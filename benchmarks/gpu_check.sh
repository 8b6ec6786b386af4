#!/usr/bin/env bash
# CUDA (and TensorRT, where present) provider path of the runtime on a GPU box: 2048^2 images/s.
#
# Run from the repository root on the GPU machine, with what it lacks carried in `.gpu/` (ignored by
# git; 64 MiB at most per device call):
#   .gpu/whl/*.whl   wheels the box lacks: onnxruntime-gpu (a CUDA build matching the box's CUDA),
#                    faiss-cpu, pydantic, pydantic-core (download commands: /work/.library/device/README.md)
#   .gpu/bundle/     a 2048^2 bundle (e.g. `hiad-export models/demo/checkpoint --out .gpu/bundle --precision fp32`)
#   .gpu/image.png   one 2048^2 test image (data/elpv/test/defect/module_005.png)
# Prints the providers ONNX Runtime offers there, then per provider found: stage medians and images/s.
#
# On this workplace's lent GPU machines it cannot run as is: their image has the CPU onnxruntime and
# CUDA 13 libraries, and the onnxruntime-gpu 1.31.1 wheel alone is 256 MB (CUDA 12 build) against a
# 64 MiB carry limit; the script then stops at the provider check and says why. Use a box with
# `pip install 'hiad-deploy[gpu]'` done (it needs no .gpu/whl then).
set -u
REPEAT=${REPEAT:-20}
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 - <<'PY' || exit 1
import onnxruntime as ort
offered = ort.get_available_providers()
print("onnxruntime", ort.__version__, "offers", offered)
if "CUDAExecutionProvider" not in offered:
    raise SystemExit("no CUDAExecutionProvider in this onnxruntime build: carry an onnxruntime-gpu wheel in .gpu/whl")
PY
for engine_providers in "CUDAExecutionProvider" "TensorrtExecutionProvider"; do
  python3 - "$engine_providers" "$REPEAT" <<'PY'
import sys, time
import numpy as np
import onnxruntime as ort
from hiad_runtime.bundle import Bundle
from hiad_runtime.image import load_image
from hiad_runtime.inspector import Inspector

provider, repeat = sys.argv[1], int(sys.argv[2])
if provider not in ort.get_available_providers():
    print(f"{provider}: not in this build, skipped"); raise SystemExit(0)
try:
    inspector = Inspector(Bundle.load(".gpu/bundle"), providers=[provider, "CPUExecutionProvider"], batch_size=16)
except Exception as e:  # e.g. TensorRT libraries missing
    print(f"{provider}: cannot start ({e})"); raise SystemExit(0)
image = load_image(".gpu/image.png")
for _ in range(3):
    inspector.predict(image)
stages = {"backbone": [], "scoring": [], "total": []}
t_start = time.perf_counter()
for _ in range(repeat):
    t = time.perf_counter(); r = inspector.predict(image); stages["total"].append(time.perf_counter() - t)
    stages["backbone"].append(r.timings["backbone"]); stages["scoring"].append(r.timings["scoring"])
wall = time.perf_counter() - t_start
print(f"{provider} (in use: {inspector.providers_in_use}), embedder {inspector.precision}, {len(inspector.tiling.tiles)} tiles: "
      + ", ".join(f"{k} {np.median(v) * 1000:.1f} ms" for k, v in stages.items()) + f"; {repeat / wall:.2f} images/s")
PY
done
