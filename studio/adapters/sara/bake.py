"""Bake a SaRA update into a LoRA of a chosen rank (truncated SVD per layer), for tools that read LoRAs."""

from __future__ import annotations

import math
from pathlib import Path

from studio.adapters.bake import bake_deltas, baked_path, read_for_bake, register_baker
from studio.adapters.base import AdapterError
from studio.kernels.sparse_delta import SparsePattern, dense_delta


@register_baker("sara")
def bake_to_lora(path: str | Path, rank: int, out: str | Path | None = None) -> tuple[Path, float]:
    """Write `path` (a SaRA file) as a LoRA file of `rank`; returns (LoRA path, relative error), the error
    being ‖ΔW − B·A‖_F / ‖ΔW‖_F over all layers together."""
    path = Path(path)
    file = read_for_bake(path, "sara", rank)
    deltas = {}
    for key in sorted(k for k in file.tensors if k.endswith(".indices")):
        layer = key[:-len(".indices")]
        if f"{layer}.shape" not in file.tensors:
            raise AdapterError(f"{path.name} does not record the shape of {layer}")
        shape = tuple(file.tensors[f"{layer}.shape"].tolist())
        pattern = SparsePattern(file.tensors[key].long(), (shape[0], math.prod(shape[1:])))
        deltas[layer] = (dense_delta(file.tensors[f"{layer}.values"].float(), pattern), shape)
    return bake_deltas(deltas, rank, baked_path(path, rank, out), file.base, path.name)
