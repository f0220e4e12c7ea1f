#!/usr/bin/env bash
# Create ./.venv with torch, lowrank_fx (editable) and its test and demo extras.
# torch is installed first, from LOWRANK_FX_TORCH (a pip requirement plus options), so
# the later `pip install -e .` finds it and pulls in no other torch build:
#   default (CPU):  LOWRANK_FX_TORCH="torch==2.13.0"
#   NVIDIA GPU:     LOWRANK_FX_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Re-running is cheap: an existing .venv with torch is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_REQ="${LOWRANK_FX_TORCH:-torch==2.13.0}"
EXTRAS="${LOWRANK_FX_EXTRAS:-test,demo}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_REQ" >&2
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_REQ 2> >(grep -v "^WARNING: Location" >&2)
fi
if ! .venv/bin/python -c "import lowrank_fx, transformers, peft, onnxruntime" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.lowrank_fx_installed ]; then
  echo "bootstrap: installing lowrank_fx[$EXTRAS]" >&2
  "${PIP[@]}" install -e ".[$EXTRAS]" 2> >(grep -v "^WARNING: Location" >&2)
  touch .venv/.lowrank_fx_installed
fi
