"""Bake a dense weight update into a LoRA of a chosen rank (truncated SVD per layer), for tools that read
LoRAs: shared by the methods that are not low-rank (SaRA, SODA)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from studio.adapters.base import AdapterError, thin_svd
from studio.adapters.files import AdapterFile, read_adapter, save_adapter
from studio.adapters.lora.config import LoraConfig


# method name -> (its baker, whether the baker needs the base model's pipeline): registered by the methods
_BAKERS: dict[str, tuple[Callable[..., tuple[Path, float]], bool]] = {}


def register_baker(method: str, *, needs_base: bool = False):
    """Declare the decorated `bake(path, rank, out)` (with `needs_base`: `bake(path, rank, pipe, out)`) as
    the way files of `method` become a LoRA; `bake_adapter` dispatches on a file's method to it."""
    def decorate(func):
        _BAKERS[method] = (func, needs_base)
        return func
    return decorate


def bakeable_methods() -> list[str]:
    return sorted(_BAKERS)


def bake_adapter(path: str | Path, rank: int, out: str | Path | None = None, *,
                 load_base: Callable[[str | None], Any] | None = None) -> tuple[Path, float]:
    """Write the adapter file at `path` as a LoRA of `rank` by its method's registered baker; returns (LoRA
    path, relative error). `load_base(name)` loads the base model for methods whose update is a function of
    the base weights (given the model name the file records, or None)."""
    file = read_adapter(path)
    if file.method not in _BAKERS:
        raise AdapterError(f"{Path(path).name} is a {file.method} adapter; bake takes "
                           f"{', '.join(bakeable_methods())} adapters")
    bake, needs_base = _BAKERS[file.method]
    if not needs_base:
        return bake(path, rank, out)
    if load_base is None:
        raise AdapterError(f"{Path(path).name}: baking a {file.method} adapter needs its base model")
    return bake(path, rank, load_base(file.metadata.get("base_model_name")), out)


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
    """`deltas`: layer key (`<denoiser>.<path>`: `unet.<path>`, `transformer.<path>`) -> (ΔW as rows × cols, the
    weight's shape). Writes the LoRA file and returns (path, relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F over all layers
    together)."""
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
