"""Writing adapters for other tools: kohya keys (ComfyUI, A1111, Forge) and diffusers/PEFT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from studio.adapters.base import AdapterError
from studio.adapters.files import read_adapter, write_safetensors
from studio.adapters.lora.config import LoraConfig
from studio.adapters.lora.convert import to_diffusers, to_kohya
from studio.adapters.lycoris_keys import NETWORK as LYCORIS
from studio.adapters.lycoris_keys import to_lycoris_kohya
from studio.adapters.trigger import TRIGGER_KEY, TRIGGER_KEYS

FORMATS = ("kohya", "diffusers")


# the embedding file's key for each text encoder of a family, in the pipeline's order: the names ComfyUI's
# tokenizers ask for (`embedding_key`), and for SDXL also what A1111 and diffusers' load_textual_inversion read
EMBEDDING_KEYS = {"sdxl": ("clip_l", "clip_g"), "sd3": ("clip_l", "clip_g", "t5xxl"), "flux": ("clip_l", "t5xxl")}


def embedding_tensors(vectors: dict[str, torch.Tensor], family: str = "") -> dict[str, torch.Tensor]:
    """A textual-inversion file's tensors: `emb_params` for one text encoder; for several, one tensor per
    encoder named as ComfyUI asks for it (SDXL `clip_l`, `clip_g` — also A1111's and diffusers'
    `load_textual_inversion` layout; SD3 `clip_l`, `clip_g`, `t5xxl`; Flux `clip_l`, `t5xxl`)."""
    if set(vectors) == {TRIGGER_KEY}:
        return {"emb_params": vectors[TRIGGER_KEY]}
    names = EMBEDDING_KEYS.get(family) or EMBEDDING_KEYS["sdxl"]
    keys = [key for key in TRIGGER_KEYS if key in vectors]
    if len(keys) != len(names):
        raise AdapterError(f"{len(keys)} trigger embeddings do not fit a {family or 'two-encoder'} model's "
                           f"{len(names)} text encoders")
    return {name: vectors[key] for name, key in zip(names, keys)}


def export_adapter(path: str | Path, fmt: str, out: str | Path | None = None) -> list[Path]:
    """Write `path` in `fmt`; returns the files written: the export, then the trigger embedding if any.
    LoRA files convert directly, and so do membranes (SPM), which are rank-1 LoRAs (written out they act at a
    fixed strength: other tools have no per-prompt permeability); other methods are refused (`studio bake`
    turns them into a LoRA first). A trained trigger token goes beside the export as a textual-inversion file
    named after the trigger (`sks.safetensors`, key `emb_params`, on SDXL `clip_l` and `clip_g`: A1111/Forge
    embeddings, ComfyUI `embedding:sks`, diffusers `pipe.load_textual_inversion(path, token="sks")`). kohya
    keys are the ones ComfyUI and A1111 load in full; diffusers keys load in diffusers' `load_lora_weights`
    (ComfyUI knows the UNet's attention only by older diffusers names: docs/export-compat.md). A diffusion
    transformer's LoRA (SD3, Flux) exports to diffusers keys only, `transformer.<module>.lora_A.weight` /
    `lora_B.weight` as those pipelines' `load_lora_weights` read them; its kohya layout is not written yet."""
    if fmt not in FORMATS:
        raise AdapterError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    path = Path(path)
    file = read_adapter(path)
    config = file.config
    if file.method == "spm":
        config = LoraConfig(target_modules=file.config["target_modules"], rank=file.config.get("rank", 1)).to_dict()
    elif file.method in LYCORIS and fmt == "kohya":
        pass
    elif file.method in LYCORIS:
        raise AdapterError(f"{path.name} is a {file.method} adapter; it exports to LyCORIS's kohya keys (--format "
                           "kohya), which ComfyUI and A1111 read, not to diffusers keys")
    elif file.method != "lora":
        raise AdapterError(f"{path.name} is a {file.method} adapter; only LoRA, LoHa and LoKr files export to {fmt} "
                           "keys (studio bake turns SaRA and SODA into a LoRA)")
    out = Path(out) if out else path.with_name(f"{path.stem}.{fmt}.safetensors")
    if out.resolve() == path.resolve():
        raise AdapterError(f"export would overwrite its input {path}; choose another --out")
    tensors = dict(file.tensors)
    vectors = {key: tensors.pop(key) for key in TRIGGER_KEYS if key in tensors}
    if file.method in LYCORIS:
        tensors, metadata = to_lycoris_kohya(file.method, tensors, config, file.base, name=path.stem)
    elif fmt == "kohya":
        tensors, metadata = to_kohya(tensors, config, file.base, name=path.stem)
    else:
        tensors, metadata = to_diffusers(tensors, config)
    written = []
    if vectors:
        trigger = file.metadata.get("trigger", "")
        embedding = out.with_name(f"{trigger}.safetensors")
        if not trigger or embedding.resolve() in (path.resolve(), out.resolve()):
            raise AdapterError(f"{path.name}: its trigger token cannot be written as {embedding.name}")
        written.append(write_safetensors(embedding, embedding_tensors(vectors, file.base.get("family", "")),
                                         {"studio_source": path.name, "trigger": trigger}))
    return [write_safetensors(out, tensors, {**metadata, "studio_source": path.name})] + written
