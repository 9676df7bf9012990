#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what a GPU-machine run carries: .whl/ (the Python packages the
# device image lacks: flwr, hydra-core, omegaconf, antlr4 and their needs, for its Python 3.12 on
# x86-64) and .data/fashion-mnist (the four idx files). Both folders are git-ignored here
# (.git/info/exclude) and travel with `carry: [".whl", ".data"]`; together with the tree they must
# stay under the device tool's 64 MiB (measured 2026-12-04: 19 MiB + 30 MiB + 11 MiB tracked).
#   bash benchmarks/gpu_prepare.sh        # then: benchmarks/gpu_fused_table2.sh or gpu_check.sh
# The list was checked against the device image's package list (grpcio, protobuf, click, typer,
# rich, requests, pyyaml, numpy, torch are there); uv (flwr's deployment helper) is left out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pip="${PIP:-.venv/bin/python -m pip}"
for p in /.whl/ /.data/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done
mkdir -p .whl .data/fashion-mnist
wheels=(
  flwr==1.42.0 hydra-core==1.3.8 omegaconf==2.3.1 cryptography==50.0.2 sqlalchemy==2.1.9
  pycryptodome==3.24.1 pydantic-core==2.50.5 setuptools==84.2.1 greenlet==3.5.6
  pydantic==2.14.4 prompt-toolkit==3.0.53 wcwidth==0.9.4 alembic==1.20.1 cffi==2.1.1
  fastapi==0.138.2 mako==1.4.3 starlette==1.3.1 uvicorn==0.49.0 pycparser==3.12
  typing-extensions==4.16.0 grpcio-health-checking==1.81.1 typing-inspection==0.4.5
  tomli==2.5.0 annotated-types==0.8.0 tomli-w==1.2.0 iterators==0.0.2
)
for w in "${wheels[@]}"; do
  # shellcheck disable=SC2086
  $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
done
# antlr4-python3-runtime 4.9.3 (hydra-core's pin) is published as a source package only
if ! ls .whl/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  $pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
fi
src=/usr/share/datasets/fashion-mnist
if [[ ! -d "$src" ]]; then
  echo "Fashion-MNIST missing: apt-get update && apt-get install dataset-fashion-mnist" >&2
  exit 1
fi
cp "$src"/*-ubyte* .data/fashion-mnist/
du -sh .whl .data
