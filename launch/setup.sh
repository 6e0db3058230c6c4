#!/usr/bin/env bash
# Create .venv (Python >= 3.10) with the pinned torch pair and clip-train in editable mode, with
# the test (dev) and benchmark (bench) extras: every command in README.md and docs/ works after this.
# Users with their own CUDA torch can skip the pin: pyproject.toml states the supported ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e '.[dev,bench]'
echo "set up .venv: $(.venv/bin/python -c 'import torch, open_clip, accelerate, webdataset; print("torch", torch.__version__, "open_clip", open_clip.__version__, "accelerate", accelerate.__version__, "webdataset", webdataset.__version__)')"
