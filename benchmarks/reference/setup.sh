#!/usr/bin/env bash
# Create the reference harness's own virtual environment with HiAD 0.2.1 (benchmarks/reference/README.md).
# Usage: benchmarks/reference/setup.sh          (venv at $HIAD_REF_VENV, default benchmarks/reference/.venv)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${HIAD_REF_VENV:-$here/.venv}"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r "$here/requirements.txt"
"$venv/bin/python" -c "import hiad, timm, torch; print('hiad 0.2.1 ready: timm', timm.__version__, 'torch', torch.__version__)"
echo "$venv"
