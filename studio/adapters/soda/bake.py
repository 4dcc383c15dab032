"""Bake a SODA adapter into a LoRA of a chosen rank: ΔW = W' − W per layer (which needs the base model the
adapter was trained on: SODA's file holds no weights, only rotations and shifts of W's own SVD), truncated
by SVD."""

from __future__ import annotations

from pathlib import Path

from studio.adapters.bake import bake_deltas, baked_path, read_for_bake, register_baker
from studio.adapters.base import get_method


@register_baker("soda", needs_base=True)
def bake_to_lora(path: str | Path, rank: int, pipe, out: str | Path | None = None) -> tuple[Path, float]:
    """Write `path` (a SODA file) as a LoRA file of `rank` for `pipe`'s model (the one it was trained on;
    another is refused); returns (LoRA path, relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F over all layers)."""
    path = Path(path)
    file = read_for_bake(path, "soda", rank)
    soda = get_method("soda")
    name = "_bake"
    soda.load_state_dict(pipe, name, file.tensors, config=soda.config_class.from_dict(file.config), base=file.base,
                         source=path.name)
    try:
        deltas = {key: (delta, tuple(delta.shape)) for key, delta in soda.delta_weights(pipe, name).items()}
    finally:
        soda.remove(pipe, name)
    return bake_deltas(deltas, rank, baked_path(path, rank, out), file.base, path.name)
