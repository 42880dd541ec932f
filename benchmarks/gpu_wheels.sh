#!/usr/bin/env bash
# Here, once before a device call: the wheels that chattune needs and the GPU image lacks
# (its image has torch, transformers, accelerate, tokenizers, safetensors and the rest; see
# benchmarks/gpu_readiness.py), for its Python 3.12 on x86-64, into .whl/ (git ignores it),
# with a copy of the Alpaca rows, since ../shared does not travel. About 48 MB of the 64 MiB
# a call carries. The versions are the ones this project's tests run with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 uvicorn==0.55.0
cp ../shared/data/alpaca_en_demo.json .whl/
du -sh .whl
