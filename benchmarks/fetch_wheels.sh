#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the Python 3.12 wheels that benchmarks/gpu_suite.sh installs on
# an accelerator box that has jax (CUDA), flax, optax, orbax, scipy, pillow, huggingface-hub,
# safetensors and protobuf but no network. Run here, where PyPI is reachable:
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
mkdir -p .whl
for pkg in ott-jax==0.6.0 jaxopt==0.8.5 ml_collections==1.1.0 diffusers==0.39.0 grain==0.2.18 \
  array-record==0.8.6 importlib_metadata==10.2.0 lazy-importer==0.1.0 portpicker==1.6.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
ls -l .whl
