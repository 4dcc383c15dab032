#!/usr/bin/env bash
# Device check of the diffusion-transformer issue: B6 on SD3-medium's and Flux.1-dev's transformers (random
# weights, real sizes) in bf16 on one GPU, LoRA rank 16 and SaRA, each in its own process, batch 1, gradient
# checkpointing (SD3 at 512², Flux at 1024²). Sized for under 8 minutes on an H200 (4 processes, each building
# its transformer on the GPU and timing 3 steps after a warm-up); not run yet: no session so far had the machine.
#
# The device machine has torch, transformers, peft and accelerate but not diffusers, and no network. Here, once:
#     mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: diffusers==0.42.1 -d .whl
# then run this script there from the repository root, carrying .whl (timeout 540 s leaves room for one rerun):
#     bash scripts/device/dit_b6.sh
# The table is printed and written to $OUT/b6_dit.md; record it in docs/benchmarks-log.md with its command.
set -euo pipefail
root="$(pwd)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$root":/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd /tmp
timeout 480 python3 -m studio.cli bench train --models sd3m,flux --methods lora-r16,sara --steps 3 \
    --device cuda --dtype bf16 --no-write | tee "${OUT:-/tmp}/b6_dit.md"
