"""B6 (`studio bench train`): training step time and peak memory per method, side by side, on the embedded
model, on a UNet of SD 1.5's exact architecture (random weights, 32x32 latents, batch 1, fp32), on SDXL's (random
weights, 64x64 latents, batch 1, gradient checkpointing, its pooled prompt and size ids) and on SD3-medium's
exact transformer (random weights, 64x64 latents, batch 1, fp32, gradient checkpointing, the flow-matching loss).
Each (model, method) runs in its own process so that peak memory is its own."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any
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
# SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), built with random weights
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
# SD3-medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json)
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
# Flux.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json): 11.9 B parameters, too large to
# train on this machine, so its table is computed from counts
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
SETUPS = {"shapes": {"batch": 4, "latent": 16, "tokens": 32},
          "sd15": {"batch": 1, "latent": 32, "tokens": 77},
          # 512² images: 64² latents, 77 tokens of both encoders side by side
          "sdxl": {"batch": 1, "latent": 64, "tokens": 77, "checkpointing": True},
          # 77 CLIP + 256 T5 tokens, as SD3's pipeline encodes a prompt
          "sd3m": {"batch": 1, "latent": 64, "tokens": 333, "checkpointing": True},
          # 1024² (128² latents, 4096 packed tokens) and 512 T5 tokens: on a GPU only (the device check)
          "flux": {"batch": 1, "latent": 128, "tokens": 512, "checkpointing": True}}


def _denoiser(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    if model in ("sd3m", "flux"):  # built where it runs, in its dtype (Flux in fp32 would be 48 GB)
        torch.manual_seed(0)
        cls, config = ((SD3Transformer2DModel, SD3_MEDIUM_TRANSFORMER) if model == "sd3m"
                       else (FluxTransformer2DModel, FLUX_DEV_TRANSFORMER))
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return cls(**config)
        finally:
            torch.set_default_dtype(default)
    if model == "shapes":
        from studio.loading import load_pipeline

        return load_pipeline("shapes").unet
    if model in ("sd15", "sdxl"):
        torch.manual_seed(0)
        return UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET))
    raise ValueError(f"unknown model {model!r}")


def _trainable(unet, method: str, steps: int) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, Any]:
    """The method's trainable parameters, its optimizer (the engine's AdamW unless the method has its own) and
    (method, pipeline holder) for its loss and after-step hooks ((None, None) for full fine-tuning). The method's
    settings are resolved for a run of `steps` steps, as the engine does (SaRA: re-selection at half of them)."""
    unet.requires_grad_(False)
    if method == "full":
        unet.requires_grad_(True)
        return list(unet.parameters()), torch.optim.AdamW(unet.parameters(), lr=1e-5), (None, None)
    name, _, option = method.partition("-r")
    from studio.adapters import get_method

    impl = get_method(name)
    settings = {"rank": int(option)} if option else {}
    holder = SimpleNamespace(**{"transformer" if "joint_attention_dim" in unet.config else "unet": unet})
    impl.attach(holder, impl.config_class.from_dict(settings).for_run(steps), "bench")
    params = impl.trainable_parameters(holder, "bench")
    optimizer = impl.optimizer(holder, "bench", params, lr=1e-5, weight_decay=0.0)
    return params, optimizer or torch.optim.AdamW(params, lr=1e-5), (impl, holder)


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: str, method: str, steps: int, device: str = "cpu", dtype: str = "fp32") -> dict:
    """One (model, method) in this process: median step time over `steps` after a warm-up, peak memory (the
    process's RSS on the CPU; on a GPU, the most memory torch allocated there)."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    unet = _denoiser(model, device, torch_dtype).to(device, torch_dtype)
    setup = SETUPS[model]
    t = time.perf_counter()
    params, optimizer, (impl, holder) = _trainable(unet, method, steps + 1)
    for p in params:  # trainable parameters stay in fp32 (what mixed-precision training keeps)
        p.data = p.data.float()
    attach_s = time.perf_counter() - t  # SODA's SVDs happen here
    rss_loaded = _peak_mb(device)
    g = torch.Generator().manual_seed(0)
    b, s = setup["batch"], setup["latent"]
    losses = {"sd3m": _flow_loss, "flux": _flux_loss}
    loss_of = losses.get(model, _ddpm_loss)(unet, setup, g)
    if setup.get("checkpointing"):
        unet.enable_gradient_checkpointing()
    unet.train()
    times = []
    for i in range(steps + 1):  # the engine's step: the method's own loss (SaRA: + its nuclear-norm term) and
        t = time.perf_counter()    # its after-step hook (SaRA: frozen entries held, re-selection at its step)
        loss = impl.training_loss(holder, {"step": i + 1}, lambda _: loss_of()) if impl else loss_of()
        loss.backward()
        optimizer.step()
        if impl:
            impl.after_step(holder, "bench", i + 1, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return {"model": model, "method": method, "step_s": statistics.median(times),
            "trainable": sum(p.numel() for p in params), "peak_mb": _peak_mb(device), "loaded_mb": rss_loaded,
            "batch": b, "latent": s, "attach_s": attach_s, "device": device, "dtype": dtype}


def _ddpm_loss(unet, setup: dict, g: torch.Generator):
    from diffusers import DDPMScheduler

    from studio.adapters.prompts import reads_time_ids, unet_conditioning
    from studio.training.engine import denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    b, s = setup["batch"], setup["latent"]
    latents = torch.randn(b, 4, s, s, generator=g)
    text = torch.randn(b, setup["tokens"], unet.config.cross_attention_dim, generator=g)
    conditioning = text
    if reads_time_ids(unet):  # SDXL: the pooled prompt and the size/crop ids of an 8·s-pixel square image
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        conditioning = unet_conditioning(text, torch.randn(b, width, generator=g), 8 * s)
    return lambda: denoising_loss(unet, scheduler, latents, conditioning, torch.randn(latents.shape, generator=g),
                                  torch.randint(0, 1000, (b,), generator=g))


def _flow_loss(transformer, setup: dict, g: torch.Generator):
    """SD3's objective on random latents and prompt states: one σ per sample, the velocity target."""
    from studio.training.objectives import flow_matching_loss

    b, s, cfg = setup["batch"], setup["latent"], transformer.config
    device, dtype = transformer.device, transformer.dtype
    latents = torch.randn(b, cfg.in_channels, s, s, generator=g).to(device, dtype)
    text = torch.randn(b, setup["tokens"], cfg.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g).to(device, dtype)

    def loss():
        sigmas = torch.rand(b, generator=g).to(device, dtype)
        noise = torch.randn(latents.shape, generator=g).to(device, dtype)
        return flow_matching_loss(lambda noisy: transformer(hidden_states=noisy, timestep=sigmas * 1000,
                                                            encoder_hidden_states=text, pooled_projections=pooled
                                                            ).sample, latents, noise, sigmas)

    return loss


def _flux_loss(transformer, setup: dict, g: torch.Generator):
    """Flux's objective on random 16-channel latents, through the Flux family's own packed prediction (position
    ids, guidance 3.5, the VAE's 8× scale)."""
    from studio.adapters.denoise import packed_prediction
    from studio.training.objectives import flow_matching_loss

    b, s, cfg = setup["batch"], setup["latent"], transformer.config
    device, dtype = transformer.device, transformer.dtype
    latents = torch.randn(b, cfg.in_channels // 4, s, s, generator=g).to(device, dtype)
    inputs = {"encoder_hidden_states": torch.randn(b, setup["tokens"], cfg.joint_attention_dim, generator=g).to(
                  device, dtype),
              "pooled_projections": torch.randn(b, cfg.pooled_projection_dim, generator=g).to(device, dtype),
              "txt_ids": torch.zeros(setup["tokens"], 3, device=device, dtype=dtype)}

    def loss():
        sigmas = torch.rand(b, generator=g).to(device, dtype)
        noise = torch.randn(latents.shape, generator=g).to(device, dtype)
        return flow_matching_loss(lambda noisy: packed_prediction(transformer, noisy, sigmas * 1000, inputs, 3.5, 8),
                                  latents, noise, sigmas)

    return loss


def bench_train(models: list[str], methods: list[str], steps: int = 5, write: bool = True, device: str = "cpu",
                dtype: str = "fp32") -> str:
    from studio.bench.recorder import record

    rows = []
    for model in models:
        results = []
        for method in methods:
            command = [sys.executable, "-m", "studio.bench.train_cost", model, method, str(steps), device, dtype]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
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
    where = "fp32" if device == "cpu" else f"{dtype}, {device}, peak = torch's most allocated"
    return record(f"B6 training cost ({steps} steps after a warm-up, AdamW, {where})", header, rows, write=write)


COMPUTED = {"flux": (FLUX_DEV_TRANSFORMER, 4096 + 512, 57), "sd3m": (SD3_MEDIUM_TRANSFORMER, 1024 + 333, 24)}
GB = 1024 ** 3


def _meta_transformer(model: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if model == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        return cls(**COMPUTED[model][0])


def _trainable_count(model: str, method: str) -> int:
    """Trainable parameters of `method` on `model`'s transformer, attached on the meta device (no weights);
    SaRA's count is its budget of the targeted weights (its selection reads weight values)."""
    from studio.adapters import get_method
    from studio.adapters.sara.config import parse_budget

    transformer = _meta_transformer(model)
    if method == "full":
        return sum(p.numel() for p in transformer.parameters())
    name, _, option = method.partition("-r")
    impl = get_method(name)
    config = impl.config_class.from_dict({"rank": int(option)} if option else {})
    if name == "sara":
        linear = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Linear))
        return parse_budget(config.budget, linear)
    holder = SimpleNamespace(transformer=transformer)
    impl.attach(holder, config, "bench")
    return sum(p.numel() for p in impl.trainable_parameters(holder, "bench"))


def computed_cost(model: str, method: str) -> dict:
    """Memory of one training step at batch 1, 1024² (Flux: 4096 image + 512 text tokens; SD3-medium at 512²:
    1024 + 333), bf16 weights, fp32 trainable parameters with their gradient and AdamW's two moments (16 bytes
    each; full fine-tuning: bf16 weight + bf16 gradient + fp32 moments and master copy, 16 bytes), SaRA's int32
    index per trained weight, and gradient-checkpointed activations: each block's bf16 input kept plus one
    block's recomputed internals (about 20 hidden-state-sized tensors)."""
    config, tokens, blocks = COMPUTED[model]
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    total = sum(p.numel() for p in _meta_transformer(model).parameters())
    trainable = _trainable_count(model, method)
    weights = 2 * total / GB
    state = 16 * trainable / GB + (4 * trainable / GB if method == "sara" else 0.0)
    if method == "full":
        weights, state = 0.0, 16 * total / GB
    activations = tokens * hidden * 2 * (blocks + 20) / GB
    return {"model": model, "method": method, "total": total, "trainable": trainable, "weights_gb": weights,
            "state_gb": state, "activations_gb": activations, "sum_gb": weights + state + activations}


def bench_train_computed(models: list[str], methods: list[str], write: bool = True) -> str:
    from studio.bench.recorder import record

    rows = []
    for model in models:
        for method in methods:
            r = computed_cost(model, method)
            rows.append([model, method, f"{r['total']:,}", f"{r['trainable']:,}", f"{r['weights_gb']:.1f}",
                         f"{r['state_gb']:.2f}", f"{r['activations_gb']:.2f}", f"{r['sum_gb']:.1f}",
                         "yes" if r["sum_gb"] <= 24 else "no"])
    header = ["model", "method", "parameters", "trainable", "weights (GB, bf16)", "trainable state (GB)",
              "activations (GB, checkpointed)", "total (GB)", "fits 24 GB"]
    return record("B6 training memory, computed from parameter and activation counts (not measured)", header, rows,
                  write=write)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:6])))
