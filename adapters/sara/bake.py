"""Bake a SaRA update into a LoRA of a chosen rank (truncated SVD per layer), for tools that read LoRAs."""

from __future__ import annotations

import math
from pathlib import Path

from studio.adapters.bake import bake_deltas
from studio.adapters.base import AdapterError, read_adapter
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
    deltas = {}
    for key in sorted(k for k in file.tensors if k.endswith(".indices")):
        layer = key[:-len(".indices")]
        if f"{layer}.shape" not in file.tensors:
            raise AdapterError(f"{path.name} does not record the shape of {layer}")
        shape = tuple(file.tensors[f"{layer}.shape"].tolist())
        pattern = SparsePattern(file.tensors[key].long(), (shape[0], math.prod(shape[1:])))
        deltas[layer] = (dense_delta(file.tensors[f"{layer}.values"].float(), pattern), shape)
    out = Path(out) if out else path.with_name(f"{path.stem}_lora{rank}.safetensors")
    return bake_deltas(deltas, rank, out, file.base, path.name)
