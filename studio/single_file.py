"""Write an SD 1.x-family pipeline as one original-layout (LDM) `.safetensors` checkpoint.

The layout A1111, ComfyUI and diffusers' `from_single_file` read: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (CLIP text encoder). It is the inverse of
diffusers' own LDM->diffusers conversion, whose fixed-name table it reuses. (The embedded model's file is
read by diffusers and `load_pipeline`, not by ComfyUI: its channel widths are not SD 1.5's, so ComfyUI cannot
detect the model type.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.utils.files import atomic_path

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per = config["layers_per_block"] + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * per}.0.op." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot, rest = ("0", _rename(rest, _RESNET)) if kind == "resnets" else ("1", rest)
                new = f"input_blocks.{b * per + j + 1}.{slot}.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
            new = f"middle_block.{slot}." + (_rename(rest, _RESNET) if kind == "resnets" else rest)
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                has_attn = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
                new = f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot, rest = ("0", _rename(rest, _RESNET)) if kind == "resnets" else ("1", rest)
                new = f"output_blocks.{b * per + j}.{slot}.{rest}"
        else:
            raise ValueError(f"no original-layout name for UNet weight {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        if key in fixed:
            new = fixed[key]
        elif parts[1] in ("down_blocks", "up_blocks"):
            i, kind = int(parts[2]), parts[3]
            block = i if parts[1] == "down_blocks" else n_up - 1 - i
            name = "down" if parts[1] == "down_blocks" else "up"
            if kind in ("downsamplers", "upsamplers"):
                new = f"{side}.{name}.{block}.{'downsample' if name == 'down' else 'upsample'}." + ".".join(parts[5:])
            else:
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{name}.{block}.block.{parts[4]}.{rest}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            new = f"{side}.mid.attn_1." + _rename(".".join(parts[4:]), _VAE_ATTN)
            if value.ndim == 2:  # the original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise ValueError(f"no original-layout name for VAE weight {key}")
        out["first_stage_model." + new] = value
    return out


def save_single_file(pipe, path: str | Path) -> Path:
    """Save an SD 1.x-family pipeline (UNet, VAE, CLIP text encoder) as one LDM-layout safetensors file."""
    from safetensors.torch import save_file

    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("single-file export covers the SD 1.x/2.x family; SDXL is not supported yet")
    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    # the original layout nests CLIP under text_model. (transformers 5 no longer does)
    state.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in pipe.text_encoder.state_dict().items()})
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "studio_unet_config": json.dumps(dict(pipe.unet.config))})
    return path
