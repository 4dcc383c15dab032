"""Write an SD 1.x-family, SDXL or SD3 pipeline as one original-layout (LDM / SGM / MMDiT) `.safetensors` checkpoint.

The layout A1111, ComfyUI and diffusers' `from_single_file` read: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), and the text encoders: SD 1.x's CLIP under `cond_stage_model.transformer.*`; SDXL's
CLIP-L under `conditioner.embedders.0.transformer.*` and its OpenCLIP-bigG under `conditioner.embedders.1.model.*`
in OpenCLIP's own naming (fused q/k/v, `resblocks`, a transposed `text_projection`). It is the inverse of
diffusers' own conversion to diffusers, whose fixed-name tables it reuses. (The embedded model's file is
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

    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-prompt and size embedding
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
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


def clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in the original layout, under `prefix` (which nests it in `text_model.`,
    as the original does and transformers 5 no longer does)."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in sd.items()
            if not k.endswith("position_ids")}


_OPEN_CLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def open_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (a transformers CLIPTextModelWithProjection) in OpenCLIP's naming under `prefix`:
    each layer's q, k and v projections fused into `attn.in_proj_*`, the projection transposed."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    sd = {("" if k.startswith(("text_model.", "text_projection")) else "text_model.") + k: v for k, v in sd.items()
          if not k.endswith("position_ids")}
    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        head = "text_model.encoder.layers."
        if not key.startswith(head):
            raise ValueError(f"no original-layout name for text-encoder weight {key}")
        layer, rest = key[len(head):].split(".", 1)
        base = f"{prefix}transformer.resblocks.{layer}."
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            if rest.startswith("self_attn.q_proj."):  # q, k, v stacked in that order, as OpenCLIP's in_proj is
                kind = rest.rsplit(".", 1)[1]
                parts = [sd[f"{head}{layer}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
                out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        out[base + _rename_prefix(rest, _OPEN_CLIP_LAYER)] = value
    return out


def _rename_prefix(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new):
            return old + rest[len(new):]
    raise ValueError(f"no original-layout name for text-encoder weight {rest}")


# SD3's MMDiT: diffusers name -> Stability's (a block's q, k and v are fused into `qkv`, below)
_SD3_FIXED = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
              "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
              "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
              "norm_out.linear": "final_layer.adaLN_modulation.1"}
_SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
              "attn2.norm_k": "x_block.attn2.ln_k", "norm1.linear": "x_block.adaLN_modulation.1",
              "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
              "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
              "ff_context.net.2": "context_block.mlp.fc2"}
_SD3_QKV = {"attn.to_": ("x_block.attn.qkv", ""), "attn.add_": ("context_block.attn.qkv", "_proj"),
            "attn2.to_": ("x_block.attn2.qkv", "")}


def sd3_transformer_to_original(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """SD3's transformer in Stability's MMDiT layout (`model.diffusion_model.joint_blocks.N.x_block…`), the inverse
    of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`. diffusers' continuous norms read (scale,
    shift), Stability's (shift, scale): diffusers' own `swap_scale_shift` is its own inverse."""
    from diffusers.loaders.single_file_utils import swap_scale_shift

    last = config["num_layers"] - 1
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        module, kind = key.rsplit(".", 1)
        if module in _SD3_FIXED or key in _SD3_FIXED:
            new = _SD3_FIXED[key] if key in _SD3_FIXED else f"{_SD3_FIXED[module]}.{kind}"
            out[new] = swap_scale_shift(value, 0) if module == "norm_out.linear" else value
            continue
        parts = module.split(".")
        if parts[0] != "transformer_blocks":
            raise ValueError(f"no original-layout name for transformer weight {key}")
        i, inner = int(parts[1]), ".".join(parts[2:])
        if inner in _SD3_BLOCK:
            swap = inner == "norm1_context.linear" and i == last  # the last block's context norm is continuous
            out[f"joint_blocks.{i}.{_SD3_BLOCK[inner]}.{kind}"] = swap_scale_shift(value, 0) if swap else value
            continue
        for head, (fused, suffix) in _SD3_QKV.items():
            if inner in (f"{head}q{suffix}", f"{head}k{suffix}", f"{head}v{suffix}"):
                if inner == f"{head}q{suffix}":  # q, k and v stacked in that order
                    out[f"joint_blocks.{i}.{fused}.{kind}"] = torch.cat(
                        [sd[f"transformer_blocks.{i}.{head}{x}{suffix}.{kind}"] for x in "qkv"])
                break
        else:
            raise ValueError(f"no original-layout name for transformer weight {key}")
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def save_single_file(pipe, path: str | Path) -> Path:
    """Save a pipeline as one original-layout safetensors file: SD 1.x-family and SDXL with their UNet, VAE and text
    encoders; SD3 with its transformer and VAE (the layout of Stability's `sd3_medium.safetensors` and SD3.5's
    files: the text encoders are separate files, which a loader takes from the model's config folder)."""
    from safetensors.torch import save_file

    if getattr(pipe, "unet", None) is None:
        return _save_sd3(pipe, Path(path))
    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "studio_unet_config": json.dumps(dict(pipe.unet.config))})
    return path


def _save_sd3(pipe, path: Path) -> Path:
    from safetensors.torch import save_file

    name = type(pipe.transformer).__name__
    if name != "SD3Transformer2DModel":
        raise ValueError(f"single-file export covers SD 1.x/2.x, SDXL and SD3; {name}'s original layout is not "
                         "written (diffusers reads Flux single files at Flux.1's own width only, so it could not be "
                         "tested here)")
    state = sd3_transformer_to_original(pipe.transformer.state_dict(), pipe.transformer.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path
