"""Bake a dense weight update into a LoRA of a chosen rank (truncated SVD per layer), for tools that read
LoRAs: shared by the methods that are not low-rank (SaRA, SODA)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from studio.adapters.base import AdapterError, AdapterFile, read_adapter, save_adapter, thin_svd
from studio.adapters.lora.config import LoraConfig


def read_for_bake(path: str | Path, method: str, rank: int) -> AdapterFile:
    """The adapter file at `path`, refused unless it is a `method` adapter and `rank` is valid."""
    file = read_adapter(path)
    if file.method != method:
        raise AdapterError(f"{Path(path).name} is a {file.method} adapter, not {method}")
    if rank < 1:
        raise AdapterError(f"bake rank must be at least 1, got {rank}")
    return file


def baked_path(path: str | Path, rank: int, out: str | Path | None) -> Path:
    path = Path(path)
    return Path(out) if out else path.with_name(f"{path.stem}_lora{rank}.safetensors")


def bake_deltas(deltas: dict[str, tuple[torch.Tensor, tuple[int, ...]]], rank: int, out: Path, base: dict,
                source: str) -> tuple[Path, float]:
    """`deltas`: layer key (`unet.<path>`) -> (ΔW as rows × cols, the weight's shape). Writes the LoRA file
    and returns (path, relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F over all layers together)."""
    if rank < 1:
        raise AdapterError(f"bake rank must be at least 1, got {rank}")
    tensors, ranks, residual, norm = {}, {}, 0.0, 0.0
    for layer, (delta, shape) in sorted(deltas.items()):
        rows, cols = shape[0], math.prod(shape[1:])
        u, s, vh = thin_svd(delta.reshape(rows, cols))
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        lora_b, lora_a = u[:, :r] * root, root[:, None] * vh[:r]
        residual += float(s[r:].square().sum())
        norm += float(s.square().sum())
        kernel = tuple(shape[2:])
        fan_in = (shape[1], *kernel) if kernel else (cols,)
        tensors[f"{layer}.lora_A.weight"] = lora_a.reshape(r, *fan_in).contiguous()
        tensors[f"{layer}.lora_B.weight"] = lora_b.reshape(rows, r, *((1,) * len(kernel))).contiguous()
        ranks[layer] = r
    error = math.sqrt(residual / norm) if norm else 0.0
    config = LoraConfig(rank=rank, alpha=float(rank), target_modules=[],
                        alpha_pattern={layer: float(r) for layer, r in ranks.items() if r != rank})
    save_adapter(out, "lora", config, tensors, base, {"baked_from": source, "bake_relative_error": f"{error:.6f}"})
    return out, error
