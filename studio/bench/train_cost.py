"""B6 (`studio bench train`): training step time and peak memory per method, side by side, on the embedded
model and on a UNet of SD 1.5's exact architecture (random weights, 32x32 latents, batch 1, fp32).
Each (model, method) runs in its own process so that peak memory is its own."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

# `studio bench train` without --methods: the whole UNet against LoRAs of two ranks
DEFAULT_METHODS = ("full", "lora-r4", "lora-r16")

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), built with random weights
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SETUPS = {"shapes": {"batch": 4, "latent": 16, "tokens": 32},
          "sd15": {"batch": 1, "latent": 32, "tokens": 77}}


def _unet(model: str):
    from diffusers import UNet2DConditionModel

    if model == "shapes":
        from studio.loading import load_pipeline

        return load_pipeline("shapes").unet
    if model == "sd15":
        torch.manual_seed(0)
        return UNet2DConditionModel(**SD15_UNET)
    raise ValueError(f"unknown model {model!r}")


def _trainable(unet, method: str) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """The method's trainable parameters and its optimizer (the engine's AdamW unless the method has its own)."""
    unet.requires_grad_(False)
    if method == "full":
        unet.requires_grad_(True)
        return list(unet.parameters()), torch.optim.AdamW(unet.parameters(), lr=1e-5)
    name, _, option = method.partition("-r")
    from studio.adapters import get_method

    impl = get_method(name)
    settings = {"rank": int(option)} if option else {}
    holder = SimpleNamespace(unet=unet)
    impl.attach(holder, impl.config_class.from_dict(settings), "bench")
    params = impl.trainable_parameters(holder, "bench")
    optimizer = impl.optimizer(holder, "bench", params, lr=1e-5, weight_decay=0.0)
    return params, optimizer or torch.optim.AdamW(params, lr=1e-5)


def measure(model: str, method: str, steps: int) -> dict:
    """One (model, method) in this process: median step time over `steps` after a warm-up, peak memory."""
    from diffusers import DDPMScheduler

    from studio.training.engine import denoising_loss

    unet = _unet(model)
    setup = SETUPS[model]
    t = time.perf_counter()
    params, optimizer = _trainable(unet, method)
    attach_s = time.perf_counter() - t  # SODA's SVDs happen here
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    b, s = setup["batch"], setup["latent"]
    latents = torch.randn(b, 4, s, s, generator=g)
    text = torch.randn(b, setup["tokens"], unet.config.cross_attention_dim, generator=g)
    unet.train()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = denoising_loss(unet, scheduler, latents, text, torch.randn(latents.shape, generator=g),
                              torch.randint(0, 1000, (b,), generator=g))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return {"model": model, "method": method, "step_s": statistics.median(times),
            "trainable": sum(p.numel() for p in params),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_mb": rss_loaded,
            "batch": b, "latent": s, "attach_s": attach_s}


def bench_train(models: list[str], methods: list[str], steps: int = 5, write: bool = True) -> str:
    from studio.bench.recorder import record

    rows = []
    for model in models:
        results = []
        for method in methods:
            proc = subprocess.run([sys.executable, "-m", "studio.bench.train_cost", model, method, str(steps)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                killed = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else "no output"
                tail = (proc.stderr.strip().splitlines() or [killed])[-1]
                results.append({"model": model, "method": method, "error": tail})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        full = next((r for r in results if r["method"] == "full" and "error" not in r), None)
        for r in results:
            if "error" in r:
                rows.append([model, r["method"], "failed: " + r["error"][:80], "", "", "", "", "", ""])
                continue
            ratio = f"{r['step_s'] / full['step_s']:.2f}" if full else "-"
            rows.append([model, r["method"], f"{r['batch']}×{r['latent']}²", f"{r['trainable']:,}",
                         f"{r['step_s']:.3f}", ratio, f"{r['peak_mb']:,.0f}", f"{r['peak_mb'] - r['loaded_mb']:,.0f}",
                         f"{r.get('attach_s', 0):.1f}"])
    header = ["model", "method", "batch × latent", "trainable params", "step (s, median)", "vs full",
              "peak RSS (MB)", "training overhead (MB)", "set-up (s)"]
    return record(f"B6 training cost ({steps} steps after a warm-up, AdamW, fp32)", header, rows, write=write)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
