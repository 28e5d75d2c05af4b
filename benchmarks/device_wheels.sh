#!/usr/bin/env bash
# The wheels that this workplace's GPU machine lacks for benchmarks/gpu_suite.sh --tests, downloaded here into
# .whl/ (git-ignored) for its Python 3.12, at the versions installed here (the ones CI tests). The image
# already holds torch, torchvision, lightning, torchmetrics, timm, pytest, hypothesis, numpy, Pillow and
# filelock (the device tool's KINDS.md); Lightning travels too, because the app needs >= 2.6.
#
#   bash benchmarks/device_wheels.sh [PYTHON_VERSION]   # default 3.12; then see gpu_suite.sh's header
#
# gpu_suite.sh installs them itself (into a folder it puts first on PYTHONPATH), then the project, editable
# and without build isolation: the image's setuptools and wheel build it, so neither travels here.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
wheels=()
for name in hydra-core omegaconf backpack-for-pytorch unfoldnd kornia kornia_rs lightning; do
    wheels+=("$name==$(version "$name")")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
# Hydra's parser runtime is published as a source archive only: a pure-Python wheel built here.
python -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -1 .whl
du -sh .whl
