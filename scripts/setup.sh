#!/usr/bin/env bash
# Set up ./.venv with geosurge (editable) and its toolkit + test extras. Idempotent; safe to re-run.
# torch is pinned inside the toolkit extra, in the same install as timm/transformers/geoclip (see docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.geosurge-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import geosurge, torch" 2>/dev/null; then
  echo "[setup] .venv is up to date"
  exit 0
fi
echo "[setup] installing geosurge[toolkit,test] (first time: a few minutes)"
# pip's notes about unused local index folders on some machines are noise; real errors still show.
.venv/bin/python -m pip install --disable-pip-version-check -q -e '.[toolkit,test]' \
  2> >(grep -v -e 'is ignored: it is neither a file nor a directory' >&2)
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, onnxruntime, geosurge; print("geosurge", geosurge.__version__, "| torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)')"
