#!/usr/bin/env bash
# Device run of the shapes-v2 issue: the unet stage of world v2 on one GPU, continuing from the committed kept
# weights (checkpoints/shapes-v2/base), then B1 on the result with the v2 judge. Sized for under 9 minutes on an
# H100 (about 1.5 min rendering 48,000 images on 16 cores, 5 min of training in bf16 at batch 128, under 1 min of B1),
# so one call fits the 10-minute limit and a second try fits the session's 15 minutes of device time.
#
# The device machine has torch, transformers, peft and accelerate but not diffusers, and no network. Here, once:
#     mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: diffusers==0.42.1 -d .whl
# then there, from the repository root, carrying .whl (timeout_s 570):
#     bash scripts/device/pretrain_v2.sh
# What comes back under $OUT: base.tar (the new kept weights: `tar -xf base.tar -C checkpoints/shapes-v2` here,
# then commit), b1.md (B1's table, for docs/world-v2.md and docs/benchmarks-log.md), pretrain.log, report.json.
# A dry run on this CPU checks the plumbing (a few minutes; it ran to the kept weights on 2026-12-07):
#     DEVICE=cpu MINUTES=0.5 IMAGES=512 BATCH=8 N=16 OUT=/tmp/pv2 PY=.venv/bin/python bash scripts/device/pretrain_v2.sh
set -euo pipefail
root="$(pwd)"
DEVICE="${DEVICE:-cuda}" MINUTES="${MINUTES:-5}" IMAGES="${IMAGES:-48000}" BATCH="${BATCH:-128}"
LR="${LR:-0.0003}" N="${N:-256}" PY="${PY:-python3}" OUT="${OUT:-/tmp/pretrain_v2_out}"
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="$root":/tmp/site
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
export PYTHONUNBUFFERED=1
work=/tmp/pretrain_v2_run
rm -rf "$work" "$OUT/base"
overrides=$(printf '{"world": 2, "init_from": "%s", "keep_to": "%s", "unet_images": %s, "unet_steps": 1000000, "unet_batch": %s, "unet_lr": %s, "unet_warmup": 200, "unet_minutes": %s, "layout_fraction": 0.25, "unet_checkpoint_every": 1000000}' \
    "$root/checkpoints/shapes-v2/base" "$OUT/base" "$IMAGES" "$BATCH" "$LR" "$MINUTES")
timeout 480 "$PY" -m studio.cli pretrain --out "$work" --stages unet --device "$DEVICE" --overrides "$overrides" \
    2>&1 | tee "$OUT/pretrain.log"
cp "$work/pretrain_report_unet.json" "$OUT/report.json"
tar -cf "$OUT/base.tar" -C "$OUT" base && rm -rf "$OUT/base"
timeout 80 "$PY" -m studio.cli eval --model "$work/shapes" --judge "$root/checkpoints/shapes-v2/judge.safetensors" \
    --n "$N" --steps 25 --guidance 5 --errors 3 --device "$DEVICE" --dtype fp32 --no-write 2>&1 | tee "$OUT/b1.md"
