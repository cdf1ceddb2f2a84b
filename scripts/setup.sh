#!/usr/bin/env bash
# Create (or reuse) .venv with distcl and its dev extras, and make sure Fashion-MNIST is
# present. Idempotent: a second run only checks. Python >= 3.10 (3.11 tested).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.distcl-installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing distcl[dev] into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch/torchvision pinned to the pair known to install offline on Python 3.11 here;
  # elsewhere pip resolves the ranges in pyproject.toml.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null \
    || echo "[setup] torch 2.14.1 not available here; using pyproject's range"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# The MLflow tracking server that the tracking tests start (full mlflow, in a venv of its
# own: its pins would downgrade pyarrow and cryptography in .venv; distcl itself needs only
# the client, distcl[tracking] = mlflow-skinny).
MLVENV=${MLFLOW_VENV:-.venv-mlflow}
if [ ! -x "$MLVENV/bin/mlflow" ]; then
  echo "[setup] installing an MLflow tracking server into $MLVENV (for the tests)"
  "$PYTHON" -m venv "$MLVENV"
  "$MLVENV/bin/python" -m pip install -q "mlflow>=3.17,<3.18"
fi
# Real data: Debian's dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist).
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ -z "${DISTCL_FASHION_MNIST:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing dataset-fashion-mnist with apt-get"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST not found and apt is not available: put the four IDX files"
    echo "        (train-images-idx3-ubyte.gz, ...) in a folder and pass"
    echo "        --set data.root=/that/folder (tests that need it are skipped)."
  fi
fi
echo "[setup] ready: $VENV/bin/distcl"
