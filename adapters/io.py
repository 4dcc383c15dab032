"""Writing adapters for other tools: kohya keys (ComfyUI, A1111, Forge) and diffusers/PEFT keys."""

from __future__ import annotations

from pathlib import Path

from studio.adapters.base import AdapterError, read_adapter, write_safetensors
from studio.adapters.lora.config import LoraConfig
from studio.adapters.lora.convert import to_diffusers, to_kohya

FORMATS = ("kohya", "diffusers")


def export_adapter(path: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Write `path` in `fmt`; LoRA files convert directly, and so do membranes (SPM), which are rank-1 LoRAs
    (written out they act at a fixed strength: other tools have no per-prompt permeability). Other methods
    bake to a LoRA first."""
    if fmt not in FORMATS:
        raise AdapterError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    path = Path(path)
    file = read_adapter(path)
    config = file.config
    if file.method == "spm":
        config = LoraConfig(target_modules=file.config["target_modules"], rank=file.config.get("rank", 1)).to_dict()
    elif file.method != "lora":
        raise AdapterError(f"{path.name} is a {file.method} adapter; only LoRA files export to {fmt} keys")
    out = Path(out) if out else path.with_name(f"{path.stem}.{fmt}.safetensors")
    if out.resolve() == path.resolve():
        raise AdapterError(f"export would overwrite its input {path}; choose another --out")
    if fmt == "kohya":
        tensors, metadata = to_kohya(file.tensors, config, file.base, name=path.stem)
    else:
        tensors, metadata = to_diffusers(file.tensors, config)
    return write_safetensors(out, tensors, {**metadata, "studio_source": path.name})
