"""Bake a SaRA update into a LoRA of a chosen rank (truncated SVD per layer), for tools that read LoRAs."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from studio.adapters.base import AdapterError, read_adapter, save_adapter
from studio.adapters.lora.config import LoraConfig
from studio.kernels.sparse_delta import SparsePattern, dense_delta


def bake_to_lora(path: str | Path, rank: int, out: str | Path | None = None) -> tuple[Path, float]:
    """Write `path` (a SaRA file) as a LoRA file of `rank`; returns (LoRA path, relative error), the error
    being ‖ΔW − B·A‖_F / ‖ΔW‖_F over all layers together."""
    path = Path(path)
    file = read_adapter(path)
    if file.method != "sara":
        raise AdapterError(f"{path.name} is a {file.method} adapter, not SaRA")
    if rank < 1:
        raise AdapterError(f"bake rank must be at least 1, got {rank}")
    tensors, ranks, residual, norm = {}, {}, 0.0, 0.0
    for key in sorted(k for k in file.tensors if k.endswith(".indices")):
        layer = key[:-len(".indices")]
        if f"{layer}.shape" not in file.tensors:
            raise AdapterError(f"{path.name} does not record the shape of {layer}")
        shape = tuple(file.tensors[f"{layer}.shape"].tolist())
        rows, cols = shape[0], math.prod(shape[1:])
        delta = dense_delta(file.tensors[f"{layer}.values"].float(), SparsePattern(file.tensors[key].long(), (rows, cols)))
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        lora_b, lora_a = u[:, :r] * root, root[:, None] * vh[:r]
        residual += float(s[r:].square().sum())
        norm += float(s.square().sum())
        kernel = tuple(shape[2:])
        tensors[f"{layer}.lora_A.weight"] = lora_a.reshape(r, *((shape[1], *kernel) if kernel else (cols,))).contiguous()
        tensors[f"{layer}.lora_B.weight"] = lora_b.reshape(rows, r, *((1,) * len(kernel))).contiguous()
        ranks[layer] = r
    error = math.sqrt(residual / norm) if norm else 0.0
    config = LoraConfig(rank=rank, alpha=float(rank), target_modules=[],
                        alpha_pattern={layer: float(r) for layer, r in ranks.items() if r != rank})
    out = Path(out) if out else path.with_name(f"{path.stem}_lora{rank}.safetensors")
    save_adapter(out, "lora", config, tensors, file.base,
                 {"baked_from": path.name, "bake_relative_error": f"{error:.6f}"})
    return out, error

