"""Which keys of a LoRA (or trigger embedding) file ComfyUI would load, by ComfyUI's own code.

    python scripts/comfyui_keys.py FILE [FILE ...] --comfyui PATH_TO_COMFYUI_CHECKOUT [--family sd1|sdxl|sd3|flux]

Nothing of ComfyUI is copied into Studio: the script imports the checkout you point it at and runs, as
ComfyUI's `comfy.sd.load_lora_for_models` does,

1. ComfyUI's model object for the family: diffusers' reference UNet of SD 1.5 or SDXL is built on the meta
   device (no weights, no memory) and its state-dict names go through ComfyUI's
   `comfy.model_detection.model_config_from_diffusers_unet`, which picks ComfyUI's `SD15` / `SDXL` config;
   that config builds ComfyUI's own UNet and text-encoder models (`get_model`, `clip_target`), also on meta;
   for SD3 and Flux, the model config ComfyUI's detection writes for SD3-medium and Flux.1-dev goes through
   `comfy.model_detection.model_config_from_unet_config` and builds ComfyUI's MMDiT / Flux model on meta (their
   text encoders are not built: Studio trains no text-encoder LoRA on these families);
2. the key map of `comfy.lora.model_lora_keys_unet` and `comfy.lora.model_lora_keys_clip` on those models;
3. `comfy.lora_convert.convert_lora` and `comfy.lora.load_lora` on the file's tensors, whose
   "lora key not loaded" messages are the keys reported here.

It checks key names only. ComfyUI also needs the base model's layer widths to match the file's tensors: a file
for Studio's embedded shapes model (SD-1.5 module names, other widths) names the right layers, but ComfyUI
cannot load the shapes model itself. Embedding files (`emb_params`; SDXL's `clip_l` / `clip_g`; SD3's `clip_l`,
`clip_g`, `t5xxl`; Flux's `clip_l`, `t5xxl`) are read
with ComfyUI's `comfy.sd1_clip.load_embed`; the report says which tensor it takes for each encoder and whether
its width is the one ComfyUI's encoder has. Exit status: 0 when every key loads, 1 when some do not, 2 on bad
input. Runs offline on the CPU (ComfyUI is told `--cpu`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# diffusers' UNet2DConditionModel settings of the two reference architectures (the rest are its defaults)
UNET_CONFIGS = {
    "sd1": {"cross_attention_dim": 768},
    "sdxl": {"block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
}
# the model configs ComfyUI's `detect_unet_config` writes for SD3-medium and Flux.1-dev checkpoints
TRANSFORMER_CONFIGS = {
    "sd3": {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
            "adm_in_channels": 2048, "num_patches": 36864, "pos_embed_max_size": 192,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 1536}},
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []},
    "flux": {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
             "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
             "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
             "guidance_embed": True},
}
FAMILIES = (*UNET_CONFIGS, *TRANSFORMER_CONFIGS)
# the text encoders' embedding keys and widths ComfyUI's tokenizers ask load_embed for
EMBEDDING_KEYS = {"sd1": {"clip_l": 768}, "sdxl": {"clip_l": 768, "clip_g": 1280},
                  "sd3": {"clip_l": 768, "clip_g": 1280, "t5xxl": 4096}, "flux": {"clip_l": 768, "t5xxl": 4096}}
EMBEDDING_NAMES = ("emb_params", "string_to_param", "clip_l", "clip_g", "t5xxl")
NOT_LOADED = "lora key not loaded: "


class InputError(Exception):
    pass


def import_comfyui(checkout: Path):
    """ComfyUI's modules from `checkout`, set up for the CPU."""
    if not (checkout / "comfy" / "lora.py").is_file():
        raise InputError(f"{checkout} is not a ComfyUI checkout (no comfy/lora.py)")
    sys.path.insert(0, str(checkout.resolve()))
    logging.getLogger().setLevel(logging.ERROR)  # its import-time notes on optional packages
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management looks for a GPU
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.utils

    return comfy


_KEY_MAPS: dict[str, dict[str, str]] = {}


def comfyui_key_map(comfy, family: str) -> dict[str, str]:
    """ComfyUI's LoRA key map for the family's UNet and text encoders, from models built on meta."""
    if family in _KEY_MAPS:
        return _KEY_MAPS[family]
    import torch
    from diffusers import UNet2DConditionModel

    if family in TRANSFORMER_CONFIGS:
        with torch.device("meta"):
            config = comfy.model_detection.model_config_from_unet_config(dict(TRANSFORMER_CONFIGS[family]))
            if config is None:
                raise InputError(f"ComfyUI's model detection does not recognise the {family} transformer")
            model = config.get_model({})
        _KEY_MAPS[family] = comfy.lora.model_lora_keys_unet(model, {})
        return _KEY_MAPS[family]
    with torch.device("meta"):
        names = UNet2DConditionModel(**UNET_CONFIGS[family]).state_dict()
        config = comfy.model_detection.model_config_from_diffusers_unet(names)
        if config is None:
            raise InputError(f"ComfyUI's model detection does not recognise the {family} UNet")
        model = config.get_model({})
        clip = config.clip_target().clip(device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    _KEY_MAPS[family] = comfy.lora.model_lora_keys_clip(clip, key_map)
    return _KEY_MAPS[family]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(NOT_LOADED):
            self.keys.append(message[len(NOT_LOADED):])


def lora_report(comfy, lora: dict, family: str) -> tuple[int, list[str]]:
    """(how many patches ComfyUI makes, the file's keys it leaves unloaded)."""
    key_map = comfyui_key_map(comfy, family)
    collect = _Collect()
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    root.handlers, root.level = [collect], logging.WARNING  # ComfyUI logs each unloaded key: collect, not print
    try:
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    finally:
        root.handlers, root.level = handlers, level
    return len(patches), sorted(collect.keys)


def embedding_report(comfy, path: Path, tensors: dict, family: str) -> list[tuple[str, str, bool]]:
    """For each encoder of the family: (key, what ComfyUI's load_embed takes, whether its width fits)."""
    rows = []
    for key, width in EMBEDDING_KEYS[family].items():
        vector = comfy.sd1_clip.load_embed(path.stem, str(path.parent), width, key)
        if vector is None:
            raise InputError(f"ComfyUI's load_embed found no embedding {path.stem} in {path.parent}")
        # which of the file's tensors ComfyUI returned, by value
        taken_key = next((k for k, t in tensors.items() if t.shape[-1] == vector.shape[-1]
                          and bool((t.float().reshape(vector.shape) == vector.float()).all())), None)
        if taken_key is None:
            raise InputError(f"ComfyUI's load_embed returned a vector that is none of {path.name}'s tensors")
        taken = f"`{taken_key}`" + (" by name" if taken_key == key else " (ComfyUI's first-tensor fallback)")
        rows.append((key, f"{taken}, width {vector.shape[-1]}", vector.shape[-1] == width))
    return rows


def guess_family(keys: list[str], metadata: dict[str, str]) -> str:
    if metadata.get("ss_base_model_version", "").startswith("sdxl"):
        return "sdxl"
    if any(k.startswith("transformer.") for k in keys):
        return "flux" if any(k.startswith("transformer.single_transformer_blocks.") for k in keys) else "sd3"
    if "t5xxl" in keys:  # an SD3 or Flux trigger embedding
        return "sd3" if "clip_g" in keys else "flux"
    sdxl = ("lora_te1_", "lora_te2_", "text_encoder_2.")
    return "sdxl" if any(k.startswith(sdxl) for k in keys) or "clip_g" in keys else "sd1"


def check_file(comfy, path: Path, family: str | None, limit: int | None) -> bool:
    """Print what ComfyUI loads of `path`; True when it loads every key."""
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(f"{path.name} is not a readable safetensors file ({exc})") from None
    family = family or guess_family(list(tensors), metadata)
    if set(tensors) <= set(EMBEDDING_NAMES):
        rows = embedding_report(comfy, path, tensors, family)
        for key, taken, fits in rows:
            print(f"{path.name} [{family}] embedding for {key}: {taken}"
                  + ("" if fits else f" (ComfyUI's {key} is {EMBEDDING_KEYS[family][key]} wide: ignored)"))
        return all(fits for _, _, fits in rows)
    patches, missing = lora_report(comfy, tensors, family)
    print(f"{path.name} [{family}]: {len(tensors)} keys, {len(tensors) - len(missing)} loaded by ComfyUI "
          f"({patches} layers patched), {len(missing)} not loaded")
    for key in missing[:limit] if limit else missing:
        print(f"  not loaded: {key}")
    if limit and len(missing) > limit:
        print(f"  ... and {len(missing) - limit} more (--all lists them)")
    return not missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", type=Path, nargs="+", metavar="FILE",
                        help="LoRA or trigger-embedding .safetensors files")
    parser.add_argument("--comfyui", type=Path, required=True, help="path to a ComfyUI source checkout")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="base model layout (default: from each file)")
    parser.add_argument("--all", action="store_true", help="list every unloaded key (default: the first 20)")
    args = parser.parse_args(argv)
    try:
        comfy = import_comfyui(args.comfyui)
        results = [check_file(comfy, path, args.family, None if args.all else 20) for path in args.files]
    except InputError as exc:
        print(f"comfyui_keys: error: {exc}", file=sys.stderr)
        return 2
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
