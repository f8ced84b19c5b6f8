#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv: torch, Ray, MLflow, webdataset,
# the S3 server binary and the package itself (editable). Idempotent; ~1-5 minutes on a fresh machine.
#
# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build. On a machine with GPUs,
# install the CUDA build of torch into .venv first (TORCH_SPEC="torch==2.13.0" with the index of your
# CUDA version) or set TORCH_SPEC to what you need.
#   --test   also installs what the tests need beyond Python: Debian's chromium (for the MLflow UI test).
set -euo pipefail
cd "$(dirname "$0")/.."
pipq() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pipq --upgrade pip
pipq "$TORCH_SPEC"
pipq -e ".[dev]"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium for the MLflow UI test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "WARNING: could not install chromium; the MLflow UI test will fail" >&2
fi
.venv/bin/python -c "import torch, ray, mlflow, webdataset, pipeline; print(f'environment ready: torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}')"
