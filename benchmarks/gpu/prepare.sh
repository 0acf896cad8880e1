#!/usr/bin/env bash
# Preparation of the GPU run (benchmarks/gpu/README.md), on a machine with pip access:
#
#   bash benchmarks/gpu/prepare.sh
#
# 1. copies the four Fashion-MNIST files into benchmarks/gpu/data/fashion-mnist (git ignores it; the run carries it);
# 2. downloads the wheels pd_core needs that the device image lacks into benchmarks/gpu/.whl (ignored; carried):
#    pydantic and its own requirements, for CPython 3.12 on x86-64 (the device's python3).
# FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist) is where the files come from; PYTHON
# (default python3) must have pip.
set -euo pipefail
cd "$(dirname "$0")"
src=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
mkdir -p data/fashion-mnist
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  if [ ! -f "$src/$f" ]; then
    echo "prepare.sh: $src/$f is missing; install dataset-fashion-mnist or set FASHION_MNIST_DIR" >&2
    exit 2
  fi
  cp "$src/$f" data/fashion-mnist/
done
rm -rf .whl
mkdir .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
ls -l data/fashion-mnist .whl
du -sh data .whl
