#!/usr/bin/env bash
# Makes benches/pytorch/.venv with PyTorch (CPU is all the benchmark uses), numpy and
# safetensors from PyPI, for the PyTorch comparison in `cargo bench --bench models`.
# Not part of CI: the download is large.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet torch numpy safetensors
.venv/bin/python -c "import torch; print('pytorch', torch.__version__)"
